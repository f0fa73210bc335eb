"""The decoding steps of a Llama-family model computed directly, on a CPU: samples from int8 copies
while training, greedy answers in float (folded adapters) for evaluation.

At a few rows per step a CPU decoding step costs little arithmetic, and transformers' `generate`
around peft's LoRA layers spends much of it on per-operation overhead: ~220 linear calls, each
with its adapter's own two matmuls, casts and scaling, a KV cache grown by concatenation, and a
multinomial draw that makes an exponential variate for each of the 49152 vocabulary entries.
Measured back to back (4 rows x 48 tokens, SmolLM2-135M, r = 16 on every linear layer, int8 base,
2 threads, `benchmarks/decode_vs_generate.py`, README "Speed and memory"): 1.95 s here against 2.8 s
through `generate`.

The step is the model's own arithmetic (RMSNorm, rotary embedding from the model's own module,
grouped-query attention, SiLU MLP), arranged for fewer calls:
- the q, k and v projections are one int8 matmul, as are the gate and up projections: their base
  weights concatenated and packed once per episode (`packed_copy` keeps it while they are unchanged);
- the LoRA adapters of linears that read the same input are one pair of matmuls: the A matrices
  stacked, the B matrices (times their scaling) in one block-diagonal matrix, rebuilt every call
  since training moves them;
- the KV cache is preallocated and written in place;
- the next token is drawn by inverse CDF (one cumulative sum) from the distribution `generate`
  would sample: the same temperature, top-k and top-p warpers, transformers' own classes.

The prompt pass is the model's own forward, in float (`int8_linear` says why). Anything this
module does not know goes through `generate` instead (`supports_direct_decoding`): another
architecture, a DoRA or biased adapter, an adapter folded into the weights, a model not in float32.
Rows leave the batch once a quarter of it has stopped (`direct_decode`), so a large batch of
answers of mixed lengths costs about what its answers' tokens cost.

The greedy tokens equal `generate`'s, and each step's logits the model's own forward
(tests/unit/test_direct_decode.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdcli.models.int8_sampling import int8_matmul, int8_matmul_outliers_in_float, packed_copy
from sdcli.models.model import base_model
from sdcli.models.sequences import MIN_SHARED_PREFIX, cache_argument, common_prefix_length, pack_rows

# Llama's decoder layer, as Qwen2 and Mistral also have it (Qwen2 adds biases to q, k and v)
ARCHITECTURES = ("llama", "qwen2", "mistral")


def _plain(linear):
    """The float nn.Linear under a LoRA layer (or the linear itself)."""
    return getattr(linear, "base_layer", linear)


def _adapters(linear) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(A, B x scaling) of each active adapter of `linear`; None where this module cannot compute it."""
    if not hasattr(linear, "lora_A"):
        return []
    if linear.merged:
        return None
    if linear.disable_adapters:
        return []
    parts = []
    for name in linear.active_adapters:
        if name not in linear.lora_A:
            continue
        if name in getattr(linear, "lora_variant", {}) or linear.lora_B[name].bias is not None:
            return None
        parts.append((linear.lora_A[name].weight, linear.lora_B[name].weight * linear.scaling[name]))
    return parts


def supports_direct_decoding(model, length: int) -> bool:
    """Whether `direct_decode` computes this model's decoding steps, up to `length` positions."""
    base = base_model(model)
    config = base.config
    inner = getattr(base, "model", None)
    if config.model_type not in ARCHITECTURES or getattr(config, "hidden_act", None) != "silu":
        return False
    if (getattr(config, "sliding_window", None) or length) < length:  # a window would hide early positions
        return False
    if getattr(config, "pretraining_tp", 1) != 1 or inner is None or not hasattr(inner, "rotary_emb"):
        return False
    if any(p.dtype != torch.float32 for p in base.parameters()):
        return False
    linears = [base.get_output_embeddings()]
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        linears += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                    mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return all(type(_plain(linear)) is torch.nn.Linear and _adapters(linear) is not None for linear in linears)


