"""The direct decoding steps (sdcli.models.direct_decode): each step is the model's own forward,
greedy decoding is `generate`'s, samples follow `generate`'s warped distribution, the int8 steps
equal `generate` through the int8 copies, and what it cannot compute goes through `generate`."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdcli.models.direct_decode import DirectDecoder, direct_decode, draw, supports_direct_decoding, warpers
from sdcli.models.int8_sampling import int8_for_sampling
from sdcli.models.model import add_trainable_adapter, eval_mode, merged_for_sampling
from sdcli.models.rollout import SamplingSettings, decode
from sdcli.models.stack import active_adapters
from sdcli.recipe.sections import LoraSettings

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62], [1, 70, 71, 72, 73]]
HEADER = [1, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # a chat header every prompt begins with: its prefill runs once
HEADED = [HEADER + p[1:] for p in PROMPTS]
REPEATED = [HEADED[1], HEADED[0], HEADED[1], HEADED[1], HEADED[2]]  # several samples of a prompt
int8_kernels = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm int8 kernels")


def with_adapters(model_dir, dtype=torch.float32):
    """Two adapters active (as an episode's teacher may run earlier episodes' adapters with its
    own), a third one not, all with non-zero B and on different layers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model = add_trainable_adapter(model, "ep001", LoraSettings(r=4, alpha=8))
    model.add_adapter("ep002", add_trainable_adapter.__globals__["lora_config"](LoraSettings(r=2, alpha=2, target_modules=["q_proj", "down_proj"])))
    model.add_adapter("off", add_trainable_adapter.__globals__["lora_config"](LoraSettings(r=2, alpha=2)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return model


def padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


@pytest.mark.parametrize("prompts", [PROMPTS, HEADED, REPEATED], ids=["own", "shared_header", "repeated"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_each_step_is_the_models_own_forward_on_the_whole_sequence(arch, prompts, tiny_model_dir, tiny_llama_dir,
                                                                     monkeypatch):
    import sdcli.models.direct_decode as direct

    model = with_adapters(tiny_model_dir if arch == "qwen2" else tiny_llama_dir, torch.float64)
    continuation = torch.tensor([[5, 6, 7, 8, 9]] * len(prompts))
    shared, real = [], direct.common_prefix_length
    monkeypatch.setattr(direct, "common_prefix_length", lambda rows: shared.append(real(rows)) or shared[-1])
    with torch.no_grad(), active_adapters(model, ["ep001", "ep002"]):
        decoder = DirectDecoder(model, int8=False, max_new_tokens=6)
        steps = [decoder.prefill(*padded(prompts))]
        steps += [decoder.step(continuation[:, t]) for t in range(continuation.shape[1])]
        assert shared == [1 if prompts is PROMPTS else len(HEADER)]  # the header ran once, as one row
        for row, prompt in enumerate(prompts):  # unpadded, no cache
            whole = model(input_ids=torch.tensor([prompt + continuation[row].tolist()])).logits[0, len(prompt) - 1:]
            for t, logits in enumerate(steps):
                torch.testing.assert_close(logits[row].double(), whole[t].double(), rtol=0, atol=1e-5)
        with active_adapters(model, ["ep001"]):  # the inactive adapters count for nothing
            alone = DirectDecoder(model, int8=False, max_new_tokens=1).prefill(*padded(prompts))
        assert not torch.allclose(alone, steps[0])


@pytest.mark.parametrize("prompts", [[PROMPTS[0]] * 3, REPEATED], ids=["one_prompt", "three_prompts"])
def test_a_repeated_prompt_runs_once(prompts, tiny_llama_dir):
    """Several samples of one prompt: the prefill computes each distinct prompt's tokens once."""
    model = with_adapters(tiny_llama_dir)
    seen = []
    embed = model.get_base_model().model.embed_tokens
    embed.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    with torch.no_grad(), active_adapters(model, ["ep001"]):
        DirectDecoder(model, int8=False, max_new_tokens=2).prefill(*padded(prompts))
    distinct = [list(p) for p in dict.fromkeys(map(tuple, prompts))]
    shared = len(HEADER) if len(distinct) > 1 else 0
    assert sum(int(ids.numel()) for ids in seen) == shared + sum(len(p) - shared for p in distinct)


def test_greedy_tokens_are_generates(tiny_llama_dir):
    model = with_adapters(tiny_llama_dir, torch.float64)
    settings = SamplingSettings(max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=0, merge=False)
    with active_adapters(model, ["ep001", "ep002"]):
        reference = decode(model, PROMPTS, settings, stop_ids={2}, pad_id=0)  # generate: float64 is not direct
        ids, attention = padded(PROMPTS)
        ours = direct_decode(model, ids, attention, int8=False, max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0,
                             stop_ids={2}, pad_id=0)
    assert ours.tolist() == reference



def test_rows_that_stop_leave_the_batch_and_the_rest_decode_as_in_the_full_batch(tiny_llama_dir, monkeypatch):
    import sdcli.models.direct_decode as direct

    model = with_adapters(tiny_llama_dir, torch.float64)  # float64: no near-tie flips between batch shapes
    ids, attention = padded(PROMPTS)
    kw = dict(int8=False, max_new_tokens=12, temperature=0.0, top_k=0, top_p=1.0, pad_id=0)
    rows_per_step, real_step = [], direct.DirectDecoder.step
    monkeypatch.setattr(direct.DirectDecoder, "step", lambda self, t: rows_per_step.append(len(t)) or real_step(self, t))
    with torch.no_grad(), active_adapters(model, ["ep001", "ep002"]):
        free = direct_decode(model, ids, attention, stop_ids={-1}, **kw)  # no row stops
        stop = int(free[0, 1])  # row 0 stops after two tokens
        assert any(stop not in row[:8] for row in free.tolist())  # ... and some other row goes on for longer
        monkeypatch.setattr(direct, "COMPACT_SHARE", 2.0)  # never compacts
        kept = direct_decode(model, ids, attention, stop_ids={stop}, **kw)
        monkeypatch.setattr(direct, "COMPACT_SHARE", 0.25)
        rows_per_step.clear()
        compacted = direct_decode(model, ids, attention, stop_ids={stop}, **kw)
    assert compacted.tolist() == kept.tolist()
    assert rows_per_step[0] == len(PROMPTS) and rows_per_step[-1] < len(PROMPTS)


def test_a_float_model_on_a_cpu_decodes_directly_with_its_adapters_folded_or_not(tiny_llama_dir, monkeypatch):
    """Greedy eval answers on a CPU: the direct steps, not `generate` (about 1.8x faster on an eval set)."""
    from types import SimpleNamespace

    import sdcli.models.rollout as rollout_module

    calls, real = [], rollout_module.direct_decode
    monkeypatch.setattr(rollout_module, "direct_decode", lambda *a, **k: calls.append(k["int8"]) or real(*a, **k))
    model = with_adapters(tiny_llama_dir)
    for merge in (True, False):
        settings = SamplingSettings(max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, merge=merge)
        with active_adapters(model, ["ep001"]):
            rollout_module.sample_responses(model, SimpleNamespace(pad_token_id=0), PROMPTS, settings, {2})
    assert calls == [False, False]

@int8_kernels
def test_int8_steps_equal_the_int8_copies_under_generates_modules(tiny_model_dir):
    model = with_adapters(tiny_model_dir)
    prompts = torch.tensor([p[:3] for p in PROMPTS])
    continuation = torch.tensor([[5, 6, 7, 8]] * len(PROMPTS))
    from transformers import DynamicCache

    from sdcli.models.sequences import cache_argument

    with torch.no_grad(), eval_mode(model), active_adapters(model, ["ep001", "ep002"]):
        decoder = DirectDecoder(model, int8=True, max_new_tokens=5)
        ours = [decoder.prefill(prompts, torch.ones_like(prompts))]
        ours += [decoder.step(continuation[:, t]) for t in range(continuation.shape[1])]
        cache = {cache_argument(model): DynamicCache()}
        with int8_for_sampling(model, True):  # each linear on its own int8 copy, one position per step
            theirs = [model(input_ids=prompts, use_cache=True, **cache).logits[:, -1]]
            theirs += [model(input_ids=continuation[:, t:t + 1], use_cache=True, **cache).logits[:, -1]
                       for t in range(continuation.shape[1])]
            plain = DirectDecoder(model, int8=False, max_new_tokens=5)
            plain.prefill(prompts, torch.ones_like(prompts))
            assert not torch.allclose(plain.step(continuation[:, 0]), ours[1], atol=1e-4)  # int8 acted
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_draw_takes_the_bucket_of_the_uniform_and_never_a_token_of_probability_zero():
    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    uniform = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])  # 1.0: a uniform that rounded up
    assert draw(probabilities, uniform).tolist() == [1, 1, 3, 3, 3]
    assert draw(torch.tensor([[2.0, 6.0]]), torch.tensor([0.3])).tolist() == [1]  # unnormalised: 0.3 x 8 > 2


def test_samples_follow_generates_warped_distribution(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt, rows = [1, 40, 41, 42], 6000
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1:]
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 20, 0.9)):
        want = logits.clone()
        for warp in warpers(temperature, top_k, top_p):
            want = warp(None, want)
        want = torch.softmax(want, -1)[0]
        torch.manual_seed(0)
        ids = torch.tensor([prompt] * rows)
        first = direct_decode(model, ids, torch.ones_like(ids), int8=False, max_new_tokens=1, temperature=temperature,
                              top_k=top_k, top_p=top_p, stop_ids={2}, pad_id=0)[:, 0]
        seen = torch.bincount(first, minlength=want.shape[0]).float() / rows
        assert seen[want == 0].sum() == 0  # nothing outside top-k / top-p
        top = want.argsort(descending=True)[:5]
        bins = lambda p: torch.cat([p[top], 1 - p[top].sum(0, keepdim=True)])  # noqa: E731
        # 6000 draws: a frequency's standard error is at most 0.0065, so 0.03 is over 4 of them
        torch.testing.assert_close(bins(seen), bins(want), atol=0.03, rtol=0)
    assert [type(w).__name__ for w in warpers(0.7, 20, 0.9)] == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert warpers(1.0, 0, 1.0) == []


