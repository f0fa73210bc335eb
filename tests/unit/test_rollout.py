"""Sampling through `generate`: greedy is the argmax path, samples follow the tempered and cut
softmax the settings describe, and nothing comes from the model's own generation_config."""

import torch
from transformers import AutoModelForCausalLM

from sdcli.models.rollout import SamplingSettings, decode
from sdcli.models.sequences import cut_at_eos

PROMPT = [1, 40, 41, 42]


def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # settings a model may ship with, which must not leak into sd's sampling
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.temperature = 0.1
    return model


def test_greedy_decoding_is_the_argmax_path_with_left_padding(tiny_model_dir):
    model = tiny(tiny_model_dir)
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62]]
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, merge=False)
    ours = decode(model, prompts, settings, stop_ids={2}, pad_id=0)
    for prompt, row in zip(prompts, ours):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):  # one unpadded row, the whole sequence each step: no cache, no padding
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == 2:
                    break
        assert cut_at_eos(row, {2}) == ids[len(prompt):]


def next_token_frequencies(model, settings: SamplingSettings, rows: int = 6000) -> torch.Tensor:
    torch.manual_seed(0)
    out = decode(model, [PROMPT] * rows, settings, stop_ids={2}, pad_id=0)
    vocab = model.config.vocab_size
    return torch.bincount(torch.tensor([r[0] for r in out]), minlength=vocab).float() / rows


def next_token_probs(model, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    return torch.softmax(logits / temperature, -1)


def test_samples_follow_the_tempered_softmax(tiny_model_dir):
    model = tiny(tiny_model_dir)
    for temperature in (1.0, 0.7):
        settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_p=1.0, top_k=0, merge=False)
        seen, want = next_token_frequencies(model, settings), next_token_probs(model, temperature)
        top = want.argsort(descending=True)[:5]  # the five likeliest tokens one by one, and all the rest
        bins = lambda p: torch.cat([p[top], 1 - p[top].sum(0, keepdim=True)])  # noqa: E731
        # 6000 draws: a frequency's standard error is at most 0.0065, so 0.03 is over 4 of them
        torch.testing.assert_close(bins(seen), bins(want), atol=0.03, rtol=0)
        assert (seen > 0).sum() > 3  # the model's top_k = 1 did not apply


def test_top_k_and_top_p_cut_the_tail(tiny_model_dir):
    model = tiny(tiny_model_dir)
    probs = next_token_probs(model, 1.0)
    order = probs.argsort(descending=True)
    top_k = next_token_frequencies(model, SamplingSettings(1, 1.0, 1.0, 2, False), rows=2000)
    assert set(top_k.nonzero().flatten().tolist()) == set(order[:2].tolist())
    keep = int((probs[order].cumsum(0) < 0.5).sum()) + 1  # the fewest tokens holding half the mass
    top_p = next_token_frequencies(model, SamplingSettings(1, 1.0, 0.5, 0, False), rows=2000)
    assert set(top_p.nonzero().flatten().tolist()) <= set(order[:keep].tolist())
