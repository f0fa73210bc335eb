"""Folding a history of episode adapters into one model or one adapter, checked numerically.

A history is the base plus LoRA adapters 1..k, all active (see `sdcli.models.stack`). Each adds
s_i * B_i A_i to the weights it targets, so the stack can be folded exactly:

  into="model"    W' = W + sum_i s_i B_i A_i, written as a plain transformers model folder
                  (with the base's tokenizer). The base is reloaded in float32 even when it was
                  trained 4-bit or 8-bit: merging into quantized weights re-rounds them, an error
                  about as large as the adapters' own effect (peft#2321).
  into="adapter"  one LoRA of rank r_1 + ... + r_k: A = [A_1; ...; A_k], B = [s_1 B_1, ..., s_k B_k],
                  scaling 1 (lora_alpha = r, no rsLoRA). Then B A x = sum_i s_i B_i A_i x, the
                  stack exactly. (peft's `add_weighted_adapter(combination_type="cat")` does the
                  same, but copies `use_rslora` from the first adapter, which makes the scaling
                  sqrt(r) instead of 1 when that adapter used rsLoRA, and it saves a named adapter
                  into a subfolder. It is built here directly.)

Every merge checks itself. The result is reloaded from disk with plain transformers / peft and its
logits on a few probe prompts (chat template applied when the tokenizer has one) are compared
with those of the adapter stack on the float32 base. Merging in float32 is exact up to rounding,
so the default tolerance, DEFAULT_TOLERANCE = 1e-3 on the max absolute logit difference, is tight:
rounding stays orders of magnitude below it, while a dropped adapter or a wrong scaling is far
above it whenever the adapters matter (`adapter_effect` reports how much they do).

With a 4-bit or 8-bit base, the stack as trained ran on quantized weights, which the float32 merge
does not reproduce. That gap is not a merge error, so it is reported rather than checked:
`quantized_stack_diff` is the merged model against the stack on the quantized base, next to
`quantization_error`, the same difference for the bare base, which is what it should be close to.
For into="adapter" the merged adapter can be run on the quantized base too; there the two agree
up to rounding, and that comparison is checked against the tolerance as well.

The result is written to a temporary sibling of `out_dir`, `.NAME.partial-PID-XXXX`, and renamed
into place only after the check passes; on any failure nothing is left at `out_dir`. The merge
holds an flock on a file inside its temporary folder while it works. A merge killed with `kill -9`
(or by the OOM killer) cannot remove its folder, which is as large as the model, so the next merge
into the same parent folder removes every such folder whose owner has gone (its lock is free, or
its pid is dead), and says so (`remove_stale_partials`).
"""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdcli.core.atomic import swap_folder
from sdcli.core.errors import DiskFullError, UserError, is_disk_full, write_error
from sdcli.models.quantization import QUANTIZATIONS
from sdcli.models.stack import WEIGHTS_FILE, adapter_dir_problems, attach_stack

DEFAULT_TOLERANCE = 1e-3
DEFAULT_PROBE_PROMPTS = [
    "Hello! Who are you?",
    "What is 17 times 23? Explain your steps.",
    "Write one sentence about the sea.",
]
MAX_PROBE_TOKENS = 256
META_FILE = "sd_merge.json"
PARTIAL, REPLACED = ".partial-", ".replaced-"
OWNER_FILE = ".sd-merge-owner"
LEGACY_STALE_SECONDS = 3600
INTO_CHOICES = ("model", "adapter")
QUANTIZATION_CHOICES = QUANTIZATIONS

LoadBase = Callable[[Path, str], torch.nn.Module]


class MergeCheckError(UserError):
    """The merged result does not reproduce the stack within the tolerance; `report` has the numbers."""

    def __init__(self, report: "MergeReport"):
        self.report = report
        super().__init__(
            "The merge check failed; nothing was written to " + str(report.out_dir) + ".",
            report.lines(),
            hint="If the tolerance is simply too tight for this model, raise it with --tolerance; "
            "otherwise this is a bug worth reporting.",
        )


