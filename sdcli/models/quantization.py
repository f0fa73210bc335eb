"""How sd quantizes a base model: one definition, for training (sdcli.models.model), merge
(sdcli.models.merge) and the checks (benchmarks/cuda_check.py loads through sdcli.models.model).

  4bit  bitsandbytes NF4 with double quantization (the per-block scales are quantized too), the
        matmuls computed in the model's dtype, the 4-bit codes stored as uint8.
  8bit  bitsandbytes LLM.int8.

`load_model` is the only way sd loads a base: it applies `quantization_config` and then
`keep_4bit_weights_unpacked`, so a base loaded for training and the same base loaded for a merge
hold the same quantized weights and run them through the same kernels.

Why `keep_4bit_weights_unpacked` (bitsandbytes 0.50): on a CPU with AVX512-BF16, and only there,
`Linear4bit.forward` in eval mode with an input that needs no gradient rewrites the layer's weight
in place into a kernel layout with bfloat16 block scales (`_convert_weight_packed_for_cpu`), and
from then on every forward of that layer, gradient or not, goes through that kernel:
  - it computes in bfloat16 whatever the compute dtype is, and it has no autograd formula, so
    after the first no-grad forward (the teacher, sampling) no gradient flows back through the
    frozen 4-bit weights to the adapters below them;
  - `state_dict()` (peft calls it to load or save an adapter) unpacks the weights in place with
    `_convert_weight_packed_for_cpu_inverse`, which is lossy: without double quantization it leaves
    the block scales transposed, so the next forward repacks them onto the wrong blocks; with double
    quantization it quantizes the already bfloat16-rounded scales again. Either way the base changes
    under a model that is in use: merging 4-bit runs failed their own check by 2.6 (single
    quantization) or 0.27 (double) in logits on such CPUs, where the same check is ~1e-5 elsewhere.
Turning that path off gives every x86-64 CPU the same portable path (dequantize to the compute
dtype, then a plain matmul, with autograd), which is what the other CPUs and CUDA (its own
kernels) do anyway. CPU 4-bit is for memory, not speed (see `sdcli.models.model.load_base`).
"""

from __future__ import annotations

from pathlib import Path

import torch

QUANTIZATIONS = ("none", "4bit", "8bit")


def quantization_config(quantization, dtype: torch.dtype):
    """The BitsAndBytesConfig a base is loaded with for `quantization` ("none", "4bit", "8bit", or a
    `sdcli.recipe.sections.Quantization`), computing in `dtype`; None for "none"."""
    quantization = getattr(quantization, "value", quantization)
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}")


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU fast path on every 4-bit layer (see the module doc).

    Returns how many layers it set. Call it before the first forward: a layer already packed stays
    packed. A no-op for models without 4-bit layers or without bitsandbytes.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_model(path: Path | str, quantization, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` in `dtype`, quantized as `quantization_config` says.

    `kwargs` go to from_pretrained (device_map, trust_remote_code, ...).
    """
    from transformers import AutoModelForCausalLM

    config = quantization_config(quantization, dtype)
    if config is not None:
        kwargs["quantization_config"] = config
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    keep_4bit_weights_unpacked(model)
    return model
