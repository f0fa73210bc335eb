"""The folding math: a history of LoRA adapters as one model or one adapter.

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
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdcli.core.errors import UserError
from sdcli.models.stack import WEIGHTS_FILE


def concat_adapters(stack, names: list[str], base_path: Path) -> tuple[dict[str, torch.Tensor], object]:
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


def save_adapter(folder: Path, state: dict[str, torch.Tensor], config) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(str(folder))
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