@dataclass
class MergeReport:
    out_dir: Path
    into: str
    quantization: str
    adapters: list[str]
    tolerance: float
    probe_prompts: int
    probe_tokens: int
    max_abs_diff: float = math.nan  # merged (reloaded) vs stack, both on the float32 base: checked
    adapter_effect: float = math.nan  # stack vs bare base, float32: what the check can see
    quantized_stack_diff: float | None = None  # merged vs stack on the quantized base
    quantization_error: float | None = None  # bare quantized base vs bare float32 base
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def lines(self) -> list[str]:
        out = [
            f"merged {len(self.adapters)} adapter(s) into a{'n adapter' if self.into == 'adapter' else ' model'}",
            f"probe: {self.probe_prompts} prompt(s), {self.probe_tokens} token(s)",
            f"max |logit diff| merged vs stack (float32 base): {self.max_abs_diff:.3g} (tolerance {self.tolerance:g})"
            + ("" if self.checks.get("float32", False) else "  FAILED"),
            f"adapter effect, max |logit diff| stack vs bare base: {self.adapter_effect:.3g}",
        ]
        if self.quantized_stack_diff is not None:
            if self.into == "adapter":
                out.append(
                    f"max |logit diff| merged vs stack ({self.quantization} base): {self.quantized_stack_diff:.3g}"
                    + ("" if self.checks.get("quantized", False) else "  FAILED")
                )
            else:
                out.append(
                    f"max |logit diff| merged model vs stack on the {self.quantization} base as trained: "
                    f"{self.quantized_stack_diff:.3g} (quantization alone: {self.quantization_error:.3g}; not checked)"
                )
        if self.adapter_effect < 10 * max(self.tolerance, 0.0):
            out.append("note: the adapters barely change the logits, so the check cannot tell a merge from none")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["passed"] = self.passed
        return d


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
    probes = _encode_probes(tokenizer, prompts)
    report = MergeReport(
        out_dir=out_dir,
        into=into,
        quantization=quantization,
        adapters=[str(d) for d in dirs],
        tolerance=float(tolerance),
        probe_prompts=len(probes),
        probe_tokens=sum(p.shape[1] for p in probes),
    )

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL}{os.getpid()}-", dir=out_dir.parent))
    except OSError as e:
        raise write_error(e, out_dir) or e from None
    owner = None
    try:
        owner = _hold(tmp)
        with torch.no_grad():
            _merge_and_check(base_path, dirs, tmp, into, quantization, probes, tokenizer, load, report)
        (tmp / META_FILE).write_text(json.dumps(report.to_dict() | {"out_dir": str(out_dir)}, indent=2) + "\n")
        if not report.passed:
            raise MergeCheckError(report)
        os.close(owner)  # the lock file leaves with the folder
        owner = None
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        _publish(tmp, out_dir, force)
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


# ---------------------------------------------------------------------------------------------
# Litter from killed merges


