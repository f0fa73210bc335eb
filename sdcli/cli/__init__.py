"""The `sd` command line: parse, call, report. No training logic lives here.

Exit codes: 0 success; 2 bad input (recipe, data, model folder, arguments, paths, a place sd cannot
write to, a full disk), always with a message naming the file, line or key and no traceback; 130
interrupted; 1 anything else (a bug: the message asks for SD_DEBUG=1 and a report). The mapping
lives in the app itself (`_Commands`), so `sd` and an in-process `CliRunner` agree.

The commands are in the modules of this package, by what they work on: train.py (sd train, sd
validate), runs.py (sd merge, sd episodes, sd generate), evaluate.py (sd inspect, sd eval, sd
report). Each registers its commands on `app` when imported, at the end of this module; `sd --help`
stays fast because they import what a command needs inside it.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.markup import escape  # messages hold paths, overrides and hints like 'sd[plot]': text, not markup
from typer.core import TyperGroup

from sdcli import __version__
from sdcli.cli.output import console, out
from sdcli.core.errors import DiskFullError, Interrupted, JobStopped, UserError, is_disk_full

# What sd sets in its own environment when a command runs (not at import: importing sdcli.cli, as
# the tests do, changes nothing). A variable the user set wins. sd never downloads: models are
# folders, or the built-in one.
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _click_module():
    """Typer vendors its own copy of click in recent versions; catch that one's exceptions."""
    try:
        from typer import _click as click  # type: ignore[attr-defined]
    except ImportError:
        import click
    return click


class _Commands(TyperGroup):
    """Every command runs inside `invoke`: exceptions become a message and an exit code here."""

    def invoke(self, ctx):
        click = _click_module()
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, typer.Exit, typer.Abort):
            raise  # usage errors (exit 2), --help, --version: typer reports them
        except JobStopped as e:  # a job of several ranks stopped: rank 0 says why, the others say nothing
            if e.render():
                print(e.render(), file=sys.stderr, flush=True)
            raise typer.Exit(e.code) from None
        except UserError as e:
            console.print(f"[red]error:[/red] {escape(e.render())}", highlight=False)
            raise typer.Exit(2) from None
        except Interrupted as e:
            console.print(str(e), markup=False, highlight=False)
            raise typer.Exit(e.code) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None
        except SystemExit as e:  # code sd imported (a reward or environment module) called sys.exit()
            if os.environ.get("SD_DEBUG"):
                raise
            console.print(f"[red]internal error:[/red] {escape(f'code sd ran called sys.exit({e.code!r}).')}", highlight=False)
            console.print("Run again with SD_DEBUG=1 for the full traceback.")
            raise typer.Exit(1) from None
        except Exception as e:  # a bug or an environment failure: short message, traceback on request
            if os.environ.get("SD_DEBUG"):
                raise
            if is_disk_full(e):  # written by a library that does not name the file
                problem = DiskFullError(None, f" ({type(e).__name__}: {e})")
                console.print(f"[red]error:[/red] {escape(problem.render())}", highlight=False)
                raise typer.Exit(2) from None
            console.print(f"[red]internal error:[/red] {escape(f'{type(e).__name__}: {e}')}", highlight=False)
            console.print("Run again with SD_DEBUG=1 for the full traceback, and please report it.")
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="sd: continual fine-tuning of language models by on-policy self-distillation.\n\n"
    "Start with:  sd train recipes/quickstart.yaml",
)


def main() -> None:
    click = _click_module()
    try:
        code = app(standalone_mode=False, prog_name="sd")
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except UserError as e:  # raised before a command ran (the commands' own are mapped in _Commands)
        console.print(f"[red]error:[/red] {escape(e.render())}", highlight=False)
        sys.exit(2)
    except Exception as e:
        if os.environ.get("SD_DEBUG"):
            raise
        console.print(f"[red]internal error:[/red] {escape(f'{type(e).__name__}: {e}')}", highlight=False)
        console.print("Run again with SD_DEBUG=1 for the full traceback, and please report it.")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


class _NoKernelsCommunityNote(logging.Filter):
    """bitsandbytes (0.50), imported by peft in every command that loads a model, logs "Failed to load
    CPU gemm_4bit_forward from kernels-community ..." on CPUs with AVX512-BF16 when the `kernels`
    package is absent. That kernel is the fast path sd switches off on every 4-bit layer
    (sdcli.models.quantization.keep_4bit_weights_unpacked), so the line says nothing about sd's run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


def quiet_bitsandbytes() -> None:
    """Drop that one line; the logger's other messages still show. Idempotent."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NoKernelsCommunityNote) for f in logger.filters):
        logger.addFilter(_NoKernelsCommunityNote())


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit")):
    for key, value in ENV_DEFAULTS.items():  # before any command imports transformers
        os.environ.setdefault(key, value)
    quiet_bitsandbytes()  # before any command imports peft
    if version:
        out.print(f"sd {__version__}")
        raise typer.Exit(0)


# The commands, in the order `sd --help` lists them: each module adds its own to `app` when
# imported, so they are imported here, after `app` is made (they import it from this module).
from sdcli.cli import train, runs, evaluate  # noqa: E402, F401, I001
