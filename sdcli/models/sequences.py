"""Token sequences: chat prompts to ids, and (prompt, response) pairs to model-ready batches.

The student and the teacher score the *same* response token ids; only the prompt in front of them
differs. `score_batch` right-pads pairs and records, for every response token, the position whose
hidden state predicts it, so both roles line up token by token.
"""

from __future__ import annotations

import functools
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
    shared_prefix: int = 0  # leading tokens every row has in common, before any predicting position

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
        input_ids.to(device), attention.to(device), positions.to(device), response_ids.to(device), response_mask.to(device),
        shared_prefix=common_prefix_length(prompts) if n > 1 else 0,
    )


def common_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (the chat header and system prompt), stopping one
    short of the shortest prompt so that every position that predicts a response token lies after it."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


# Below this many shared tokens the extra forward call costs more than the rows save.
MIN_SHARED_PREFIX = 8
# Architectures whose every layer is plain causal attention over a DynamicCache, so that running the
# shared prefix once is exact (tests/unit/test_shared_prefix.py checks each against the full pass).
SHARED_PREFIX_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"}


def plain_causal_attention(config) -> bool:
    """Every layer attends causally to every earlier token: a listed architecture, no sliding window."""
    if getattr(config, "model_type", None) not in SHARED_PREFIX_MODEL_TYPES:
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes."""
    import inspect

    from sdcli.models.model import base_model

    base = base_model(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def response_hidden(decoder, batch: ScoreBatch) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token. -> [N, T, H]

    Two ways to compute fewer tokens than the padded batch holds, each the same numbers as the
    full pass, gradients included (tests/unit/test_shared_prefix.py):
    - the tokens every row shares (`batch.shared_prefix`: on chat prompts the header and system
      prompt, often a third of a short sequence) run once, as one row, and every row's attention
      reads their keys and values;
    - the prefix, each distinct prompt once and then each row's response run packed end to end
      in one row, each token attending only to its own row's tokens, so that no padding is
      computed (10-35% of the tokens of a step with responses of different lengths), the prefix
      needs no pass of its own, and several samples of one prompt share its tokens. Packed
      attention spans every row's tokens, so it is chosen only where the padding it saves costs
      more than that (`_packing_pays`).
    The full pass serves everything else (one row, other architectures or attention kernels)."""
    config = decoder.config
    if plain_causal_attention(config):
        shared = batch.shared_prefix if batch.shared_prefix >= MIN_SHARED_PREFIX else 0
        lengths = [int(n) for n in batch.attention_mask.sum(1)]
        if getattr(config, "_attn_implementation", None) == "sdpa":
            prompts = _prompt_lengths(batch, lengths)
            if _packing_pays(config, lengths, shared, _packed_length(batch, lengths, prompts, shared)):
                hidden, index = _packed_rows(decoder, batch, lengths, prompts, shared)
                return hidden[0][index]
        if shared and _layered_cache():
            return _gather(_hidden_after_shared_prefix(decoder, batch, shared),
                           (batch.predict_positions - shared).clamp(min=0))  # padding slots point at 0 and are masked
    return _gather(decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False).last_hidden_state, batch.predict_positions)


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _packing_pays(config, lengths: list[int], shared: int, packed: int | None = None) -> bool:
    """Whether one packed row of `packed` tokens (default: the shared prefix once, then every row's
    own tokens) costs fewer FLOPs than the padded rows: a token's linear layers against the
    query-key pairs of attention, whose packed square spans every row."""
    rows, own = len(lengths), [n - shared for n in lengths]
    if rows < 2:
        return False
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * hidden * (heads * head_dim * 2 + kv * head_dim * 2 + 3 * config.intermediate_size)
    per_pair = 4 * heads * head_dim
    width, packed = max(own), packed or shared + sum(own)
    padded_cost = shared * (per_token + shared * per_pair) + rows * width * (per_token + (width + shared) * per_pair)
    packed_cost = packed * (per_token + packed * per_pair)
    return packed_cost < padded_cost


@dataclass
class PackedRows:
    """Rows of tokens that begin with the same `shared` tokens, as one row: the shared tokens once,
    then each distinct prompt once, then each row's remaining tokens (its response), every token
    attending to the earlier tokens of its own row: the shared prefix, its prompt and its own."""

    ids: torch.Tensor  # [1, P]
    positions: torch.Tensor  # [1, P] each token's position in its own row
    mask: torch.Tensor  # [1, 1, P, P] bool, True = attend (sdpa's convention)
    where: torch.Tensor  # [N, W] where each row's token at each of its positions sits in the packed row (0 past its end)


