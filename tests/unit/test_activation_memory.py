"""Recomputed cheap activations (sdcli.models.activation_memory): the student's gradients are
unchanged, and the tensors backward recomputes are really not kept by the graph."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from sdcli.models.activation_memory import (
    enable_activation_checkpointing,
    recompute_cheap_activations,
)
from sdcli.models.sequences import response_hidden
from test_shared_prefix import WAYS, batch_of, force, projection_loss, tiny_decoder, uneven_rows

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2", "granite", "phi3")


def lora_model(model_type: str, dropout: float = 0.0, adapters: tuple[str, ...] = ("default",)):
    from peft import LoraConfig, get_peft_model

    extra = {"sliding_window": None} if model_type == "mistral" else {}
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(tiny_decoder(model_type, **extra), config, adapter_name=adapters[0])
    for name in adapters[1:]:  # an earlier episode's adapter, frozen, active beside the trained one
        model.add_adapter(name, config)
    model.base_model.set_adapter(list(adapters))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make every LoRA gradient but B's zero
        p.requires_grad_("lora_" in name and f".{adapters[0]}." in name)
    model.eval()
    for name, module in model.named_modules():
        if name.endswith(f"lora_dropout.{adapters[0]}"):
            module.train()  # as sd's student: the trained adapter's dropout only
    return model


def hidden_and_grads(model, way, monkeypatch, seed=1):
    prompts, responses = uneven_rows()
    batch = batch_of(prompts, responses)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    hidden = response_hidden(model.get_base_model().model, force(way, batch, monkeypatch))
    grads = torch.autograd.grad(projection_loss(hidden, batch.response_mask), params)
    return hidden.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_gradients_are_those_of_the_plain_model(model_type, monkeypatch):
    model = lora_model(model_type)
    expected = hidden_and_grads(model, "full", monkeypatch)
    assert recompute_cheap_activations(model) == 2
    hidden, grads = hidden_and_grads(model, "full", monkeypatch)
    assert torch.equal(hidden, expected[0])  # the forward is the same arithmetic
    torch.testing.assert_close(grads, expected[1], rtol=1e-5, atol=1e-6 * float(expected[1].abs().max()))


@pytest.mark.parametrize("way", WAYS[1:])
def test_every_way_of_computing_the_batch(way, monkeypatch):
    model = lora_model("llama")
    expected = hidden_and_grads(model, way, monkeypatch)
    recompute_cheap_activations(model)
    torch.testing.assert_close(hidden_and_grads(model, way, monkeypatch)[1], expected[1], rtol=1e-5,
                               atol=1e-6 * float(expected[1].abs().max()))


def test_with_lora_dropout_and_a_frozen_earlier_adapter(monkeypatch):
    """The dropout's masks are the same (the recomputation draws no random numbers), and every
    adapter that saves the recomputed tensors gets them back."""
    model = lora_model("llama", dropout=0.5, adapters=("ep002", "ep001"))
    expected = hidden_and_grads(model, "packed_shared", monkeypatch)
    recompute_cheap_activations(model)
    hidden, grads = hidden_and_grads(model, "packed_shared", monkeypatch)
    assert torch.equal(hidden, expected[0])
    torch.testing.assert_close(grads, expected[1], rtol=1e-5, atol=1e-6 * float(expected[1].abs().max()))


def kept_after_forward(model) -> list[bool]:
    """Whether each layer's attention norm output and MLP product is still alive once the forward
    is over and only the graph holds what backward needs."""
    decoder = model.get_base_model().model
    refs, handles = [], []
    for layer in decoder.layers:
        handles.append(layer.input_layernorm.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: refs.append(weakref.ref(a[0]))))
    prompts, responses = uneven_rows()
    batch = batch_of(prompts, responses)
    loss = projection_loss(response_hidden(decoder, batch), batch.response_mask)
    gc.collect()
    kept = [ref() is not None for ref in refs]
    loss.backward()  # and backward still runs
    for handle in handles:
        handle.remove()
    return kept


def test_the_recomputed_tensors_are_not_kept():
    model = lora_model("llama")
    assert kept_after_forward(model) == [True] * 4  # the test sees what it claims to: plain autograd keeps them
    recompute_cheap_activations(model)
    assert kept_after_forward(model) == [False] * 4


def test_checkpointed_layers_are_left_to_checkpointing(monkeypatch):
    model = lora_model("llama")
    expected = hidden_and_grads(model, "full", monkeypatch)
    assert enable_activation_checkpointing(model, 0.5) == 1
    assert recompute_cheap_activations(model) == 1
    torch.testing.assert_close(hidden_and_grads(model, "full", monkeypatch)[1], expected[1], rtol=1e-5,
                               atol=1e-6 * float(expected[1].abs().max()))


def test_without_gradients_nothing_changes():
    model = lora_model("llama")
    prompts, responses = uneven_rows()
    batch = batch_of(prompts, responses)
    decoder = model.get_base_model().model
    with torch.no_grad():
        before = response_hidden(decoder, batch)
        recompute_cheap_activations(model)
        assert torch.equal(response_hidden(decoder, batch), before)
