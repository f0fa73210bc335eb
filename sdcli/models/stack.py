"""Stacking episode adapters: base + LoRA_1 + ... + LoRA_k, all active at once.

Each episode leaves one LoRA adapter in standard PEFT format in its folder. Episode k trains on
top of the base plus adapters 1..k-1, which are loaded under the names ep001, ep002, ... and are
active and frozen. Every active LoRA adds its own term to a layer's output,

    y = W x + sum_i s_i * B_i A_i x        (s_i = lora_alpha_i / r_i, or / sqrt(r_i) with rsLoRA)

which is exactly what peft computes when several adapters are active (`LoraLayer.forward` loops
over `active_adapters`). The stack is therefore the same function as the base with every
s_i * B_i A_i added to its weight; `sdcli.models.merge` folds it that way.

peft pitfalls this module guards against (peft 0.21):
  - `LoraModel.set_adapter(names)` sets requires_grad=True on every adapter it activates and False
    on every other one, unless `inference_mode=True`, which freezes all of them. Neither keeps a
    trainable episode adapter trainable beside frozen ones.
  - `PeftModel.disable_adapter()` re-enables the adapters on exit through the same path, so after
    the `with` block every active adapter is trainable, the frozen stack included.
  - `PeftModel.set_adapter` takes one name only; several active adapters need
    `model.base_model.set_adapter([...])`, and a misspelt name there is silently ignored.
  - `PeftModel.save_pretrained` writes an adapter not named "default" into a subfolder.
`set_active_adapters` and `active_adapters` below set the active set and put every
requires_grad flag back as it should be; `save_adapter` writes one adapter into an episode folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from sdcli.core.atomic import atomic_file, write_atomic
from sdcli.core.errors import DiskFullError, UserError, is_disk_full

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_DAMAGED_HINT = (
    "A half-written episode (for example a run stopped while saving) cannot be loaded. "
    "Rerun that episode, or delete its folder to drop it from the history."
)


def adapter_name(index: int) -> str:
    """Name of the adapter of episode `index` (1-based) inside a stacked model: ep001, ep002, ..."""
    if index < 1:
        raise ValueError(f"episode index starts at 1, got {index}")
    return f"ep{index:03d}"


# ---------------------------------------------------------------------------------------------
# Checking adapter folders


def adapter_dir_problems(path: Path | str) -> list[str]:
    """Everything wrong with an adapter folder, one line each; [] when it is complete and loadable."""
    path = Path(path)
    if not path.exists():
        return ["folder not found"]
    if not path.is_dir():
        return ["not a folder"]
    return _config_problems(path / CONFIG_FILE) + _weights_problems(path / WEIGHTS_FILE)


def check_adapter_dir(path: Path | str) -> None:
    """Raise UserError unless `path` holds a complete LoRA adapter (config and weights both readable).

    Only headers are read: a truncated or half-written file is caught here, before peft sees it.
    """
    problems = adapter_dir_problems(path)
    if problems:
        raise UserError(f"The adapter in {path} is missing or damaged:", problems, hint=_DAMAGED_HINT)


def _config_problems(config_path: Path) -> list[str]:
    if not config_path.is_file():
        return [f"{CONFIG_FILE} is missing"]
    text = config_path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return [f"{CONFIG_FILE} is empty"]
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"{CONFIG_FILE} is not valid JSON (truncated?): {e}"]
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} should hold a JSON object"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"{CONFIG_FILE}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"{CONFIG_FILE}: r should be a positive integer, got {r!r}")
    return problems


def _weights_problems(weights_path: Path) -> list[str]:
    if not weights_path.is_file():
        if (weights_path.parent / "adapter_model.bin").is_file():
            return [f"{WEIGHTS_FILE} is missing (adapter_model.bin is not supported; re-save with safetensors)"]
        return [f"{WEIGHTS_FILE} is missing"]
    size = weights_path.stat().st_size
    if size == 0:
        return [f"{WEIGHTS_FILE} is empty"]
    if size < 8:
        return [f"{WEIGHTS_FILE} is truncated ({size} bytes)"]
    # safe_open checks that the header parses and that the tensors cover the file exactly,
    # which is what a truncated write breaks. The explicit length check gives a clearer message.
    with open(weights_path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    if 8 + header_len > size:
        return [f"{WEIGHTS_FILE} is truncated (its header says {header_len} bytes, the file has {size})"]
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        return [f"{WEIGHTS_FILE} is truncated or corrupt ({e})"]
    if not any(".lora_A." in k for k in keys) or not any(".lora_B." in k for k in keys):
        return [f"{WEIGHTS_FILE} holds no LoRA weights (no lora_A / lora_B tensors)"]
    return []


# ---------------------------------------------------------------------------------------------
# Stacking


def attach_stack(model, adapter_dirs: Sequence[Path | str]):
    """Load every adapter in `adapter_dirs`, in order, as ep001, ep002, ...: all active, all frozen.

    `model` is a plain transformers model (bitsandbytes-quantized or not); it is wrapped in place
    by peft. Returns `(peft_model, names)`; with no adapters, `(model, [])` unchanged. Every
    parameter, base and adapters, ends with requires_grad=False; add the trainable adapter after
    this and activate it with `set_active_adapters`. LoRA dropout of the frozen adapters is
    switched off, so they compute the same function in train() mode as when they were trained
    on top of.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError("attach_stack takes the bare base model; attach the stack before adding other adapters")
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        return model, []

    problems = [f"{d}: {p}" for d in dirs for p in adapter_dir_problems(d)]
    if problems:
        headline = "Cannot load the adapter stack; some episode adapters are missing or damaged:"
        raise UserError(headline, problems, hint=_DAMAGED_HINT)

    names = [adapter_name(i) for i in range(1, len(dirs) + 1)]
    peft_model = None
    for name, d in zip(names, dirs):
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(d), adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(str(d), adapter_name=name, is_trainable=False)
        except (ValueError, RuntimeError) as e:
            # ValueError: target modules not in this model; RuntimeError "size mismatch": other shapes.
            # Any other RuntimeError (out of memory, ...) is not the user's input and propagates.
            if isinstance(e, RuntimeError) and "size mismatch" not in str(e):
                raise
            raise UserError(
                f"Cannot load the adapter in {d} onto this base model:",
                [_first_line(e)],
                hint="Was this episode trained on a different base model?",
            ) from e

    # inference_mode=True: activate all of them and leave every adapter parameter frozen.
    peft_model.base_model.set_adapter(names, inference_mode=True)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    _disable_dropout(peft_model, names)
    return peft_model, names


