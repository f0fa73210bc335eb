"""One definition of a quantized base (sdcli.models.quantization), the same on every x86-64 CPU.

Training (`sdcli.models.model.load_base`) and merge (`sdcli.models.merge.load_base_model`) must hold the same
4-bit weights, and a 4-bit base must neither change while it is in use nor lose its gradients
after a no-grad forward. On CPUs with AVX512-BF16, bitsandbytes' packed inference path broke both
(see the sdcli.models.quantization doc); on other CPUs those two tests pass trivially.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sdcli.models.merge import load_base_model
from sdcli.models.model import add_trainable_adapter, load_base
from sdcli.recipe.sections import LoraSettings, ModelConfig, Quantization

PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 12]])


def _train_base(model_dir, quantization=Quantization.four_bit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "4-bit on a CPU is slow"
        return load_base(ModelConfig(name_or_path=str(model_dir), quantization=quantization), torch.device("cpu")).model


def _linear4bit(model):
    from bitsandbytes.nn import Linear4bit

    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def _dequantized(model) -> dict[str, torch.Tensor]:
    from bitsandbytes.functional import dequantize_4bit

    return {name: dequantize_4bit(m.weight.data, m.weight.quant_state) for name, m in _linear4bit(model).items()}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def test_one_construction_site_for_the_bitsandbytes_config():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sites = [
        f"{path.relative_to(root)}:{i}"
        for folder in ("sdcli", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "BitsAndBytesConfig(" in line
    ]
    assert len(sites) == 2 and all(s.startswith("sdcli/models/quantization.py:") for s in sites), sites  # 4bit, 8bit


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_training_and_merge_load_the_same_quantized_base(tiny_model_dir, quantization):
    trained = _train_base(tiny_model_dir, Quantization(quantization))
    merged = load_base_model(tiny_model_dir, quantization)
    assert trained.config.quantization_config.to_dict() == merged.config.quantization_config.to_dict()
    if quantization == "4bit":
        assert trained.config.quantization_config.bnb_4bit_use_double_quant
        a, b = _dequantized(trained), _dequantized(merged)
        assert a.keys() == b.keys() and len(a) == 14  # 2 layers x 7 projections
        assert all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(_logits(trained), _logits(merged), rtol=0, atol=0)


@pytest.mark.parametrize("load", ["train", "merge"])
def test_a_4bit_base_survives_state_dict_between_forwards(tiny_model_dir, load):
    """peft calls state_dict() to load and save adapters; the base must be the same afterwards."""
    model = _train_base(tiny_model_dir) if load == "train" else load_base_model(tiny_model_dir, "4bit")
    model.eval()
    before = _logits(model)
    for _ in range(2):
        model.state_dict()
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    # bitsandbytes' AVX512-BF16 CPU path repacks weights in place at the first no-grad forward
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit(model).values())


def test_gradients_through_a_4bit_base_do_not_depend_on_an_earlier_no_grad_forward(tiny_model_dir):
    """The teacher and sampling run without gradients; the student's gradients must not change."""
    model = add_trainable_adapter(_train_base(tiny_model_dir), "ep001", LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=PROMPT).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in params.items()}

    first = grads()
    _logits(model)  # a teacher / sampling pass
    second = grads()
    assert first.keys() == second.keys()
    for n in first:
        torch.testing.assert_close(second[n], first[n], msg=n)
