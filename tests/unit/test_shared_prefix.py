"""The shared-prefix and packed passes (sdcli.models.sequences.response_hidden) give the full pass's numbers.

Rows that begin with the same chat header run it once; every row then attends to its keys and
values. Rows' own tokens can also run end to end in one packed row, with or without the shared
prefix in front. Checked per listed architecture on tiny random models: hidden states, the LoRA
gradients, with activation checkpointing, and the cases that must fall back to the full pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdcli.models.sequences import (
    MIN_SHARED_PREFIX,
    SHARED_PREFIX_MODEL_TYPES,
    common_prefix_length,
    plain_causal_attention,
    response_hidden,
    score_batch,
)

HEADER = list(range(3, 3 + 12))  # 12 shared tokens, like a chat template's system prompt


def tiny_decoder(model_type: str, **extra):
    import transformers

    config_class = transformers.AutoConfig.for_model(model_type).__class__
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, initializer_range=0.2, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    return model


def projection_loss(hidden, mask):
    """A loss that depends on the hidden states' direction (their norm is fixed by the final RMSNorm)."""
    direction = torch.linspace(-1.0, 1.0, hidden.shape[-1])
    return ((hidden @ direction) * mask).sum()


def batch_of(prompts, responses):
    return score_batch(prompts, responses, pad_id=0, device=torch.device("cpu"))


def uneven_rows():
    prompts = [HEADER + [20, 21, 22], HEADER + [30], HEADER + [40, 41, 42, 43, 44, 45]]
    responses = [[50, 51, 52, 53], [54, 55], [56, 57, 58, 59, 60, 61, 62]]
    return prompts, responses


def test_common_prefix_stops_before_every_predicting_position():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4, 5]]) == 2  # the shortest prompt's last token predicts
    assert common_prefix_length([[1, 2], [5, 2]]) == 0
    assert common_prefix_length([[], [1]]) == 0
    prompts, responses = uneven_rows()
    assert batch_of(prompts, responses).shared_prefix == len(HEADER)
    assert batch_of(prompts[:1], responses[:1]).shared_prefix == 0  # one row: nothing to share


WAYS = ("full", "shared", "packed", "packed_shared")


def force(way: str, batch, monkeypatch):
    """Patch the packing choice for one way of computing the batch; returns the batch that way takes
    (the shared prefix cleared where the way does not use it)."""
    import sdcli.models.sequences as sequences

    monkeypatch.setattr(sequences, "_packing_pays", lambda *a: way.startswith("packed"))
    keep_prefix = way in ("shared", "packed_shared")
    return batch if keep_prefix else dataclasses.replace(batch, shared_prefix=0)


