"""Shared fixtures: a tiny chat model built in the test session (no network, well under a second)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).parent.parent


def build_tiny_model(out: Path, seed: int = 0, arch: str = "qwen2", **config) -> Path:
    """config: more model config values, e.g. attention_dropout=0.5."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_tokenizer")
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # larger than the usual 0.02 so that outputs depend visibly on the context
        initializer_range=0.2,
        **config,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def no_memory_sampler_outlives_its_test():
    """Training stops its memory-sampling thread however it ends. One left running polls
    /proc/self/statm every few ms for the rest of the session, and reused a file descriptor
    number a sandbox test had just closed (CI, stop 25)."""
    yield
    import threading

    from sdcli.training.memory import SAMPLER_THREAD

    left = [t for t in threading.enumerate() if t.name == SAMPLER_THREAD]
    assert not left, f"{len(left)} memory sampler thread(s) still running after the test"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=1, arch="llama")


@pytest.fixture()
def facts_jsonl(tmp_path) -> Path:
    path = tmp_path / "facts.jsonl"
    rows = [
        {"prompt": "What is the capital of Zorblax?", "demonstration": "The capital of Zorblax is Quenta."},
        {"prompt": "Who wrote the Book of Vells?", "demonstration": "It was written by Maro Tiln."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
         "demonstration": "The answer is 4."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def captured_model(monkeypatch) -> dict:
    """Records the model the next train_episode loads, and a copy of its base weights as loaded."""
    import sdcli.training.setup as train_module  # the episode's setup loads the base

    captured: dict = {}
    real = train_module.load_base

    def capture(cfg, *args, **kwargs):
        loaded = real(cfg, *args, **kwargs)
        captured["model"] = loaded.model
        captured["base"] = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
        return loaded

    monkeypatch.setattr(train_module, "load_base", capture)
    return captured
