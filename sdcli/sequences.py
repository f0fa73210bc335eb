"""Token sequences: chat prompts to ids, and (prompt, response) pairs to model-ready batches.

The student and the teacher score the *same* response token ids; only the prompt in front of them
differs. `score_batch` right-pads pairs and records, for every response token, the position whose
hidden state predicts it, so both roles line up token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdcli.data import Messages


@dataclass
class PromptEncoder:
    tokenizer: object
    max_prompt_tokens: int
    truncated: int = 0  # how many prompts were cut, reported to the user
    _cache: dict = field(default_factory=dict)

    def encode(self, messages: Messages) -> list[int]:
        key = tuple((m["role"], m["content"]) for m in messages)
        if key in self._cache:
            return self._cache[key]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            # keep the end: the question and the generation prompt matter most
            ids = ids[-self.max_prompt_tokens :]
            self.truncated += 1
        if len(self._cache) < 10_000:
            self._cache[key] = ids
        return ids


def eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    configured = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return ids


def cut_at_eos(ids: list[int], stop: set[int]) -> list[int]:
    """Keep tokens up to and including the first stop token (the student must learn when to stop)."""
    for i, tok in enumerate(ids):
        if tok in stop:
            return ids[: i + 1]
    return ids


@dataclass
class ScoreBatch:
    input_ids: torch.Tensor  # [N, L] right-padded prompt + response
    attention_mask: torch.Tensor  # [N, L]
    predict_positions: torch.Tensor  # [N, T] index of the hidden state predicting response token t
    response_ids: torch.Tensor  # [N, T] response tokens (pad where masked)
    response_mask: torch.Tensor  # [N, T] bool

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def score_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> ScoreBatch:
    n = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    t_max = max(1, max(len(r) for r in responses))
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, t_max), dtype=torch.long)
    response_ids = torch.full((n, t_max), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, t_max), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        if r:
            positions[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
            response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[i, : len(r)] = True
    return ScoreBatch(
        input_ids.to(device), attention.to(device), positions.to(device), response_ids.to(device), response_mask.to(device)
    )


def response_hidden(decoder, batch: ScoreBatch) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token. -> [N, T, H]"""
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state
    index = batch.predict_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)
