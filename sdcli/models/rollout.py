"""Student generation: sample `num_samples` responses per prompt from the current student.

Sampling is the most expensive phase on a CPU, and at a few sequences per step each new token
costs one read of every weight. What keeps it cheap:
- on a CPU, the base linears and the LM head are read from int8 copies made once per episode,
  with the float adapters unfused beside them (`sdcli.models.int8_sampling`, rollout.sample_precision):
  a quarter of the bytes per token. The loss scores the samples again with the float model;
- otherwise the adapters are folded into the weights while sampling (`merged_for_sampling`): one
  matmul per linear layer instead of three;
- a plain decoding loop over the KV cache (no logits processors, stopping criteria or per-step
  bookkeeping of `generate`), logits only for the last position, and sampling by inverse CDF
  (one uniform number per row instead of a multinomial draw over the whole vocabulary);
- every prompt x sample goes through as one left-padded batch, and the loop stops when all rows
  have produced a stop token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdcli.models.int8_sampling import int8_for_sampling
from sdcli.models.model import eval_mode, merged_for_sampling
from sdcli.models.sequences import cache_argument, cut_at_eos


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    merge: bool
    int8: bool = False  # sample from int8 copies of the base (sdcli.models.int8_sampling); then nothing is folded


def pick_next_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else temperature / top-k / top-p sampling."""
    if settings.temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= settings.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def decode(model, prompts: list[list[int]], settings: SamplingSettings, stop_ids: set[int], pad_id: int) -> list[list[int]]:
    """Autoregressive sampling with a KV cache. prompts: token ids per row. Returns new tokens per row."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    cache = {cache_argument(model): DynamicCache()}  # filled in place by every forward
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1, **cache)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for _ in range(settings.max_new_tokens):
        next_tokens = pick_next_tokens(out.logits[:, -1, :], settings)
        next_tokens = next_tokens.masked_fill(finished, pad_id)
        generated.append(next_tokens)
        finished |= torch.isin(next_tokens, stop)
        if bool(finished.all()):
            break
        attention = torch.cat([attention, torch.ones((rows, 1), dtype=attention.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_tokens[:, None], attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **cache)
    if not generated:
        return [[] for _ in prompts]
    return torch.stack(generated, dim=1).tolist()


def sample_responses(model, tokenizer, prompts: list[list[int]], settings: SamplingSettings, stop_ids: set[int]) -> list[list[int]]:
    """prompts: token ids, one list per sample (repeat a prompt for several samples).
    Returns the response token ids for each, cut after the first stop token."""
    # no dropout, and the KV cache stays on even where training mode would drop it
    with eval_mode(model), merged_for_sampling(model, settings.merge and not settings.int8), \
            int8_for_sampling(model, settings.int8):
        generated = decode(model, prompts, settings, stop_ids, tokenizer.pad_token_id)
    return [cut_at_eos(ids, stop_ids) for ids in generated]