class _Fused:
    """Linears that read the same input, as one: y = [W_1; W_2; ...] x + blockdiag(B) (stacked A) x.
    From int8 copies the W are one packed matmul; in float each W is its own matmul, the outputs
    side by side. `outliers`: the input's outlier columns in float (the MLP output projection,
    `int8_sampling`)."""

    def __init__(self, linears: list, int8: bool, outliers: bool = False):
        plain = [_plain(linear) for linear in linears]
        self.packed = packed_copy(*plain) if int8 else None
        self.outliers = outliers
        # float: the linears' own weights, each its own matmul, not one concatenated copy (a second
        # copy of every q/k/v and gate/up weight, 278 MB on SmolLM2-135M, made for every batch)
        self.weights = [(p.weight, p.bias) for p in plain] if not int8 or outliers else []
        widths = [p.out_features for p in plain]
        pieces = [(i, a, b) for i, linear in enumerate(linears) for a, b in _adapters(linear)]
        self.a_t = torch.cat([a for _, a, _ in pieces]).detach().t().contiguous() if pieces else None  # [in, ranks]
        if pieces:
            starts = [sum(widths[:i]) for i in range(len(widths) + 1)]
            self.b_t = self.a_t.new_zeros(self.a_t.shape[1], starts[-1])  # [ranks, outputs], block-diagonal
            rank = 0
            for i, a, b in pieces:
                self.b_t[rank:rank + a.shape[0], starts[i]:starts[i + 1]] = b.detach().t()
                rank += a.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] -> [rows, sum of the outputs]"""
        if self.packed is None:
            y = torch.cat([F.linear(x, w, b) for w, b in self.weights], dim=-1) if len(self.weights) > 1 \
                else F.linear(x, *self.weights[0])
        elif self.outliers:
            y = int8_matmul_outliers_in_float(x, self.packed, self.weights[0][0])
        else:
            y = int8_matmul(x, self.packed)
        if self.a_t is not None:
            y = torch.addmm(y, x @ self.a_t, self.b_t)
        return y


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm in one call (its module makes six from Python; torch composes the
    same operations in C++, so the numbers are the same)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


COMPACT_SHARE = 0.25  # stopped rows leave the batch once they are this share of it


class DirectDecoder:
    """One left-padded batch: `prefill` runs the prompts, then each `step` takes one new token per
    row and returns the logits for the next. Logits are float32 [rows, vocabulary]."""

    def __init__(self, model, int8: bool, max_new_tokens: int):
        base = base_model(model)
        self.model, self.max_new_tokens = model, max_new_tokens
        config, self.inner = base.config, base.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = []
        for layer in self.inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, _Fused([attention.q_proj, attention.k_proj, attention.v_proj], int8),
                                _Fused([attention.o_proj], int8), layer.post_attention_layernorm,
                                _Fused([mlp.gate_proj, mlp.up_proj], int8), _Fused([mlp.down_proj], int8, outliers=True),
                                attention.scaling))
        self.lm_head = _Fused([base.get_output_embeddings()], int8)

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """input_ids, attention [rows, width], left-padded -> the logits after each prompt.

        Rows that repeat another (several samples of one prompt) run once, and each copy starts
        from the same cache. Where the prompts begin with the same tokens (the chat header and
        system prompt), those run once: the header and then each row's own tokens, end to end in
        one packed row (`pack_rows`), and each row's cache is [header | padding | its own tokens],
        the padding masked in every later step. Otherwise the padded rows run as they are."""
        rows = input_ids.shape[0]
        distinct, copy_of = torch.unique(torch.cat([input_ids, attention], dim=1), dim=0, return_inverse=True)
        if len(distinct) < rows:
            width = input_ids.shape[1]
            logits, layers, attention, positions = self._prefill(distinct[:, :width], distinct[:, width:])
            logits, attention, positions = logits[copy_of], attention[copy_of], positions[copy_of]
            layers = [(keys[copy_of], values[copy_of]) for keys, values in layers]
        else:
            logits, layers, attention, positions = self._prefill(input_ids, attention)
        width = attention.shape[1]
        length = width + self.max_new_tokens
        shape = (rows, self.kv_heads, length, self.head_dim)
        self.keys, self.values = [], []
        for layer_keys, layer_values in layers:
            keys, values = layer_keys.new_zeros(shape), layer_values.new_zeros(shape)
            keys[:, :, :width], values[:, :, :width] = layer_keys, layer_values
            self.keys.append(keys)
            self.values.append(values)
        self.visible = torch.zeros(rows, length, dtype=torch.bool)
        self.visible[:, :width] = attention.bool()
        cos, sin = self.inner.rotary_emb(self.inner.embed_tokens.weight[:1], torch.arange(length)[None])
        self.cos, self.sin = cos[0], sin[0]
        self.filled, self.positions = width, positions  # each row's last position
        return logits

    def _prefill(self, input_ids: torch.Tensor, attention: torch.Tensor):
        """-> the logits after each prompt [rows, V], each layer's (keys, values) [rows, kv heads,
        width, head dim], which positions hold tokens [rows, width], each row's last position [rows]."""
        rows = input_ids.shape[0]
        prompts = [ids[mask.bool()] for ids, mask in zip(input_ids, attention)]
        shared = common_prefix_length([p.tolist() for p in prompts]) if rows > 1 else 0
        if shared >= MIN_SHARED_PREFIX and getattr(self.inner.config, "_attn_implementation", None) == "sdpa":
            return self._packed_prefill(prompts, shared)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in _cache_of(out).layers]
        return out.logits[:, -1].float(), layers, attention, positions[:, -1]

    def _packed_prefill(self, prompts: list[torch.Tensor], shared: int):
        """-> the logits after each prompt [rows, V]; each layer's (keys, values) laid out
        [rows, kv heads, header | left padding | own tokens, head dim]; which of those positions
        hold tokens [rows, width]; and each row's last position [rows]."""
        from transformers import DynamicCache

        packed, cache = pack_rows(prompts, shared), DynamicCache()
        out = self.inner(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                         use_cache=True, **{cache_argument(self.inner): cache})
        own = [len(p) - shared for p in prompts]
        own_lengths = torch.tensor(own)
        width = shared + max(own)
        column = torch.arange(width)
        attention = ((column[None] < shared) | (column[None] >= width - own_lengths[:, None])).long()
        layers = []
        for layer in cache.layers:
            keys = layer.keys.new_zeros(len(prompts), self.kv_heads, width, self.head_dim)
            values = torch.zeros_like(keys)
            keys[:, :, :shared], values[:, :, :shared] = layer.keys[0, :, :shared], layer.values[0, :, :shared]
            for i, n in enumerate(own):
                at = packed.where[i, shared:shared + n]
                keys[i, :, width - n:], values[i, :, width - n:] = layer.keys[0, :, at], layer.values[0, :, at]
            layers.append((keys, values))
        last = out.last_hidden_state[0, packed.where[torch.arange(len(own)), shared + own_lengths - 1]]  # each row's last token
        logits = base_model(self.model).get_output_embeddings()(last).float()
        return logits, layers, attention, shared + own_lengths - 1

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with only these rows (indices into the current ones), in this order."""
        for layer in range(len(self.keys)):  # one layer at a time: the old cache goes as the new one comes
            self.keys[layer], self.values[layer] = self.keys[layer][rows], self.values[layer][rows]
        self.visible, self.positions = self.visible[rows], self.positions[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [rows]: the token each row just drew -> the logits for the next."""
        rows, at = tokens.shape[0], self.filled
        self.filled += 1
        self.positions = self.positions + 1
        self.visible[:, at] = True
        cos, sin = self.cos[self.positions][:, None, None], self.sin[self.positions][:, None, None]
        mask = self.visible[:, None, None, :at + 1]
        h = self.inner.embed_tokens(tokens)
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        for (norm_1, qkv, out, norm_2, gate_up, down, scaling), keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = qkv(_rms_norm(norm_1, h)).split(sizes, dim=-1)
            keys[:, :, at] = _rotate(k.view(rows, self.kv_heads, 1, self.head_dim), cos, sin)[:, :, 0]
            values[:, :, at] = v.view(rows, self.kv_heads, self.head_dim)
            q = _rotate(q.view(rows, self.heads, 1, self.head_dim), cos, sin)
            attended = F.scaled_dot_product_attention(q, keys[:, :, :at + 1], values[:, :, :at + 1], attn_mask=mask,
                                                      scale=scaling, enable_gqa=self.kv_heads != self.heads)
            h = h + out(attended.reshape(rows, -1))
            gate, up = gate_up(_rms_norm(norm_2, h)).chunk(2, dim=-1)
            h = h + down(F.silu(gate) * up)
        return self.lm_head(_rms_norm(self.inner.norm, h)).float()


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5


