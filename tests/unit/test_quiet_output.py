"""bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" line is not printed by sd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINE = "gemm_4bit_forward from kernels-community"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def test_sd_validate_on_a_shipped_recipe_prints_no_bitsandbytes_line():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "sdcli", "validate", "recipes/quickstart.yaml"], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert LINE not in done.stdout + done.stderr


def test_a_command_drops_that_line_and_only_that_line():
    """After a command has run, importing peft (which imports bitsandbytes; on a CPU with AVX512-BF16
    and no `kernels` package that logs the line) prints nothing of it; the same logger's other
    warnings still show. The line is also logged by hand, so this checks the filter on any CPU."""
    done = _python(
        "import logging\n"
        "from typer.testing import CliRunner\n"
        "from sdcli.cli import app\n"
        "result = CliRunner().invoke(app, ['validate', 'recipes/quickstart.yaml'])\n"
        "assert result.exit_code == 0, result.output\n"
        "import peft\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...', 'no kernels')\n"
        "log.warning('another bitsandbytes warning')\n"
    )
    assert done.returncode == 0, done.stderr
    assert LINE not in done.stdout + done.stderr
    assert "another bitsandbytes warning" in done.stderr


def test_without_sd_the_line_is_printed():
    """The check above can fail: the same hand-logged line, without a command run first, is printed."""
    done = _python(
        "import logging\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
        "'Failed to load CPU gemm_4bit_forward from kernels-community: %s.', 'no kernels')\n"
    )
    assert LINE in done.stderr