def test_what_it_cannot_compute_goes_through_generate(tiny_model_dir, tmp_path):
    model = with_adapters(tiny_model_dir)
    assert supports_direct_decoding(model, 64)
    model.merge_adapter()  # peft's merge: the layer's forward skips its adapters
    assert not supports_direct_decoding(model, 64)
    model.unmerge_adapter()
    with merged_for_sampling(model, True):  # sd's fold: new weights, adapters switched off; computed as is
        assert supports_direct_decoding(model, 64)
        ids, attention = padded(PROMPTS)
        decoder = DirectDecoder(model, int8=False, max_new_tokens=2)
        decoder.prefill(ids, attention)
        folded = decoder.step(torch.tensor([5] * len(PROMPTS)))
        ids, attention = torch.cat([ids, torch.full((len(PROMPTS), 1), 5)], 1), torch.cat([attention, torch.ones_like(ids[:, :1])], 1)
        whole = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        torch.testing.assert_close(folded, whole, rtol=1e-4, atol=1e-4)
    assert not supports_direct_decoding(with_adapters(tiny_model_dir, torch.float64), 64)
    model.get_base_model().config.sliding_window = 32
    assert supports_direct_decoding(model, 32) and not supports_direct_decoding(model, 33)
    from transformers import GPT2Config, GPT2LMHeadModel

    assert not supports_direct_decoding(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), 64)


def test_answers_are_batched_by_the_decoder_they_go_through(tiny_model_dir):
    """Evaluation batches 32 prompts where `decode` takes the direct steps, 16 where it takes
    `generate`: both ask `decodes_directly`, so the two choices cannot disagree."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sdcli.evaluation.scoring import default_batch_size
    from sdcli.models.rollout import decodes_directly

    model = with_adapters(tiny_model_dir)
    assert decodes_directly(model, 64) and default_batch_size(model, 64) == 32
    model.get_base_model().config.sliding_window = 32  # rows past the window: generate
    assert not decodes_directly(model, 33) and default_batch_size(model, 33) == 16
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))  # not Llama-family
    assert not decodes_directly(gpt2, 64) and default_batch_size(gpt2, 64) == 16
