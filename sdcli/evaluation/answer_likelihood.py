"""How likely a model finds the held-out answer: a continuous companion to the greedy score.

A greedy score moves in whole questions (one of six is 0.17), so two settings that both teach a
fact halfway look the same. For every eval line that carries a `demonstration`, this scores the
demonstration as the answer to the line's prompt, teacher-forced and without context:

    answer NLL        = mean over the answer's tokens of -log p(token | prompt, demonstration so far)
    demonstration NLL = the same over every token of the demonstration

The answer's tokens are those overlapping where the line's `answer` occurs in the demonstration
(as a regex for `reward: regex`, else as text, case-insensitively); a line whose answer cannot be
found there counts in the demonstration NLL only. Each figure is the mean over lines of the
per-line mean. "Teacher" figures score the same tokens with the demonstration also in the prompt
(the teacher's view, sdcli.evaluation.scoring.teacher_messages).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from sdcli.core.data import Messages
from sdcli.evaluation.eval_sets import EvalExample
from sdcli.evaluation.scoring import mean, using
from sdcli.models.model import merged_for_sampling


def answer_span(example: EvalExample) -> tuple[int, int] | None:
    """(start, end) characters of the line's answer inside its demonstration, or None."""
    answer, text = example.record.get("answer"), example.demonstration
    if answer is None or not text:
        return None
    pattern = str(answer) if example.reward == "regex" else re.escape(str(answer))
    try:
        found = re.search(pattern, text, flags=re.IGNORECASE)
    except re.error:
        return None
    return (found.start(), found.end()) if found and found.end() > found.start() else None


def response_token_nll(model, prompt: list[int], response: list[int], chunk: int = 128) -> torch.Tensor:
    """-log p of each response token after the prompt. [len(response)]"""
    return responses_token_nll(model, [(prompt, response)], chunk=chunk)[0]


def responses_token_nll(model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int | None = 0, rows: int = 16,
                        chunk: int = 128) -> list[torch.Tensor]:
    """`response_token_nll` of every (prompt, response) pair, `rows` pairs per forward pass through
    the training passes' `response_hidden` (no padding computed, the shared chat header once).
    Only the positions that predict response tokens go through the LM head, `chunk` at a time: a
    long demonstration on a large vocabulary (2000 tokens x 152k entries) would otherwise need
    gigabytes of logits at once."""
    from sdcli.models.model import base_model
    from sdcli.models.sequences import response_hidden, score_batch

    base = base_model(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    device = next(model.parameters()).device
    found: list[torch.Tensor] = []
    for start in range(0, len(pairs), rows):
        part = pairs[start : start + rows]
        batch = score_batch([p for p, _ in part], [r for _, r in part], 0 if pad_id is None else pad_id, device)
        hidden = response_hidden(decoder, batch)[batch.response_mask]  # [tokens, H], row after row
        targets = batch.response_ids[batch.response_mask]
        nll = [-head(hidden[i : i + chunk]).float().log_softmax(-1).gather(-1, targets[i : i + chunk, None])[:, 0]
               for i in range(0, len(targets), chunk)]
        found += list((torch.cat(nll) if nll else hidden.new_zeros(0)).split([len(r) for _, r in part]))
    return found


def _answer_tokens(tokenizer, example: EvalExample) -> tuple[list[int], list[bool]]:
    """The demonstration's tokens, and which of them overlap the answer (none without a fast tokenizer's offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(example.demonstration, add_special_tokens=False)["input_ids"], []
    encoded = tokenizer(example.demonstration, add_special_tokens=False, return_offsets_mapping=True)
    span = answer_span(example)
    in_answer = [span is not None and start < span[1] and end > span[0] for start, end in encoded["offset_mapping"]]
    return encoded["input_ids"], in_answer


@torch.no_grad()
def answer_likelihood(
    model, tokenizer, examples: Sequence[EvalExample], views: Sequence[Messages | None], *, encoder,
    adapters: Sequence[str] | None = None, merge: bool = True,
) -> dict:
    """answer_nll, demonstration_nll and their teacher_ counterparts over the lines with a
    demonstration; `views[i]` is line i's teacher prompt or None. Per line: "per_line" (same order
    as `examples`, None for lines without a demonstration). merge: fold the adapters into the
    weights for the passes, as the greedy answers do (a quarter faster on a CPU; the figures
    move by the rounding of the folded weights)."""
    answer, whole, t_answer, t_whole, per_line = [], [], [], [], []
    scored, pairs = [], []  # each (prompt, demonstration) pair, and (its line, its prefix, its answer tokens)
    for ex, view in zip(examples, views, strict=True):
        if not ex.demonstration:
            per_line.append(None)
            continue
        ids, in_answer = _answer_tokens(tokenizer, ex)
        per_line.append({})
        for prefix, prompt in [("", ex.prompt), ("teacher_", view)]:
            if prompt is not None:
                scored.append((per_line[-1], prefix, in_answer))
                pairs.append((encoder.encode(prompt), ids))
    with using(model, adapters), merged_for_sampling(model, merge):
        nlls = responses_token_nll(model, pairs, tokenizer.pad_token_id)
    for (line, prefix, in_answer), nll in zip(scored, nlls, strict=True):
        a_list, w_list = (t_answer, t_whole) if prefix else (answer, whole)
        line[f"{prefix}demonstration_nll"] = float(nll.mean())
        w_list.append(line[f"{prefix}demonstration_nll"])
        if any(in_answer):
            line[f"{prefix}answer_nll"] = float(nll[torch.tensor(in_answer)].mean())
            a_list.append(line[f"{prefix}answer_nll"])
    return {
        "answer_nll": mean(answer), "answer_nll_n": len(answer), "demonstration_nll": mean(whole),
        "teacher_answer_nll": mean(t_answer), "teacher_demonstration_nll": mean(t_whole), "per_line": per_line,
    }