STACK_ADAPTER = "stack"


def combine_frozen(model, names: Sequence[str]) -> list[str]:
    """Replace the frozen adapters `names` by one adapter, STACK_ADAPTER, that computes their sum.

    sum_i s_i B_i A_i x = [B_1 ... B_k] [s_1 A_1; ...; s_k A_k] x: k adapters of rank r_i are one
    of rank sum(r_i) with scale 1, the same function up to float rounding, with one pair of
    matmuls per layer instead of k. Training on top of earlier episodes paid for each of them in
    every forward and backward (5.2, 7.1 and 9.3 s/step over three episodes). Returns the names
    to activate from now on: [STACK_ADAPTER], or `names` unchanged where they cannot be combined
    (fewer than two, DoRA, embedding adapters or modules_to_save).
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    names = list(names)
    _check_names(model, names)
    configs = [model.peft_config[n] for n in names]
    if len(names) < 2 or any(getattr(c, "use_dora", False) or getattr(c, "modules_to_save", None) for c in configs):
        return names
    layers = {
        key: m for key, m in model.base_model.model.named_modules()
        if isinstance(m, LoraLayer) and any(n in m.lora_A for n in names)
    }
    if any(n in getattr(m, "lora_embedding_A", {}) for m in layers.values() for n in names):
        return names
    ranks = {key: sum(m.lora_A[n].weight.shape[0] for n in names if n in m.lora_A) for key, m in layers.items()}
    pattern = {re.escape(key): r for key, r in ranks.items()}
    r = max(ranks.values())
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=pattern,  # alpha = r: scale 1
        target_modules=sorted(layers), lora_dropout=0.0, bias="none", init_lora_weights=False,
    )
    model.add_adapter(STACK_ADAPTER, config)
    with torch.no_grad():
        for m in layers.values():
            present = [n for n in names if n in m.lora_A]
            a = torch.cat([m.lora_A[n].weight * m.scaling[n] for n in present], dim=0)
            b = torch.cat([m.lora_B[n].weight for n in present], dim=1)
            if m.scaling[STACK_ADAPTER] != 1.0 or m.lora_A[STACK_ADAPTER].weight.shape != a.shape:
                raise RuntimeError(f"combining the stack: unexpected adapter shape or scale in {type(m).__name__}")
            m.lora_A[STACK_ADAPTER].weight.copy_(a)
            m.lora_B[STACK_ADAPTER].weight.copy_(b)
    model.base_model.set_adapter([STACK_ADAPTER], inference_mode=True)
    for name in names:
        model.delete_adapter(name)
    for p in model.parameters():
        p.requires_grad_(False)
    _disable_dropout(model, [STACK_ADAPTER])
    return [STACK_ADAPTER]


def set_active_adapters(model, names: Sequence[str], trainable: Sequence[str] = ()) -> None:
    """Make exactly `names` active; afterwards only the adapters in `trainable` have requires_grad=True.

    For the training loop: after `attach_stack` and `model.add_adapter(new, config)`, call
    `set_active_adapters(model, stack_names + [new], trainable=[new])`. Base weights stay as they are.
    """
    names, trainable = list(names), list(trainable)
    _check_names(model, names + trainable)
    if not set(trainable) <= set(names):
        raise ValueError(f"trainable adapters {sorted(set(trainable) - set(names))} are not among the active ones")
    model.base_model.set_adapter(names, inference_mode=True)  # all adapters frozen
    if trainable:
        model.base_model.set_requires_grad(trainable, requires_grad=True)


@contextlib.contextmanager
def active_adapters(model, names: Sequence[str]) -> Iterator[None]:
    """Temporarily run `model` with exactly the adapters `names` active; [] runs the bare base model.

    On exit the previous active set is restored, and so is every parameter's requires_grad flag;
    inside the block the flags are also as they were (switching adapters never makes a frozen one
    trainable or the trainable one frozen). Adapters merged into the weights are unmerged by peft.
    """
    names = list(names)
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        if names:
            raise ValueError(f"model has no adapters; cannot activate {names}")
        yield
        return
    _check_names(model, names)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    previous = list(model.base_model.active_adapters)

    def restore_flags() -> None:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)

    try:
        with contextlib.ExitStack() as stack:
            if names:
                model.base_model.set_adapter(names)
            else:
                stack.enter_context(model.disable_adapter())
            restore_flags()
            yield
        # leaving disable_adapter() re-enabled the adapters (and flipped their requires_grad)
    finally:
        if list(model.base_model.active_adapters) != previous:
            model.base_model.set_adapter(previous)
        restore_flags()


def save_adapter(model, name: str, folder: Path | str) -> Path:
    """Write adapter `name` of a PeftModel as a standalone PEFT adapter directly in `folder`.

    peft's `save_pretrained` puts any adapter not called "default" into `folder/<name>/`; episodes
    keep theirs at the top of the episode folder. Weights are written first and the config last,
    each to a temporary file renamed into place, so a folder whose config exists has complete
    weights (and `check_adapter_dir` catches the rest).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=name)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    try:
        with atomic_file(folder / WEIGHTS_FILE) as partial:
            save_file(state, str(partial), metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a full disk only in its message
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(folder / WEIGHTS_FILE) from None
        raise

    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    if isinstance(config.target_modules, (set, frozenset)):
        # peft keeps a set, whose order follows Python's per-process string hashing: sorted, two
        # identical runs write identical configs (and adapter_config_sha256 agrees)
        config.target_modules = sorted(config.target_modules)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model.get_base_model(), "name_or_path", None)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".config-") as tmp:  # peft writes into a folder
        config.save_pretrained(tmp)
        write_atomic(folder / CONFIG_FILE, (Path(tmp) / CONFIG_FILE).read_bytes())
    return folder


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_names(model, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; the model has {sorted(model.peft_config)}")


def _disable_dropout(peft_model, names: Sequence[str]) -> None:
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                if name in module.lora_dropout:
                    module.lora_dropout[name] = torch.nn.Identity()
