"""Adapter stacking (sdcli.models.stack) and merging (sdcli.models.merge) on a tiny Qwen2, checked against plain math.

The reference for every stack is `_manual_merge`: W + s * B @ A written into the weights by hand,
from the saved adapter files, without peft.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdcli.core.errors import UserError
from sdcli.models.merge import merge_history
from sdcli.models.merge.check import MergeCheckError
from sdcli.models.stack import (
    active_adapters,
    adapter_name,
    STACK_ADAPTER,
    attach_stack,
    check_adapter_dir,
    combine_frozen,
    save_adapter,
    set_active_adapters,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Three episodes with different ranks, scalings, targets and rsLoRA, so that a merge that
# ignores any of them (or takes one adapter's scaling for all) is caught.
EPISODES = [
    dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1),
    dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(r=3, lora_alpha=3, target_modules=ALL),
]
PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 12]])


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, ids=PROMPT):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _make_episode(base_dir: Path, folder: Path, seed: int, **lora) -> Path:
    """A LoRA adapter with random non-zero A and B (so it matters), saved as an episode folder."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(base_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.15
    model.save_pretrained(folder)
    (folder / "episode.json").write_text(json.dumps({"seed": seed}))
    return folder


@pytest.fixture(scope="module")
def episodes(tiny_model_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("run") / "episodes"
    return [
        _make_episode(tiny_model_dir, root / f"{i:03d}-ep", seed=10 + i, **cfg)
        for i, cfg in enumerate(EPISODES, 1)
    ]


def _manual_merge(base_dir: Path, adapter_dirs: list[Path]):
    """The base with s * B @ A added to each targeted weight, adapter by adapter, without peft."""
    model = _load(base_dir)
    state = model.state_dict()
    for d in adapter_dirs:
        cfg = json.loads((d / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
        tensors = load_file(d / "adapter_model.safetensors")
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[key.replace("lora_A", "lora_B")]
                state[module + ".weight"] += scale * b @ a
    model.load_state_dict(state)
    return model


def _damage(folder: Path, how: str) -> None:
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if how == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty_weights":
        weights.write_bytes(b"")
    elif how == "missing_weights":
        weights.unlink()
    elif how == "missing_config":
        config.unlink()
    elif how == "truncated_config":
        config.write_text(config.read_text()[:40])
    elif how == "empty_config":
        config.write_text("")


# ---------------------------------------------------------------------------------------------
# Stacking


def test_adapter_name():
    assert [adapter_name(i) for i in (1, 2, 120)] == ["ep001", "ep002", "ep120"]
    with pytest.raises(ValueError):
        adapter_name(0)


def test_stack_adds_adapters_like_merged_weights(tiny_model_dir, episodes):
    reference = _logits(_manual_merge(tiny_model_dir, episodes))
    model, names = attach_stack(_load(tiny_model_dir), episodes)
    assert names == ["ep001", "ep002", "ep003"]
    assert model.base_model.active_adapters == names
    assert torch.allclose(_logits(model), reference, atol=1e-4)
    # every adapter matters: leaving out the last one is visibly different
    assert (_logits(_manual_merge(tiny_model_dir, episodes[:2])) - reference).abs().max() > 1e-2


def test_combined_stack_is_the_same_function_as_the_stack_and_trains_like_it(tiny_model_dir, episodes):
    """Three adapters (ranks 4, 2, 3; rsLoRA; different targets) become one of rank 9 per layer."""
    from sdcli.models.model import add_trainable_adapter
    from sdcli.recipe.sections import LoraSettings

    reference = _logits(_manual_merge(tiny_model_dir, episodes))
    model, names = attach_stack(_load(tiny_model_dir), episodes)
    assert combine_frozen(model, names) == [STACK_ADAPTER]
    assert set(model.peft_config) == {STACK_ADAPTER}
    assert model.base_model.active_adapters == [STACK_ADAPTER]
    assert not any(p.requires_grad for p in model.parameters())
    assert (_logits(model) - reference).abs().max() < 1e-4
    with active_adapters(model, []):  # the bare base is still there
        assert (_logits(model) - _logits(_load(tiny_model_dir))).abs().max() < 1e-6

    # a new episode adapter on top: only it trains, and the stack under it is unchanged
    model = add_trainable_adapter(model, "ep004", LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".ep004." in n for n in trainable)
    assert (_logits(model) - reference).abs().max() < 1e-4  # lora_B starts at zero


def test_a_single_adapter_is_left_as_it_is(tiny_model_dir, episodes):
    model, names = attach_stack(_load(tiny_model_dir), episodes[:1])
    assert combine_frozen(model, names) == ["ep001"]


def test_attach_freezes_everything_and_turns_off_frozen_dropout(tiny_model_dir, episodes):
    model, _ = attach_stack(_load(tiny_model_dir), episodes)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()  # episode 1 was trained with lora_dropout=0.1; frozen, it must be deterministic
    with torch.no_grad():
        train_logits = model(input_ids=PROMPT).logits
    assert torch.equal(train_logits, _logits(model))


def test_attach_empty_list_returns_model_unchanged(tiny_model_dir):
    base = _load(tiny_model_dir)
    model, names = attach_stack(base, [])
    assert model is base and names == []


def test_active_adapters_restores_active_set_and_requires_grad(tiny_model_dir, episodes):
    from peft import LoraConfig

    model, names = attach_stack(_load(tiny_model_dir), episodes[:2])
    model.add_adapter("ep003", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    set_active_adapters(model, names + ["ep003"], trainable=["ep003"])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainable = {n for n, f in flags.items() if f}
    assert trainable and all(".ep003." in n for n in trainable)
    assert not any(flags[n] for n in flags if ".ep001." in n or ".ep002." in n)
    stacked = _logits(model)

    with active_adapters(model, ["ep001"]):
        assert model.base_model.active_adapters == ["ep001"]
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert torch.allclose(_logits(model), _logits(_manual_merge(tiny_model_dir, episodes[:1])), atol=1e-4)
    assert model.base_model.active_adapters == ["ep001", "ep002", "ep003"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    # [] is the bare base; peft's disable_adapter() alone would leave ep001/ep002 trainable afterwards
    with active_adapters(model, []):
        assert torch.allclose(_logits(model), _logits(_load(tiny_model_dir)), atol=1e-6)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.base_model.active_adapters == ["ep001", "ep002", "ep003"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(_logits(model), stacked)

    with pytest.raises(ValueError, match="unknown adapter"):
        with active_adapters(model, ["ep009"]):
            pass


def test_active_adapters_restores_after_an_exception(tiny_model_dir, episodes):
    model, names = attach_stack(_load(tiny_model_dir), episodes[:2])
    with pytest.raises(RuntimeError):
        with active_adapters(model, []):
            raise RuntimeError("boom")
    assert model.base_model.active_adapters == names
    assert not any(p.requires_grad for p in model.parameters())


def test_saved_config_lists_target_modules_sorted_whatever_the_set_order(tiny_model_dir, tmp_path):
    """peft holds target_modules as a set, whose order changes between processes (string hashing);
    the written config must not, or two identical runs hash their adapters differently."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(tiny_model_dir), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=ALL), adapter_name="ep001")
    model.peft_config["ep001"].target_modules = {"v_proj", "q_proj", "up_proj", "down_proj", "o_proj", "k_proj", "gate_proj"}
    written = json.loads((save_adapter(model, "ep001", tmp_path / "a") / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(ALL)


def test_save_adapter_writes_an_episode_folder_that_stacks(tiny_model_dir, episodes, tmp_path):
    from peft import LoraConfig

    model, names = attach_stack(_load(tiny_model_dir), episodes[:2])
    model.add_adapter("ep003", LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["v_proj"]))
    for n, p in model.named_parameters():
        if ".ep003." in n:
            p.data = torch.randn_like(p) * 0.2
    set_active_adapters(model, names + ["ep003"], trainable=["ep003"])
    folder = save_adapter(model, "ep003", tmp_path / "episodes" / "003-new")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    check_adapter_dir(folder)
    restacked, _ = attach_stack(_load(tiny_model_dir), [*episodes[:2], folder])
    assert torch.allclose(_logits(restacked), _logits(model), atol=1e-5)


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated_weights", "adapter_model.safetensors is truncated"),
        ("empty_weights", "adapter_model.safetensors is empty"),
        ("missing_weights", "adapter_model.safetensors is missing"),
        ("missing_config", "adapter_config.json is missing"),
        ("truncated_config", "adapter_config.json is not valid JSON"),
        ("empty_config", "adapter_config.json is empty"),
    ],
)
def test_damaged_adapter_is_reported_not_loaded(tiny_model_dir, episodes, tmp_path, how, message):
    import shutil

    broken = shutil.copytree(episodes[1], tmp_path / "episodes" / "002-broken")
    _damage(broken, how)
    with pytest.raises(UserError, match=message):
        check_adapter_dir(broken)
    base = _load(tiny_model_dir)
    with pytest.raises(UserError, match=message) as err:
        attach_stack(base, [episodes[0], broken])
    assert "002-broken" in str(err.value)
    assert not any("lora" in n for n, _ in base.named_modules())  # nothing was loaded
    out = tmp_path / "merged"
    with pytest.raises(UserError, match=message):
        merge_history(tiny_model_dir, [episodes[0], broken], out)
    assert not out.exists()


def test_missing_adapter_folder_is_reported(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        check_adapter_dir(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Merging


def _no_leftovers(out: Path) -> bool:
    return not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_merge_into_model_matches_stack_and_loads_with_transformers(tiny_model_dir, episodes, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    report = merge_history(tiny_model_dir, episodes, out, into="model")
    assert report.passed and report.max_abs_diff <= 1e-4 and report.adapter_effect > 0.1
    assert any("merged vs stack" in line for line in report.lines())
    reference = _logits(_manual_merge(tiny_model_dir, episodes))
    assert torch.allclose(_logits(_load(out)), reference, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert json.loads((out / "sd_merge.json").read_text())["passed"] is True
    assert _no_leftovers(out)


def test_merge_into_adapter_matches_stack_and_loads_with_peft(tiny_model_dir, episodes, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged-adapter"
    report = merge_history(tiny_model_dir, episodes, out, into="adapter")
    assert report.passed and report.max_abs_diff <= 1e-4
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (9, 9, False)  # ranks 4 + 2 + 3
    model = PeftModel.from_pretrained(_load(tiny_model_dir), out)
    reference = _logits(_manual_merge(tiny_model_dir, episodes))
    assert torch.allclose(_logits(model), reference, atol=1e-4)
    assert _no_leftovers(out)


def test_merge_of_a_prefix(tiny_model_dir, episodes, tmp_path):
    out = tmp_path / "upto1"
    merge_history(tiny_model_dir, episodes[:1], out, into="model")
    assert torch.allclose(_logits(_load(out)), _logits(_manual_merge(tiny_model_dir, episodes[:1])), atol=1e-4)


@pytest.mark.parametrize("into", ["model", "adapter"])
def test_merge_of_a_4bit_base_matches_the_full_precision_stack(tiny_model_dir, episodes, tmp_path, into):
    out = tmp_path / f"merged-4bit-{into}"
    report = merge_history(tiny_model_dir, episodes, out, into=into, quantization="4bit")
    assert report.passed and report.max_abs_diff <= 1e-4
    # the float32 merge is exact; the gap to the stack on the NF4 base is quantization, and reported
    assert report.quantization_error > 1e-3
    if into == "model":
        assert report.quantized_stack_diff > report.max_abs_diff
        assert torch.allclose(_logits(_load(out)), _logits(_manual_merge(tiny_model_dir, episodes)), atol=1e-4)
    else:
        assert report.checks["quantized"] and report.quantized_stack_diff <= 1e-4  # same NF4 weights on both sides


def test_merge_refuses_to_overwrite_unless_forced(tiny_model_dir, episodes, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        merge_history(tiny_model_dir, episodes[:1], out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_history(tiny_model_dir, episodes[:1], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert _no_leftovers(out)


@pytest.mark.parametrize("into", ["model", "adapter"])
def test_failing_check_leaves_nothing_at_out_dir(tiny_model_dir, episodes, tmp_path, into):
    out = tmp_path / "merged"
    with pytest.raises(MergeCheckError, match="merge check failed") as err:
        merge_history(tiny_model_dir, episodes[:2], out, into=into, tolerance=-1.0)
    assert isinstance(err.value, UserError) and not err.value.report.passed
    assert not out.exists() and _no_leftovers(out)


def test_failing_check_with_force_keeps_the_previous_output(tiny_model_dir, episodes, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeCheckError):
        merge_history(tiny_model_dir, episodes[:1], out, force=True, tolerance=-1.0)
    assert (out / "keep.txt").read_text() == "mine" and _no_leftovers(out)


def test_merge_rejects_bad_arguments(tiny_model_dir, episodes, tmp_path):
    with pytest.raises(UserError, match="choose one of: model, adapter"):
        merge_history(tiny_model_dir, episodes, tmp_path / "o", into="gguf")
    with pytest.raises(UserError, match="choose one of: none, 4bit, 8bit"):
        merge_history(tiny_model_dir, episodes, tmp_path / "o", quantization="2bit")
    with pytest.raises(UserError, match="Nothing to merge"):
        merge_history(tiny_model_dir, [], tmp_path / "o")
    with pytest.raises(UserError, match="would overwrite the input"):
        merge_history(tiny_model_dir, episodes, episodes[0].parent, force=True)
    assert all(e.is_dir() for e in episodes)
