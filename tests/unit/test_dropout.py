"""Dropout: the teacher is a fixed target, and the student has no dropout but its own LoRA's.

`model.train()` switched on the base model's attention dropout in both roles, and the live and EMA
teachers' LoRA dropout: two teacher passes over the same input differed.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from sdcli.models.activation_memory import enable_activation_checkpointing
from sdcli.models.model import add_trainable_adapter, eval_mode, load_base, student_train_mode
from sdcli.models.sequences import response_hidden, score_batch
from sdcli.recipe.sections import LoraSettings, ModelConfig
from sdcli.training.teacher import EMA_ADAPTER, add_ema_adapter, teacher_hidden

EPISODE = "ep001"


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-dropout"), attention_dropout=0.5)


def student_and_teacher(model_dir, lora_dropout: float):
    loaded = load_base(ModelConfig(name_or_path=str(model_dir)), torch.device("cpu"))
    model = add_trainable_adapter(loaded.model, EPISODE, LoraSettings(r=4, alpha=8, dropout=lora_dropout))
    add_ema_adapter(model, EPISODE, LoraSettings(r=4, alpha=8, dropout=lora_dropout))
    with torch.no_grad():  # B starts at zero, where LoRA dropout has nothing to drop
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    student_train_mode(model, EPISODE)
    batch = score_batch([[1, 2, 3, 4, 5, 6]] * 2, [[7, 8, 9, 10]] * 2, 0, torch.device("cpu"))
    return model, model.get_base_model().get_decoder(), batch


@pytest.mark.parametrize("adapters", [[EPISODE], [EMA_ADAPTER], []], ids=["live", "ema", "base"])
def test_two_teacher_passes_are_identical(dropout_model_dir, adapters):
    model, decoder, batch = student_and_teacher(dropout_model_dir, lora_dropout=0.5)
    first = teacher_hidden(model, decoder, batch, adapters)
    assert torch.equal(first, teacher_hidden(model, decoder, batch, adapters))
    with eval_mode(model):  # and it is the model in eval mode
        assert torch.equal(first, teacher_hidden(model, decoder, batch, adapters))


def test_the_student_has_no_dropout_of_the_base_model(dropout_model_dir):
    model, decoder, batch = student_and_teacher(dropout_model_dir, lora_dropout=0.0)
    assert torch.equal(response_hidden(decoder, batch), response_hidden(decoder, batch))  # attention_dropout=0.5 is off
    with torch.no_grad():
        assert torch.equal(response_hidden(decoder, batch), teacher_hidden(model, decoder, batch, [EPISODE]))


def test_the_students_lora_dropout_still_acts_and_survives_the_teacher_and_sampling(dropout_model_dir):
    from sdcli.models.rollout import SamplingSettings, sample_responses
    from transformers import AutoTokenizer

    model, decoder, batch = student_and_teacher(dropout_model_dir, lora_dropout=0.5)
    assert not torch.equal(response_hidden(decoder, batch), response_hidden(decoder, batch))
    training = {name for name, m in model.named_modules() if m.training}
    assert training and all(name.endswith(f"lora_dropout.{EPISODE}") for name in training)
    teacher_hidden(model, decoder, batch, [EPISODE])
    sample_responses(model, AutoTokenizer.from_pretrained(dropout_model_dir), [[1, 2, 3]],
                     SamplingSettings(3, 1.0, 1.0, 0, merge=True), {0})
    assert {name for name, m in model.named_modules() if m.training} == training


def test_activation_checkpointing_recomputes_in_eval_mode_with_the_same_gradient(dropout_model_dir):
    """transformers checkpoints a layer only in training mode; sd's student is in eval mode but for
    its LoRA dropout, so it wraps the layers itself. The dropout masks are replayed exactly."""
    grads = []
    for fraction in (0.0, 1.0):
        torch.manual_seed(0)
        model, decoder, batch = student_and_teacher(dropout_model_dir, lora_dropout=0.5)
        assert enable_activation_checkpointing(model, fraction) == (2 if fraction else 0)
        layer = decoder.layers[0]
        calls = []
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
        torch.manual_seed(1)
        response_hidden(decoder, batch).square().sum().backward()
        assert len(calls) == (2 if fraction else 1)  # recomputed in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
