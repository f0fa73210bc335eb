"""lora.b_lr_ratio (LoRA+): the B matrices learn at train.lr times the ratio, everything else at train.lr."""

from __future__ import annotations

import pytest
import torch


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def test_ratio_one_is_one_group_of_every_parameter(tiny_llama_dir):
    from sdcli.models.model import trainable_parameters
    from sdcli.training.setup import lora_param_groups

    model = _lora_model(tiny_llama_dir)
    params = trainable_parameters(model)
    groups = lora_param_groups(model, params, 1e-3, 1.0)
    assert len(groups) == 1 and groups[0]["params"] == params


def test_b_matrices_take_the_ratio_and_a_step_moves_them_that_much_more(tiny_llama_dir):
    """Adam's first step moves each parameter by lr * sign(grad): B (zero at the start, so A's
    gradient is zero) moves by lr * ratio, not lr, and the schedule's factor applies to both groups."""
    from sdcli.models.model import trainable_parameters
    from sdcli.training.setup import lora_param_groups

    lr, ratio = 1e-3, 8.0
    model = _lora_model(tiny_llama_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    params = trainable_parameters(model)
    a_group, b_group = lora_param_groups(model, params, lr, ratio)
    assert b_group["lr"] == lr * ratio and "lr" not in a_group
    assert all(".lora_B." in names[id(p)] for p in b_group["params"])
    assert all(".lora_B." not in names[id(p)] for p in a_group["params"])
    assert len(a_group["params"]) + len(b_group["params"]) == len(params) and b_group["params"]

    optimizer = torch.optim.AdamW([a_group, b_group], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # e.g. a warm-up factor
    assert scheduler.get_last_lr() == pytest.approx([lr * 0.5, lr * ratio * 0.5])
    before = [p.detach().clone() for p in b_group["params"]]
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(b_group["params"], before)])
    assert float(moved.max()) == pytest.approx(lr * ratio * 0.5, rel=1e-3)
