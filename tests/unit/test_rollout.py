"""The decoding loop against transformers' generate, and the sampler against its distribution."""

import torch
from transformers import AutoModelForCausalLM

from sdcli.models.rollout import SamplingSettings, decode, pick_next_tokens
from sdcli.models.sequences import cut_at_eos


def test_greedy_decoding_equals_transformers_generate_with_left_padding(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62]]
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, merge=False)
    ours = decode(model, prompts, settings, stop_ids={2}, pad_id=0)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                eos_token_id=2, pad_token_id=0)[:, width:].tolist()
    for a, b in zip(ours, theirs):
        assert cut_at_eos(a, {2}) == cut_at_eos(b, {2})


def test_sampler_matches_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    settings = SamplingSettings(1, temperature=1.0, top_p=1.0, top_k=0, merge=False)
    counts = torch.bincount(pick_next_tokens(logits, settings), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.01, rtol=0)


def test_top_k_and_top_p_cut_the_tail():
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(5000, 1)
    top_k = pick_next_tokens(logits, SamplingSettings(1, 1.0, 1.0, 2, False))
    assert set(top_k.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # [0.64, 0.24, 0.09, ...]: top_p 0.8 keeps tokens 0 and 1
    top_p = pick_next_tokens(logits, SamplingSettings(1, 1.0, 0.8, 0, False))
    assert set(top_p.tolist()) == {0, 1} and probs[:2].sum() > 0.8
    greedy = pick_next_tokens(logits[:3], SamplingSettings(1, 0.0, 1.0, 0, False))
    assert greedy.tolist() == [0, 0, 0]
