"""Folding a history of episode adapters into one model or one adapter, checked numerically.

`merge_history` is the whole merge; its jobs are the modules of this package:

    fold.py     the folding math: W' = W + sum_i s_i B_i A_i, or one LoRA of the summed rank
    check.py    the numerical check: the result, reloaded, against the adapter stack (MergeReport)
    output.py   writing the merged folder: a temporary sibling, renamed into place once checked,
                and the removal of the ones killed merges left

On any failure, of the input, the check or the disk, nothing is left at the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sdcli.core.errors import DiskFullError, UserError, is_disk_full, write_error
from sdcli.models.merge.check import (
    DEFAULT_PROBE_PROMPTS,
    DEFAULT_TOLERANCE,
    LoadBase,
    MergeCheckError,
    MergeReport,
    encode_probes,
    merge_and_check,
)
from sdcli.models.merge.output import META_FILE, OWNER_FILE, hold, partial_folder, publish, remove_stale_partials
from sdcli.models.quantization import QUANTIZATIONS
from sdcli.models.stack import adapter_dir_problems

INTO_CHOICES = ("model", "adapter")
QUANTIZATION_CHOICES = QUANTIZATIONS


def load_base_model(path: Path, quantization: str):
    """The base as `sd` trains on it (`sdcli.models.quantization`: NF4 with double quantization for
    4bit, LLM.int8 for 8bit), computing in float32, the dtype the merge and its check run in.

    The quantized weights are those training used, so `quantized_stack_diff` compares against the
    stack as trained; a run trained in bfloat16 on CUDA computed in bfloat16 there.
    """
    from sdcli.models.quantization import load_model

    try:
        return load_model(path, quantization, torch.float32)
    except OSError as e:  # no config.json / weights in the folder
        raise UserError(f"Cannot load the base model from {path}:", [str(e).strip().splitlines()[0]]) from e


def merge_history(
    base_path: Path | str,
    adapter_dirs: Sequence[Path | str],
    out_dir: Path | str,
    into: str = "model",
    quantization: str = "none",
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
    probe_prompts: list[str] | None = None,
    load_base: LoadBase | None = None,
    log: Callable[[str], None] | None = None,
) -> MergeReport:
    """Fold `adapter_dirs` (in stacking order) on top of the base into `out_dir`, and check it.

    `quantization` is how the base was loaded in training. Raises UserError on bad input (nothing
    is loaded then), MergeCheckError when the merged result misses the tolerance. Either way nothing
    is written at `out_dir`; an existing `out_dir` is replaced only with `force`. `log(line)` hears
    about folders of killed merges that were removed.
    """
    into = check_into(into)
    quantization = _choice(getattr(quantization, "value", quantization), QUANTIZATION_CHOICES, "quantization")
    base_path, out_dir = Path(base_path), Path(out_dir)
    dirs = [Path(d) for d in adapter_dirs]
    load = load_base or load_base_model

    for line in remove_stale_partials(out_dir):  # even when the merge is refused: they are only litter
        (log or (lambda message: None))(line)
    _check_inputs(base_path, dirs, out_dir, force)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError) as e:
        problem = str(e).strip().splitlines()[0]
        raise UserError(f"Cannot load the tokenizer of the base model from {base_path}:", [problem]) from e
    prompts = list(probe_prompts) if probe_prompts else list(DEFAULT_PROBE_PROMPTS)
    probes = encode_probes(tokenizer, prompts)
    report = MergeReport(
        out_dir=out_dir,
        into=into,
        quantization=quantization,
        adapters=[str(d) for d in dirs],
        tolerance=float(tolerance),
        probe_prompts=len(probes),
        probe_tokens=sum(p.shape[1] for p in probes),
    )

    tmp = partial_folder(out_dir)
    owner = None
    try:
        owner = hold(tmp)
        with torch.no_grad():
            merge_and_check(base_path, dirs, tmp, into, quantization, probes, tokenizer, load, report)
        (tmp / META_FILE).write_text(json.dumps(report.to_dict() | {"out_dir": str(out_dir)}, indent=2) + "\n")
        if not report.passed:
            raise MergeCheckError(report)
        os.close(owner)  # the lock file leaves with the folder
        owner = None
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        publish(tmp, out_dir, force)
    except BaseException as e:
        if owner is not None:
            os.close(owner)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e) and not isinstance(e, UserError):
            raise DiskFullError(out_dir, f" (its partial copy {tmp.name} was removed)") from None
        if isinstance(e, OSError) and write_error(e, tmp):
            raise write_error(e, out_dir) from None
        raise
    return report


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UserError(f"Unknown {what} {value!r}; choose one of: {', '.join(choices)}.")
    return value


def check_into(into: str, what: str = "into") -> str:
    """`into` if it is one of INTO_CHOICES, else a UserError naming it as `what` (`sd merge` says
    "--into"); merge_history checks with it too, so the CLI and the library refuse the same values."""
    return _choice(getattr(into, "value", into), INTO_CHOICES, what)


def _check_inputs(base_path: Path, dirs: list[Path], out_dir: Path, force: bool) -> None:
    if not dirs:
        raise UserError("Nothing to merge: the history has no episode adapters.")
    problems = []
    if not base_path.is_dir():
        problems.append(f"base model {base_path}: folder not found")
    else:
        from sdcli.models.model_folder import model_folder_problems

        problems += [f"base model: {p}" for p in model_folder_problems(base_path, trust_remote_code=None)]
    problems += [f"{d}: {p}" for d in dirs for p in adapter_dir_problems(d)]
    from sdcli.core.outputs import folder_problem

    problem = folder_problem(out_dir.parent)  # a file in the way, no write permission: before anything loads
    if problem:
        problems.append(f"the output {out_dir} cannot be written: {problem}")
    out = out_dir.resolve()
    for src in [base_path, *dirs]:
        if out == src.resolve() or out in src.resolve().parents:
            problems.append(f"the output folder {out_dir} would overwrite the input {src}")
    if problems:
        raise UserError("Cannot merge:", problems)
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise UserError(
                f"{out_dir} already exists; not overwriting it.",
                hint="Pass --force to replace it, or choose another output folder.",
            )
