"""Sampling from int8 copies of the linear weights, on a CPU.

At a few sequences per step every new token reads every weight once, so CPU decoding is bound by
memory bandwidth. An int8 weight is a quarter of the bytes of a float32 one, and PyTorch's dynamic
int8 linear (fbgemm: weights quantized per output channel, activations to uint8 per call) ran the
SmolLM2-135M layers 3-5x and its 49152x576 LM head ~18x faster than float32 on our 2-core machine.

What is quantized, and when:
- the base linear layers and the LM head. The LM head is tied to the embeddings in SmolLM2: a copy
  is quantized, and no float weight is ever written. The MLP output projections' inputs carry the
  outliers (`MLP_OUTPUT_NAMES`): there the input columns beyond `OUTLIER_THRESHOLD` are computed in
  float against the float weight's columns, and only the rest in int8.
- once per episode, not per step: the base is frozen, so the int8 copy is made at the first
  sampling call and reused for as long as the float weight tensor is the same, unchanged one.
- the LoRA adapters stay in float and run unfused beside the int8 base, so the adapter being
  trained is sampled exactly as it stands (folding it in would mean quantizing again every step;
  README "Speed and memory" has both measured).
- for the decoding steps only: the prompt pass stays in float (`int8_linear` says why).

The sampler is then a slightly different policy from the student being trained. Only which tokens
are drawn changes: the loss scores them again with the float model.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from contextlib import contextmanager

import torch

from sdcli.core.errors import UserError

# first float linear -> {ids of the linears packed together: (their weights, the weights' storage and
# version when packed, the int8 copy)}; weak keys, so the copies go when the model does
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sample_in_int8(choice: str, device: torch.device, quantized: bool, sampled_support: bool) -> bool:
    """`rollout.sample_precision` resolved for this run. auto: int8 on a CPU with a float base,
    except for loss.support=sampled, whose estimator needs samples from the float student itself
    (an explicit int8 with it is refused by the recipe check)."""
    if choice == "float":
        return False
    if choice == "int8" and device.type != "cpu":
        raise UserError(f"rollout.sample_precision=int8 runs on a CPU only (its kernels are fbgemm's); this run is on {device.type}.",
                        hint="Use rollout.sample_precision=auto or float.")
    if choice == "int8" and not _kernels_available():
        raise UserError("rollout.sample_precision=int8 needs PyTorch's fbgemm int8 kernels, which this build of torch lacks.",
                        hint="Use rollout.sample_precision=auto or float.")
    return choice == "int8" or (device.type == "cpu" and not quantized and not sampled_support and _kernels_available())


def _kernels_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None):
    """A float [out, in] weight -> fbgemm's packed int8 copy: symmetric, one scale per output row."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao; no kernel replaces this one yet
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


def int8_linear(packed, linear: torch.nn.Linear, x: torch.Tensor, outliers: bool = False) -> torch.Tensor:
    """x [..., positions, in]: one new position per row (a decoding step) in int8; more (the prompt) in float.

    fbgemm quantizes the whole input with one scale, and a prompt holds the few positions with
    "massive activations" (MLP inputs in SmolLM2 reach ~3000 against a typical 0.2): with them in
    the same tensor every other position rounds to a handful of levels. The prompt
    pass is one compute-bound forward, so float costs little there; the decoding steps are the
    bandwidth-bound part that int8 speeds up.
    """
    if x.dim() > 2 and x.shape[-2] > 1:
        return torch.nn.functional.linear(x, linear.weight, linear.bias)
    return int8_matmul_outliers_in_float(x, packed, linear.weight) if outliers else int8_matmul(x, packed)


def int8_matmul(x: torch.Tensor, packed) -> torch.Tensor:
    """x [..., in] times the packed int8 weight (and its bias), the input quantized per call."""
    return torch.ops.quantized.linear_dynamic(x.float(), packed, _seven_bit_activations()).to(x.dtype)


