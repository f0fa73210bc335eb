"""What the student's backward pass keeps from its forward, decided per decoder layer.

Two ways to keep less, both exact:

- activation checkpointing (`train.gradient_checkpointing`): the layer keeps only its input and
  runs its forward again in backward; the most memory saved, about one more forward in time.
- recomputed cheap tensors (every other layer): with the base frozen, most of what a layer keeps is
  the inputs of its LoRA A matrices, which their gradients need. Two of them are cheap to make
  again from tensors backward keeps anyway: a norm's output (from the norm's input, which the norm
  keeps) and a gated MLP's product act(gate) * up (from gate and up, which its own gradient
  needs). Backward recomputes them when it reaches them. On SmolLM2 that is 4 of the ~11 numbers
  per hidden unit a layer keeps for each token (`benchmarks/step_speed.py` has the peak RSS).

The recomputation goes through `torch.autograd.graph.saved_tensors_hooks` around the module that
consumes the tensor, so whatever saves it (peft's LoRA, a DoRA or quantized layer, several adapters)
gets it back as it was; a tensor saved any other way is simply kept, as before.
"""

from __future__ import annotations

import torch

GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Olmo2MLP",
                        "GraniteMLP"})  # forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), as transformers 5 writes it


def enable_activation_checkpointing(model, fraction: float) -> int:
    """Recompute the activations of `fraction` of the decoder layers in backward, spread evenly.

    Checkpointing every layer saves the most memory and costs about one more forward; a fraction
    trades the two smoothly. Returns how many layers are checkpointed. The layers are wrapped here,
    not through transformers' `gradient_checkpointing_enable`, which checkpoints a layer only in
    training mode: the student runs in eval mode but for its LoRA dropout (`student_train_mode`).
    The dropout masks are the same in the recomputation (the RNG state is restored).
    """
    if fraction <= 0:
        return 0
    chosen = 0
    for i, layer in enumerate(decoder_layers(model)):
        if int((i + 1) * fraction) > int(i * fraction):
            layer.forward = _checkpointed(layer.forward)
            layer.sd_checkpointed = True
            chosen += 1
    return chosen


def recompute_cheap_activations(model) -> int:
    """In every decoder layer that is not checkpointed, let backward recompute the norms' outputs
    and the gated MLP's product instead of keeping them. Returns how many layers do."""
    changed = 0
    for layer in decoder_layers(model):
        if getattr(layer, "sd_checkpointed", False):  # keeps nothing inside already
            continue
        pairs = [(getattr(layer, norm, None), getattr(layer, consumer, None))
                 for norm, consumer in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))]
        pairs = [(norm, consumer) for norm, consumer in pairs if norm is not None and consumer is not None]
        for norm, consumer in pairs:
            _recompute_input(norm, consumer)
        changed += bool(pairs)
    return changed


def decoder_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from sdcli.models.model import base_model

    return [m for m in base_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled():  # without gradients there is no backward to recompute for
            from torch.utils.checkpoint import checkpoint

            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


class _Recomputed:
    """The tensors of one module call that backward recomputes, found by the storage they share.

    Each registered tensor is alive for the whole call (an argument, or a local the call is still
    using), so a saved tensor on the same storage is that tensor or a view of it, never a new
    tensor that reused freed memory."""

    def __init__(self):
        self.by_storage: dict[int, _Recipe] = {}

    def add(self, tensor: torch.Tensor, recompute) -> None:
        self.by_storage[tensor.untyped_storage().data_ptr()] = _Recipe(recompute)

    def pack(self, saved: torch.Tensor):
        recipe = self.by_storage.get(saved.untyped_storage().data_ptr())
        if recipe is None:
            return saved
        recipe.pending += 1
        return recipe, saved.shape, saved.stride(), saved.storage_offset()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        recipe, size, stride, offset = packed
        return recipe.take().as_strided(size, stride, offset)


class _Recipe:
    """Recomputes a tensor once for all the nodes that saved it (q, k and v share one norm output):
    the result is held until the last of them has taken it."""

    def __init__(self, recompute):
        self.recompute, self.pending, self.value = recompute, 0, None

    def take(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.recompute()
        value = self.value
        self.pending -= 1
        if self.pending <= 0:
            self.value = None
        return value


def _recompute_input(norm: torch.nn.Module, consumer: torch.nn.Module) -> None:
    """`consumer` receives `norm`'s output (a pre-norm decoder layer): inside its call, every save
    of that output becomes a recomputation of the norm from its input. A gated MLP also recomputes
    its product. Where the consumer is handed something else (another layout), only that stays."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # the norm's last (input, output) with gradients on

    def remember(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            seen[:] = [(args[0].detach(), output)]

    norm.register_forward_hook(remember)
    original = consumer.forward
    gated = type(consumer).__name__ in GATED_MLPS and hasattr(consumer, "act_fn")

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        recomputed = _Recomputed()
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if seen and hidden is seen[0][1]:
            norm_input = seen[0][0]
            recomputed.add(hidden, lambda: norm.forward(norm_input))
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(recomputed.pack, _Recomputed.unpack):
            return _gated_mlp(consumer, hidden, recomputed) if gated else original(*args, **kwargs)

    consumer.forward = run


def _gated_mlp(mlp, x: torch.Tensor, recomputed: _Recomputed) -> torch.Tensor:
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    product = _GatedProduct.apply(mlp.act_fn, gate, up)
    gate, up = gate.detach(), up.detach()
    recomputed.add(product, lambda: mlp.act_fn(gate) * up)
    return mlp.down_proj(product)


class _GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up only (autograd would also keep act(gate) and the product)."""

    @staticmethod
    def forward(ctx, act, gate, up):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_()
            activated = ctx.act(leaf)
        (d_gate,) = torch.autograd.grad(activated, leaf, grad * up)
        return None, d_gate, grad * activated.detach()