def lora_model(model_type: str):
    from peft import LoraConfig, get_peft_model

    extra = {"sliding_window": None} if model_type == "mistral" else {}  # Mistral's default window is 4096
    model = get_peft_model(tiny_decoder(model_type, **extra), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make every LoRA gradient but B's zero
    return model


@pytest.mark.parametrize("way", WAYS[1:])
@pytest.mark.parametrize("model_type", sorted(SHARED_PREFIX_MODEL_TYPES))
def test_each_way_equals_the_full_pass_with_gradients(model_type, way, monkeypatch):
    import sdcli.models.sequences as sequences

    model = lora_model(model_type)
    decoder = model.get_base_model().model
    assert plain_causal_attention(decoder.config) and decoder.config._attn_implementation == "sdpa"
    prompts, responses = uneven_rows()
    batch = batch_of(prompts, responses)
    params = [p for p in model.parameters() if p.requires_grad]
    ran = []
    for name in ("_packed_rows", "_hidden_after_shared_prefix"):
        real = getattr(sequences, name)
        monkeypatch.setattr(sequences, name, lambda *a, real=real, name=name: (ran.append(name), real(*a))[1])

    def hidden_and_grads(way):
        hidden = response_hidden(decoder, force(way, batch, monkeypatch))
        loss = projection_loss(hidden, batch.response_mask)
        grads = torch.autograd.grad(loss, params)
        return hidden.detach(), torch.cat([g.flatten() for g in grads])

    h_full, g_full = hidden_and_grads("full")
    assert ran == []
    h, g = hidden_and_grads(way)
    assert ran == [{"shared": "_hidden_after_shared_prefix"}.get(way, "_packed_rows")]
    mask = batch.response_mask
    assert h.shape == h_full.shape
    torch.testing.assert_close(h[mask], h_full[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-4 * float(g_full.abs().max()))


def sampled_rows():
    """Several samples of each prompt, as rollout.num_samples > 1 makes them, in no particular order."""
    prompts, responses = uneven_rows()
    order = [0, 1, 0, 2, 0, 1]
    samples = [[50, 51, 52, 53], [54, 55], [56, 57], [58, 59, 60, 61, 62], [63], [40, 41, 42]]
    return [prompts[i] for i in order], samples


@pytest.mark.parametrize("way", ["packed", "packed_shared"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_samples_of_one_prompt_share_its_tokens_in_the_packed_row(model_type, way, monkeypatch):
    """Each distinct prompt is laid out once and every sample's response attends to it: the same
    hidden states and LoRA gradients as the full pass, where every row carries its own copy."""
    from sdcli.models.sequences import _packed_length, _prompt_lengths

    model = lora_model(model_type)
    decoder = model.get_base_model().model
    prompts, responses = sampled_rows()
    batch = batch_of(prompts, responses)
    params = [p for p in model.parameters() if p.requires_grad]
    seen = []
    decoder.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))

    def hidden_and_grads(way):
        hidden = response_hidden(decoder, force(way, batch, monkeypatch))
        grads = torch.autograd.grad(projection_loss(hidden, batch.response_mask), params)
        return hidden.detach(), torch.cat([g.flatten() for g in grads])

    h_full, g_full = hidden_and_grads("full")
    h, g = hidden_and_grads(way)
    shared = len(HEADER) if way == "packed_shared" else 0
    distinct = {tuple(p[shared:]) for p in prompts}
    assert seen[-1] == shared + sum(map(len, distinct)) + sum(map(len, responses))  # each prompt once
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    assert _packed_length(batch, lengths, _prompt_lengths(batch, lengths), shared) == seen[-1]
    mask = batch.response_mask
    torch.testing.assert_close(h[mask], h_full[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-4 * float(g_full.abs().max()))


def test_packing_is_chosen_where_the_padding_costs_more_than_the_longer_attention():
    config = tiny_decoder("llama").config
    from sdcli.models.sequences import _packing_pays

    assert not _packing_pays(config, [40], 0)  # one row: nothing to pack
    assert _packing_pays(config, [40, 10, 12, 30], 0)  # a step's rows of different lengths
    assert not _packing_pays(config, [40, 40, 40, 40], 0)  # no padding: packing only adds attention
    assert not _packing_pays(config, [2000, 1900, 1800, 1950] * 4, 0)  # long rows: the packed square dominates
    # SmolLM2's shapes at the reference step: ~25% padding, 4 rows of ~60 tokens after a 24-token header
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    assert _packing_pays(smollm2, [86, 60, 75, 52], 24)


@pytest.mark.parametrize("way", WAYS[1:])
def test_each_way_under_activation_checkpointing(way, monkeypatch):
    from sdcli.models.activation_memory import enable_activation_checkpointing

    model = lora_model("llama")
    decoder = model.get_base_model().model
    prompts, responses = uneven_rows()
    batch = batch_of(prompts, responses)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(way):
        loss = projection_loss(response_hidden(decoder, force(way, batch, monkeypatch)), batch.response_mask)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    expected = grads("full")
    assert enable_activation_checkpointing(model, 1.0) == 2
    torch.testing.assert_close(grads(way), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_falls_back_to_the_full_pass(monkeypatch):
    """A sliding window, an unlisted architecture, a short prefix or an older cache API never reach
    the shared pass; nor another attention kernel the packed one."""
    import sdcli.models.sequences as sequences

    def must_not_run(*args):
        raise AssertionError("the shared-prefix pass ran")

    monkeypatch.setattr(sequences, "_packing_pays", lambda *a: False)
    monkeypatch.setattr(sequences, "_hidden_after_shared_prefix", must_not_run)
    prompts, responses = uneven_rows()
    for decoder in (tiny_decoder("mistral", sliding_window=4).model, tiny_decoder("gpt_neox").gpt_neox):
        assert not plain_causal_attention(decoder.config)
    decoder = tiny_decoder("llama").model
    short = [HEADER[: MIN_SHARED_PREFIX - 1] + p[len(HEADER):] for p in prompts]
    assert response_hidden(decoder, batch_of(short, responses)).shape == (3, 7, 32)
    monkeypatch.setattr(sequences, "_layered_cache", lambda: False)  # a transformers without per-layer caches
    assert response_hidden(decoder, batch_of(prompts, responses)).shape == (3, 7, 32)
    monkeypatch.undo()
    monkeypatch.setattr(sequences, "_hidden_after_shared_prefix", must_not_run)
    monkeypatch.setattr(sequences, "_packed_rows", must_not_run)
    monkeypatch.setattr(sequences, "SHARED_PREFIX_MODEL_TYPES", set())
    assert response_hidden(decoder, batch_of(prompts, responses)).shape == (3, 7, 32)
    monkeypatch.undo()
    monkeypatch.setattr(sequences, "_packed_rows", must_not_run)
    monkeypatch.setattr(sequences, "_packing_pays", lambda *a: True)
    decoder.config._attn_implementation = "eager"  # a 4D bool mask is sdpa's; eager adds its mask
    assert response_hidden(decoder, batch_of(prompts, responses)).shape == (3, 7, 32)