def pack_rows(rows: list[torch.Tensor], shared: int, prompt_lengths: list[int] | None = None) -> PackedRows:
    """rows: each row's token ids [L_i], all beginning with the same `shared` tokens.
    prompt_lengths: where each row's prompt ends (> shared); rows whose prompts are the same tokens
    (several samples of one prompt) share one copy of them. None: no row shares more than `shared`."""
    device = rows[0].device
    lengths = [len(r) for r in rows]
    split = prompt_lengths or lengths
    # per packed token: its segment (-1: the shared prefix; then each prompt and each response) and
    # the segment it also attends to (a response: its prompt)
    pieces, segment, parent = [rows[0][:shared]], [-1] * shared, [-1] * shared
    where = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=device)
    where[:, :shared] = torch.arange(shared, device=device)
    at, first_of = shared, {}
    for i, (row, end) in enumerate(zip(rows, split)):
        key = tuple(row[shared:end].tolist())
        if key not in first_of:  # a new prompt: its tokens, a segment of their own
            first_of[key] = (at, len(pieces))
            pieces.append(row[shared:end])
            segment += [len(pieces) - 1] * (end - shared)
            parent += [-1] * (end - shared)
            at += end - shared
        start, prompt_segment = first_of[key]
        where[i, shared:end] = torch.arange(start, start + end - shared, device=device)
        pieces.append(row[end:])  # the row's own tokens, under its prompt
        segment += [len(pieces) - 1] * (len(row) - end)
        parent += [prompt_segment] * (len(row) - end)
        where[i, end:len(row)] = torch.arange(at, at + len(row) - end, device=device)
        at += len(row) - end
    ids = torch.cat(pieces)[None]
    segment, parent = torch.tensor(segment, device=device), torch.tensor(parent, device=device)
    position = torch.zeros(at, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        position[where[i, :n]] = torch.arange(n, device=device)
    index = torch.arange(at, device=device)
    seen = (segment[None, :] == segment[:, None]) | (segment[None, :] == parent[:, None]) | (segment[None, :] < 0)
    mask = seen & (index[None, :] <= index[:, None])
    return PackedRows(ids, position[None], mask[None, None], where)


def _prompt_lengths(batch: ScoreBatch, lengths: list[int]) -> list[int]:
    """Where each row's prompt ends: its first response token's predicting position, plus one."""
    has_response = batch.response_mask[:, 0].tolist()
    first = (batch.predict_positions[:, 0] + 1).tolist()
    return [p if r else n for p, r, n in zip(first, has_response, lengths)]


def _packed_length(batch: ScoreBatch, lengths: list[int], prompts: list[int], shared: int) -> int:
    """How many tokens `pack_rows` lays out: the shared prefix, each distinct prompt, every response."""
    distinct = {tuple(batch.input_ids[i, shared:end].tolist()) for i, end in enumerate(prompts)}
    return shared + sum(len(p) for p in distinct) + sum(n - end for n, end in zip(lengths, prompts))


def _packed_rows(decoder, batch: ScoreBatch, lengths: list[int], prompts: list[int],
                 shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared prefix, each distinct prompt and every row's response, end to end in one row.
    -> hidden [1, P, H] and, for every response token, the index of its predicting position in it [N, T]."""
    packed = pack_rows([batch.input_ids[i, :n] for i, n in enumerate(lengths)], shared, prompts)
    hidden = decoder(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.positions, use_cache=False)
    return hidden.last_hidden_state, packed.where.gather(1, batch.predict_positions)  # padding slots point at 0


def _hidden_after_shared_prefix(decoder, batch: ScoreBatch, shared: int) -> torch.Tensor:
    """[N, L - shared, H]: the prefix once, then every row's remaining tokens against its keys and values."""
    from transformers import DynamicCache

    captured_layer, prefix_layer = _cache_layers()
    argument = cache_argument(decoder)
    capture = DynamicCache()
    capture.layers = []
    capture.layer_class_to_replicate = captured_layer
    decoder(input_ids=batch.input_ids[:1, :shared], use_cache=True, **{argument: capture})
    rows = batch.input_ids.shape[0]
    prefix = DynamicCache()
    prefix.layers = [prefix_layer(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                     for layer in capture.layers]
    prefix.layer_class_to_replicate = None
    out = decoder(input_ids=batch.input_ids[:, shared:], attention_mask=batch.attention_mask, use_cache=True,
                  **{argument: prefix})
    return out.last_hidden_state


@functools.cache
def _layered_cache() -> bool:
    """The cache API the shared-prefix pass builds on (a DynamicCache made of per-layer objects,
    transformers 5.x as tested); without it, the full pass."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: F401
    except ImportError:
        return False
    cache = DynamicCache()
    return hasattr(cache, "layers") and hasattr(cache, "layer_class_to_replicate")


@functools.cache
def _cache_layers() -> tuple[type, type]:
    """The two cache layers of the shared-prefix pass, made on first use (transformers loads lazily)."""
    from transformers.cache_utils import DynamicLayer

    class CapturedLayer(DynamicLayer):
        """Holds the last keys and values it was given, replacing rather than appending, so that a
        layer recomputed in backward (activation checkpointing) leaves it as it was."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    class PrefixLayer(DynamicLayer):
        """The shared prefix's keys and values in front of every row's own, never written to."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return CapturedLayer, PrefixLayer
