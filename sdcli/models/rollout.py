"""Student generation: sample `num_samples` responses per prompt from the current student.

Sampling is the most expensive phase on a CPU, and at a few sequences per step each new token
costs one read of every weight. What keeps it cheap:
- on a CPU, the base linears and the LM head are read from int8 copies made once per episode,
  with the float adapters unfused beside them (`sdcli.models.int8_sampling`, rollout.sample_precision):
  a quarter of the bytes per token. The loss scores the samples again with the float model;
- otherwise the adapters are folded into the weights while sampling (`merged_for_sampling`): one
  matmul per linear layer instead of three;
- every prompt x sample is one left-padded batch, which stops when all rows have produced a stop
  token. On a CPU the decoding steps of a Llama-family model are computed directly
  (`sdcli.models.direct_decode`: fused projections and adapters, rows leave the batch as they stop;
  from int8 copies `generate` took 1.45x its time for 4 x 48 tokens, benchmarks/decode_vs_generate.py;
  greedy answers to 76 eval questions, folded, 17.9-18.5 s at 32 rows against 31.9-35.1 s through
  `generate` at 16); everything else goes through `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdcli.models.direct_decode import direct_decode, supports_direct_decoding
from sdcli.models.int8_sampling import int8_for_sampling
from sdcli.models.model import eval_mode, merged_for_sampling
from sdcli.models.sequences import cut_at_eos


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    merge: bool
    int8: bool = False  # sample from int8 copies of the base (sdcli.models.int8_sampling); then nothing is folded


def generation_config(settings: SamplingSettings, stop_ids: set[int], pad_id: int):
    """`settings` as a complete GenerationConfig: every sampling knob set, so nothing comes from the
    model's own generation_config.json (a repetition penalty or a top-k of 50 there would change
    the distribution the loss assumes)."""
    from transformers import GenerationConfig

    sample = settings.temperature > 0.0
    return GenerationConfig(
        do_sample=sample, temperature=settings.temperature if sample else None,
        top_k=settings.top_k if sample else None, top_p=settings.top_p if sample else None,
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, max_new_tokens=settings.max_new_tokens,
        eos_token_id=sorted(stop_ids), pad_token_id=pad_id, num_beams=1, use_cache=True,
    )


def decodes_directly(model, length: int, int8: bool = False) -> bool:
    """Whether `decode` takes `direct_decode` for rows of up to `length` positions: a Llama-family
    model on a CPU, or any device when sampling from int8 copies; otherwise transformers' `generate`."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return (int8 or on_cpu) and supports_direct_decoding(model, length)


@torch.no_grad()
def decode(model, prompts: list[list[int]], settings: SamplingSettings, stop_ids: set[int], pad_id: int) -> list[list[int]]:
    """One left-padded batch through transformers' `generate`, or, for a Llama-family model on a
    CPU or sampled from int8 copies, through `direct_decode`. prompts: token ids per row. Returns
    the new tokens per row (pad after a row's stop token)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p) :] = 1
    if decodes_directly(model, width + settings.max_new_tokens, settings.int8):
        return direct_decode(model, input_ids, attention, int8=settings.int8, max_new_tokens=settings.max_new_tokens,
                             temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                             stop_ids=stop_ids, pad_id=pad_id).tolist()
    with int8_for_sampling(model, settings.int8):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=generation_config(settings, stop_ids, pad_id))
    return out[:, width:].tolist()


def sample_responses(model, tokenizer, prompts: list[list[int]], settings: SamplingSettings, stop_ids: set[int]) -> list[list[int]]:
    """prompts: token ids, one list per sample (repeat a prompt for several samples).
    Returns the response token ids for each, cut after the first stop token."""
    # no dropout, and the KV cache stays on even where training mode would drop it
    with eval_mode(model), merged_for_sampling(model, settings.merge and not settings.int8):
        generated = decode(model, prompts, settings, stop_ids, tokenizer.pad_token_id)
    return [cut_at_eos(ids, stop_ids) for ids in generated]