def _hold(tmp: Path) -> int:
    """Lock `tmp` as this merge's: an flock on a file inside it, released by the kernel however the
    process ends, so that a later merge can tell a live merge's folder from a dead one's."""
    fd = os.open(tmp / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _owner_alive(folder: Path) -> bool:
    """Whether the merge that made `folder` (a partial or replaced sibling of an output) still runs."""
    lock = folder / OWNER_FILE
    if lock.is_file():
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return True  # cannot tell: leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # nobody holds it
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    match = re.match(r"^\.(?:.*)\.(?:partial|replaced)-(\d+)-", folder.name)
    if match:  # no lock file (killed before it was made, or a folder being replaced): the pid decides
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # made by an sd that put no pid in the name: stale once nothing has touched it for a while
    try:
        return time.time() - folder.stat().st_mtime < LEGACY_STALE_SECONDS
    except OSError:
        return True


def remove_stale_partials(out_dir: Path | str) -> list[str]:
    """Remove the temporary folders that killed merges left beside `out_dir`; one line each.

    Folders of merges into `out_dir` itself (`.NAME.partial-*`, `.NAME.replaced-*`) go when their
    owner has gone; those of merges into other outputs in the same folder only when they hold a
    merge's lock file that nobody holds (a folder of that shape without one may be someone else's).
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    ours = {*parent.glob(f".{glob.escape(out_dir.name)}{PARTIAL}*"), *parent.glob(f".{glob.escape(out_dir.name)}{REPLACED}*")}
    others = {p for p in parent.glob(f".*{PARTIAL}*") if (p / OWNER_FILE).is_file()} - ours
    lines = []
    for folder in sorted(ours | others):
        if not folder.is_dir() or folder.is_symlink() or _owner_alive(folder):
            continue
        if REPLACED in folder.name and not out_dir.exists() and not out_dir.is_symlink():
            # killed between the two renames of `_publish`: this is the previous output, the only copy
            lines.append(f"kept {folder}: it holds the previous {out_dir}, from a merge killed while replacing it; "
                         f"move it back (mv {folder} {out_dir}) or delete it")
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            lines.append(f"removed {folder}, {size / 2**20:.1f} MB left by a merge that was killed")
    return lines


# ---------------------------------------------------------------------------------------------
# The merge and its check


def _merge_and_check(base_path, dirs, tmp, into, quantization, probes, tokenizer, load, report) -> None:
    model = _load_float32(load, base_path)
    base_logits = _logits(model, probes)
    stack, names = attach_stack(model, dirs)
    stack_logits = _logits(stack, probes)
    report.adapter_effect = _max_abs_diff(stack_logits, base_logits)

    if into == "model":
        merged = stack.merge_and_unload(safe_merge=True, adapter_names=names)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, stack, model
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    else:
        state, config = _concat_adapters(stack, names, base_path)
        del stack, model
        _save_adapter(tmp, state, config)
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(_load_float32(load, base_path), str(tmp))
    merged_logits = _logits(reloaded, probes)
    del reloaded
    report.max_abs_diff = _max_abs_diff(merged_logits, stack_logits)
    report.checks["float32"] = report.max_abs_diff <= report.tolerance

    if quantization != "none":
        qmodel = load(base_path, quantization)
        report.quantization_error = _max_abs_diff(_logits(qmodel, probes), base_logits)
        qstack, names = attach_stack(qmodel, dirs)
        qstack_logits = _logits(qstack, probes)
        if into == "model":
            report.quantized_stack_diff = _max_abs_diff(merged_logits, qstack_logits)
        else:
            qstack.load_adapter(str(tmp), adapter_name="merged", is_trainable=False)
            qstack.base_model.set_adapter(["merged"], inference_mode=True)
            report.quantized_stack_diff = _max_abs_diff(_logits(qstack, probes), qstack_logits)
            report.checks["quantized"] = report.quantized_stack_diff <= report.tolerance
        del qstack, qmodel


def _concat_adapters(stack, names: list[str], base_path: Path) -> tuple[dict[str, torch.Tensor], object]:
    """One LoRA equal to the active stack: A = [A_1; A_2; ...], B = [s_1 B_1, s_2 B_2, ...], scaling 1.

    Modules targeted by fewer adapters are zero-padded to the common rank (exact: zero rows of A
    meet zero columns of B).
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    configs = [stack.peft_config[n] for n in names]
    unsupported = []
    for n, c in zip(names, configs):
        if getattr(c, "use_dora", False):
            unsupported.append(f"{n}: DoRA")
        if getattr(c, "bias", "none") != "none" or getattr(c, "lora_bias", False):
            unsupported.append(f"{n}: trained biases")
        if getattr(c, "modules_to_save", None):
            unsupported.append(f"{n}: modules_to_save {c.modules_to_save}")

    prefix = "base_model.model."
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, module in stack.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [n for n in names if n in module.lora_A]
        if any(n in module.lora_embedding_A for n in names):
            unsupported.append(f"{module_name}: LoRA on an embedding")
        if not present:
            continue
        if any(module.lora_A[n].weight.ndim != 2 for n in present) or any(n in module.lora_variant for n in present):
            unsupported.append(f"{module_name}: not a plain linear LoRA")
            continue
        a = torch.cat([module.lora_A[n].weight.detach().float() for n in present], dim=0)
        b = torch.cat([module.lora_B[n].weight.detach().float() * module.scaling[n] for n in present], dim=1)
        blocks[module_name.removeprefix(prefix)] = (a, b)
    if unsupported:
        raise UserError(
            "These adapters cannot be folded into a single LoRA adapter:",
            sorted(set(unsupported)),
            hint="Merge into a model instead (--into model).",
        )

    rank = max(a.shape[0] for a, _ in blocks.values())
    state = {}
    for name, (a, b) in blocks.items():
        pad = rank - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        state[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
        state[f"{prefix}{name}.lora_B.weight"] = b.contiguous()

    first = configs[0]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the s_i are folded into B
        use_rslora=False,
        lora_dropout=0.0,
        bias="none",
        target_modules=_target_modules(stack, set(blocks), prefix),
        fan_in_fan_out=first.fan_in_fan_out,
        task_type=first.task_type,
        base_model_name_or_path=first.base_model_name_or_path or str(base_path),
    )
    return state, config


def _target_modules(stack, targeted: set[str], prefix: str) -> list[str]:
    """Short names ("q_proj") when they pick exactly the targeted modules, else full module paths."""
    from peft.tuners.lora import LoraLayer

    leaves = {name.rsplit(".", 1)[-1] for name in targeted}
    matching = {
        name.removeprefix(prefix)
        for name, module in stack.named_modules()
        if name.startswith(prefix)
        and name.rsplit(".", 1)[-1] in leaves
        and isinstance(module, (torch.nn.Linear, LoraLayer))
    }
    return sorted(leaves) if matching == targeted else sorted(targeted)


def _save_adapter(folder: Path, state: dict[str, torch.Tensor], config) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(str(folder))
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Helpers


def _load_float32(load: LoadBase, base_path: Path):
    model = load(base_path, "none")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return model


def _encode_probes(tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    probes = []
    for i, prompt in enumerate(prompts, 1):
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise UserError(f"Probe prompt {i} is empty after tokenization.")
        probes.append(ids[:, -MAX_PROBE_TOKENS:])
    return probes


def _logits(model, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()  # no dropout in the comparison
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device), use_cache=False).logits.float().cpu() for ids in probes]


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    # torch's max propagates NaN, so a NaN anywhere fails the check (NaN <= tol is False)
    return torch.stack([(x - y).abs().max() for x, y in zip(a, b)]).max().item()


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


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Move the checked result into place; an existing out_dir (force) is swapped out, then removed."""
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise UserError(f"{out_dir} appeared while merging; not overwriting it.", hint="Pass --force to replace it.")
    swap_folder(tmp, out_dir, aside=tmp.with_name(tmp.name.replace(PARTIAL, REPLACED)))