def int8_matmul_outliers_in_float(x: torch.Tensor, packed, weight: torch.Tensor,
                                  threshold: float | None = None) -> torch.Tensor:
    """int8_matmul, but the input columns holding a value beyond `threshold` (in any row) are
    computed in float against `weight`'s columns (LLM.int8()'s decomposition), so that the
    outliers do not set the one scale every other input is rounded to."""
    threshold = OUTLIER_THRESHOLD if threshold is None else threshold
    flat = x.reshape(-1, x.shape[-1]).float()
    columns = (flat.abs().amax(0) > threshold).nonzero().squeeze(1)
    if columns.numel() == 0:
        return int8_matmul(x, packed)
    y = int8_matmul(flat.index_fill(1, columns, 0.0), packed) + flat[:, columns] @ weight[:, columns].t().float()
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


@functools.cache
def _seven_bit_activations() -> bool:
    """fbgemm's "reduce_range": without VNNI, x86 adds pairs of uint8 x int8 products in int16
    (vpmaddubsw), which saturates unless the activations keep to 7 bits; AVX512-VNNI accumulates in
    int32 and takes all 8 (on the quickstart prompts that cut the int8 sampler's KL by ~3x)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx512_vnni" not in flags


def packed_copy(*linears: torch.nn.Linear):
    """The int8 copy of `linears` (their weights stacked, in order), made once and reused while each
    weight is the same unchanged tensor."""
    weights = [linear.weight for linear in linears]
    state = tuple((w.data_ptr(), w._version) for w in weights)
    copies = _PACKED.setdefault(linears[0], {})
    key = tuple(id(linear) for linear in linears)
    cached = copies.get(key)
    if cached is not None and all(ref() is w for ref, w in zip(cached[0], weights)) and cached[1] == state:
        return cached[2]
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    packed = pack_int8(torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0], bias)
    copies[key] = ([weakref.ref(w) for w in weights], state, packed)
    return packed


# The MLP's output projection (Llama/Qwen/SmolLM2 names, and Phi's and Falcon's): its input, the
# gated activation, is where the outliers are (max/mean |x| of 300 to 16000 in SmolLM2's layers,
# against ~10 elsewhere), and with one scale per input tensor they cost the most. Its columns with
# an input beyond OUTLIER_THRESHOLD go through float. Measured at 4 rows (the reference step),
# 2026-11-30, KL(float || sampler) per token on the quickstart prompts: the projection in float
# 0.021, all int8 0.042, outliers beyond 32 / 16 / 8 in float 0.030 / 0.028 / 0.028, taking back
# 79% / 70% / 66% of the time int8 saves over float (0.59 s a rollout of 4 x 48 tokens).
MLP_OUTPUT_NAMES = ("down_proj", "fc2", "dense_4h_to_h")
OUTLIER_THRESHOLD = 16.0


def is_mlp_output(name: str) -> bool:
    return name.removesuffix(".base_layer").rsplit(".", 1)[-1] in MLP_OUTPUT_NAMES


def float_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of the plain float nn.Linear layers to sample in int8: the base layers under
    LoRA and the LM head, not LoRA's A and B."""
    from peft.tuners.lora import LoraLayer

    lora = {id(m) for layer in model.modules() if isinstance(layer, LoraLayer)
            for d in (layer.lora_A, layer.lora_B) for m in d.modules()}
    return [(name, m) for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and id(m) not in lora and m.weight.dtype.is_floating_point]


@contextmanager
def int8_for_sampling(model: torch.nn.Module, enabled: bool):
    """Inside the block the base linears of `float_linears` compute with their int8 copies; the LoRA
    layers around them add their float adapters as usual. The float modules and weights are not
    changed: each linear's `forward` is shadowed for the block and restored afterwards."""
    if not enabled:
        yield
        return
    shadowed = []
    try:
        for name, linear in float_linears(model):
            packed, outliers = packed_copy(linear), is_mlp_output(name)
            linear.forward = lambda x, packed=packed, linear=linear, outliers=outliers: int8_linear(packed, linear, x, outliers)
            shadowed.append(linear)
        yield
    finally:
        for linear in shadowed:
            del linear.forward