def warpers(temperature: float, top_k: int, top_p: float) -> list:
    """What `generate` applies to the logits before it samples, in its order, as its own classes."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    chain += [TopKLogitsWarper(top_k=top_k)] if top_k else []
    return chain + ([TopPLogitsWarper(top_p=top_p)] if top_p < 1.0 else [])


def draw(probabilities: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probabilities [rows, V], uniform [rows] in [0, 1) -> token [rows]: the first token whose
    cumulative probability exceeds uniform x total, so a token of probability 0 is never drawn."""
    cumulative = probabilities.double().cumsum(-1)
    total = cumulative[:, -1:]
    # below the total even where uniform x total rounds up to it: past it lie only zeros
    target = torch.minimum(uniform.double().unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(-1)


@torch.no_grad()
def direct_decode(model, input_ids: torch.Tensor, attention: torch.Tensor, *, int8: bool, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, stop_ids: set[int], pad_id: int) -> torch.Tensor:
    """The new tokens [rows, <= max_new_tokens], pad after a row's stop token, as `generate` returns
    them; temperature 0 is greedy. Stops when every row has stopped.

    Rows that have stopped leave the batch once they are a quarter of it (`COMPACT_SHARE`): the
    answers of one batch end at very different lengths (a fact in 15 tokens, a general answer at
    the limit), and a stopped row would cost as much as a live one to the end. Greedy tokens are
    the same either way; a sampled row draws from the same distribution, with other uniforms once
    rows have left."""
    decoder = DirectDecoder(model, int8, max_new_tokens)
    logits = decoder.prefill(input_ids, attention)
    chain = warpers(temperature, top_k, top_p) if temperature > 0 else []
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
    rows = input_ids.shape[0]
    out = input_ids.new_full((rows, max_new_tokens), pad_id)
    live = torch.arange(rows)  # which of the batch's rows the decoder still holds, in its order
    finished = torch.zeros(rows, dtype=torch.bool)  # of the live rows
    length = 0
    for index in range(max_new_tokens):
        if temperature > 0:
            for warp in chain:
                logits = warp(None, logits)
            tokens = draw(torch.softmax(logits, dim=-1), torch.rand(logits.shape[0]))
        else:
            tokens = logits.argmax(-1)
        tokens = tokens.masked_fill(finished, pad_id)
        out[live, index] = tokens
        length = index + 1
        finished |= torch.isin(tokens, stop)
        if bool(finished.all()) or index == max_new_tokens - 1:
            break
        if int(finished.sum()) >= max(1, COMPACT_SHARE * len(live)):
            going = (~finished).nonzero().squeeze(-1)
            decoder.keep(going)
            live, finished, tokens = live[going], finished[going], tokens[going]
        logits = decoder.step(tokens)
    return out[:, :length]
