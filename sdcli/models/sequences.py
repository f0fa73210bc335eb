"""Token sequences: chat prompts to ids, and (prompt, response) pairs to model-ready batches.

The student and the teacher score the *same* response token ids; only the prompt in front of them
differs. `score_batch` right-pads pairs and records, for every response token, the position whose
hidden state predicts it, so both roles line up token by token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdcli.core.data import Messages


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


CUT_MARK = "\n[...]\n"


@dataclass
class TeacherPromptEncoder:
    """The teacher's prompts, which carry the context and so are the ones that grow long.

    A prompt over `max_tokens` is cut inside its context (`TeacherView.pieces`: the demonstration,
    solution, feedback or follow-up in its last user turn), never in the chat header, the system
    prompt or the question: the longest context pieces are shortened first, each keeping its start
    and its end around CUT_MARK. Only a prompt that is too long even without its context (the
    question alone is over the limit) is cut from the left, as the student's prompts are. `cut`
    counts the prompts cut, every time one is encoded; `warn` is called once, on the first.
    """

    tokenizer: object
    max_tokens: int
    warn: Callable[[str], None] = lambda message: None
    cut: int = 0
    _cache: dict = field(default_factory=dict)

    def encode(self, view) -> list[int]:
        key = tuple((m["role"], m["content"]) for m in view.messages)
        if key not in self._cache:
            ids = self._ids(view.messages)
            was_cut = len(ids) > self.max_tokens
            if was_cut:
                if self.cut == 0:
                    self.warn(
                        f"warning: a teacher prompt has {len(ids)} tokens, more than model.max_teacher_prompt_tokens="
                        f"{self.max_tokens}; its context (demonstration, solution, feedback or follow-up) is cut in the "
                        "middle to fit, the question never (counted per step as signal/teacher_prompts_cut)"
                    )
                ids = self._cut_context(view, ids)
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[key] = (ids, was_cut)
        ids, was_cut = self._cache[key]
        self.cut += was_cut
        return ids

    def _ids(self, messages: Messages) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _cut_context(self, view, ids: list[int]) -> list[int]:
        pieces = view.pieces or ()
        lengths = [len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if is_context else 0
                   for text, is_context in pieces]
        excess = len(ids) - self.max_tokens
        while any(lengths):
            cap = largest_cap(lengths, sum(lengths) - excess)
            shortened = tuple((self._shorten(text, cap) if n > cap else text, is_context)
                              for (text, is_context), n in zip(pieces, lengths))
            messages = [*view.messages[:-1], {"role": "user", "content": "".join(text for text, _ in shortened)}]
            fitted = self._ids(messages)
            if len(fitted) <= self.max_tokens:
                return fitted
            if cap == 0:
                break
            excess += len(fitted) - self.max_tokens  # the marks, and tokens merging across the cuts
        return ids[-self.max_tokens :]

    def _shorten(self, text: str, keep: int) -> str:
        """`text` as its first and last tokens, `keep` in all, around CUT_MARK."""
        head, tail = keep // 2, keep - keep // 2
        if getattr(self.tokenizer, "is_fast", False):  # cut the text itself, where the tokens begin and end
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            start = offsets[head - 1][1] if head else 0
            end = offsets[len(offsets) - tail][0] if tail else len(text)
            return text[:start] + CUT_MARK + text[end:]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[:head]) + CUT_MARK + (self.tokenizer.decode(ids[len(ids) - tail :]) if tail else "")


def largest_cap(lengths: list[int], budget: int) -> int:
    """The largest c with sum(min(n, c)) <= budget: shortening the longest pieces first. 0 if none fits."""
    low, high = 0, max(lengths, default=0)
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def teacher_prompt_limit(configured: int | None, model_config, max_new_tokens: int) -> int:
    """`model.max_teacher_prompt_tokens`, or by default what the model's context leaves after the
    longest response (no limit for a model that does not state its context length)."""
    if configured is not None:
        return configured
    context = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(context, int) or context <= 0:
        return 1 << 62
    return max(1, context - max_new_tokens)


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
