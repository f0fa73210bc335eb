"""Student generation: sample `num_samples` responses per prompt from the current student.

Sampling is the most expensive phase on a CPU. Two things keep it cheap: the adapters are folded
into the weights while sampling (`merged_for_sampling`: one matmul per linear layer instead of
three), and all prompts x samples go through `generate` as one left-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdcli.model import merged_for_sampling
from sdcli.sequences import cut_at_eos


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    merge: bool


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[list[int]], settings: SamplingSettings, stop_ids: set[int]) -> list[list[int]]:
    """prompts: token ids, one list per sample (repeat a prompt for several samples).
    Returns the response token ids for each, cut after the first stop token."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p) :] = 1
    greedy = settings.temperature == 0.0
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not greedy,
        pad_token_id=pad,
        eos_token_id=sorted(stop_ids),
    )
    if not greedy:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    try:
        with merged_for_sampling(model, settings.merge):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    finally:
        model.train(was_training)
    generated = out[:, width:].tolist()
    return [cut_at_eos(ids, stop_ids) for ids in generated]
