"""Drift from the base model, on general text (JSONL {"text": ...}, each text cut to `max_tokens`
tokens; the first token of a text is never predicted):

    KL from base = (1/N) sum_texts sum_t KL( p_model(. | x_<t) || p_base(. | x_<t) )
    perplexity   = exp( (1/N) sum_texts sum_t -log p_model(x_t | x_<t) )

N is the total number of predicted tokens (token-weighted means). p_base is the bare base model,
with every adapter off, so the drift of a chained run is cumulative. A plain model folder (e.g.
from `sd merge`) has no base to compare with, so its KL is None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sdcli.core.divergence import kl as token_kl  # KL(p || q) per position: [T, V] x2 -> [T]
from sdcli.evaluation.scoring import using


def perplexity(nll_sum: float, tokens: int) -> float | None:
    return math.exp(nll_sum / tokens) if tokens else None


@torch.no_grad()
def measure_drift(model, tokenizer, texts: Sequence[str], *, max_tokens: int = 256, adapters: Sequence[str] | None = None) -> dict:
    """Mean per-token KL(model || bare base) and perplexity of the model (and of the base) on `texts`."""
    from peft import PeftModel

    has_base = isinstance(model, PeftModel)
    device = next(model.parameters()).device
    kl_sum = nll_sum = base_nll_sum = 0.0
    tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)
        target = x[0, 1:, None]
        with using(model, adapters):
            logp = model(input_ids=x, use_cache=False).logits[0, :-1].float().log_softmax(-1)
        nll_sum += float(-logp.gather(-1, target).sum())
        if has_base:
            with using(model, []):
                logq = model(input_ids=x, use_cache=False).logits[0, :-1].float().log_softmax(-1)
            kl_sum += float(token_kl(logp, logq).sum())
            base_nll_sum += float(-logq.gather(-1, target).sum())
            del logq
        del logp
        tokens += len(ids) - 1
    return {
        "kl_from_base": kl_sum / tokens if has_base and tokens else None,
        "perplexity": perplexity(nll_sum, tokens),
        "base_perplexity": perplexity(base_nll_sum, tokens) if has_base else None,
        "tokens": tokens,
        "texts": len(texts),
    }
