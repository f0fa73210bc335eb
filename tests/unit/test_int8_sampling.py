"""Sampling from int8 copies of the base (rollout.sample_precision): the float model, its weights
and the loss's scores are untouched by it, and the int8 sampler stays close to the float one."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdcli.core.errors import RecipeError, UserError
from sdcli.models.int8_sampling import (
    _PACKED,
    float_linears,
    int8_for_sampling,
    int8_matmul,
    int8_matmul_outliers_in_float,
    is_mlp_output,
    pack_int8,
    sample_in_int8,
)
from sdcli.models.model import add_trainable_adapter, eval_mode, load_base, merged_for_sampling
from sdcli.models.rollout import SamplingSettings, decode, sample_responses
from sdcli.models.sequences import cache_argument
from sdcli.models.sequences import cut_at_eos, response_hidden, score_batch
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.sections import LoraSettings, ModelConfig

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm int8 kernels")

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62], [1, 70, 71, 72, 73]]


@pytest.fixture()
def student(tiny_model_dir):
    loaded = load_base(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    model = add_trainable_adapter(loaded.model, "ep001", LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; a nonzero adapter shows it is sampled too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def settings(temperature=1.0, int8=True, merge=False, tokens=8):
    return SamplingSettings(tokens, temperature, 1.0, 0, merge=merge, int8=int8)


def response_logp(model, prompts, responses):
    """What the loss scores the responses with: the float student's log-probabilities (train.py:
    score_batch, then response_hidden and the LM head, outside any sampling context)."""
    batch = score_batch(prompts, responses, 0, "cpu")
    with torch.no_grad():
        logits = model.get_base_model().get_output_embeddings()(response_hidden(model.get_base_model().get_decoder(), batch))
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~batch.response_mask, 0.0)


def stepwise_logits(model, prompts: torch.Tensor, tokens: torch.Tensor, int8: bool) -> torch.Tensor:
    """[B, T, V]: the sampler's logits before each of `tokens` (prompts of one length, [B, P]),
    computed as the decoding loop computes them: the prompt in one pass, then one position per step,
    which is where the int8 copies act."""
    from transformers import DynamicCache

    cache = {cache_argument(model): DynamicCache()}
    out = []
    with torch.no_grad(), eval_mode(model), int8_for_sampling(model, int8):
        logits = model(input_ids=prompts, use_cache=True, **cache).logits[:, -1]
        for t in range(tokens.shape[1]):
            out.append(logits)
            logits = model(input_ids=tokens[:, t : t + 1], use_cache=True, **cache).logits[:, -1]
    return torch.stack(out, dim=1)


def test_the_loss_scores_int8_samples_with_the_exact_float_student(student):
    model, tok = student
    torch.manual_seed(0)
    responses = [r or [2] for r in sample_responses(model, tok, PROMPTS, settings(), {2})]
    before = response_logp(model, PROMPTS, responses)  # the int8 copies exist now, and are not used here
    torch.manual_seed(1)
    sample_responses(model, tok, PROMPTS, settings(), {2})
    assert torch.equal(response_logp(model, PROMPTS, responses), before)
    prompts, tokens = torch.tensor([p[:3] for p in PROMPTS]), torch.tensor([[20, 21, 22]] * len(PROMPTS))
    int8, plain = stepwise_logits(model, prompts, tokens, True), stepwise_logits(model, prompts, tokens, False)
    assert not torch.equal(int8, plain)  # the sampler is another policy; the score is not it
    fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    _PACKED.clear()
    assert torch.equal(response_logp(model, PROMPTS, responses), before)
    assert all(torch.equal(p, fresh[n]) for n, p in model.named_parameters())


def test_int8_sampling_leaves_every_weight_bit_identical_and_no_forward_shadowed(student):
    model, tok = student
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for temperature in (0.0, 1.0):
        sample_responses(model, tok, PROMPTS, settings(temperature), {2})
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any("forward" in vars(m) for m in model.modules())
    assert any(p.requires_grad for p in model.parameters())


def test_a_tied_lm_head_is_quantized_as_a_copy(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    embedding = model.model.embed_tokens.weight.detach().clone()
    chosen = dict(float_linears(model))
    assert chosen["lm_head"] is model.lm_head and chosen["model.layers.0.mlp.down_proj"] is model.model.layers[0].mlp.down_proj
    assert [name for name in chosen if is_mlp_output(name)] == [f"model.layers.{i}.mlp.down_proj" for i in range(len(model.model.layers))]
    decode(model, PROMPTS, settings(0.0), {2}, 0)
    with int8_for_sampling(model, True):
        decode(model, PROMPTS, settings(0.0), {2}, 0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize("merge", [False, True])
def test_with_int8_off_greedy_decoding_is_what_it_was(student, merge, monkeypatch):
    """int8=False (the field's default) takes the code path of before: folded or not, no int8 copy."""
    model, tok = student
    made = []
    monkeypatch.setattr("sdcli.models.int8_sampling.pack_int8", lambda *a: made.append(1))
    ours = sample_responses(model, tok, PROMPTS, SamplingSettings(8, 0.0, 1.0, 0, merge=merge), {2})
    with eval_mode(model), merged_for_sampling(model, merge):
        before = [cut_at_eos(ids, {2}) for ids in decode(model, PROMPTS, settings(0.0, int8=False), {2}, 0)]
    assert ours == before and not made


def test_int8_greedy_agrees_with_float_greedy_on_most_tokens(student):
    """Each position with the same float prefix (teacher forcing), so one early difference does not
    count for every later token."""
    model, tok = student
    prompts = torch.tensor([p[:3] for p in PROMPTS])
    tokens = torch.tensor(sample_responses(model, tok, prompts.tolist(), settings(0.0, int8=False, tokens=16), set()))
    float_pick = stepwise_logits(model, prompts, tokens, False).argmax(-1)
    assert torch.equal(float_pick, tokens)  # greedy: float picks its own tokens
    agree = (stepwise_logits(model, prompts, tokens, True).argmax(-1) == float_pick).float().mean().item()
    assert agree >= 0.8, agree  # 0.97 here (64 positions of a random model, some with small margins)


def test_sample_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sample_in_int8("auto", cpu, quantized=False, sampled_support=False)
    assert not sample_in_int8("auto", cpu, quantized=True, sampled_support=False)
    assert not sample_in_int8("auto", cpu, quantized=False, sampled_support=True)
    assert not sample_in_int8("auto", cuda, quantized=False, sampled_support=False)
    assert not sample_in_int8("float", cpu, quantized=False, sampled_support=False)
    assert sample_in_int8("int8", cpu, quantized=False, sampled_support=False)
    with pytest.raises(UserError, match="CPU only"):
        sample_in_int8("int8", cuda, quantized=False, sampled_support=False)


def _recipe(tmp_path, *overrides):
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "demonstration": "a"}\n')
    return load_recipe(None, [f"data.path={tmp_path / 'd.jsonl'}", *overrides])


def test_sample_precision_in_the_recipe(tmp_path):
    assert _recipe(tmp_path).rollout.sample_precision == "auto"
    with pytest.raises(RecipeError, match="auto.*float.*int8|int8.*float"):
        _recipe(tmp_path, "rollout.sample_precision=int4")
    with pytest.raises(RecipeError, match="model.quantization=8bit"):
        _recipe(tmp_path, "rollout.sample_precision=int8", "model.quantization=8bit")
    sampled = ["loss.support=sampled", "loss.divergence=reverse_kl"]
    with pytest.raises(RecipeError) as e:
        _recipe(tmp_path, "rollout.sample_precision=int8", *sampled)
    assert "biases the estimate" in e.value.render() and "rollout.sample_precision=float" in e.value.render()
    for fine in ("auto", "float"):  # auto samples in float with this support
        assert _recipe(tmp_path, f"rollout.sample_precision={fine}", *sampled).loss.support.value == "sampled"
    assert _recipe(tmp_path, "rollout.sample_precision=int8", *sampled, "method=sft")


def test_training_samples_in_int8_by_default_on_a_cpu_and_keeps_the_base(tmp_path, tiny_model_dir, facts_jsonl,
                                                                         captured_model, monkeypatch):
    import sdcli.models.rollout as rollout_module
    import sdcli.training.setup as setup_module  # the episode's sampler calls sample_responses there
    import sdcli.training.train as train_module

    used, direct = [], []
    real = setup_module.sample_responses
    monkeypatch.setattr(setup_module, "sample_responses", lambda m, t, p, s, stop: used.append(s.int8) or real(m, t, p, s, stop))
    real_direct = rollout_module.direct_decode
    monkeypatch.setattr(rollout_module, "direct_decode", lambda *a, **k: direct.append(k["int8"]) or real_direct(*a, **k))
    recipe = load_recipe(None, [f"model.name_or_path={tiny_model_dir}", f"data.path={facts_jsonl}", f"run_dir={tmp_path}",
                                "train.max_steps=2", "train.prompts_per_step=2", "rollout.max_new_tokens=4",
                                "rollout.off_policy_fraction=0", "anchor.prompts_per_step=0"])
    train_module.train_episode(recipe, log=lambda line: None)
    assert used and all(used)
    assert len(direct) == len(used) and all(direct)  # a Llama-family model: the direct decoding steps
    model = captured_model["model"]
    base = {n.replace(".base_layer", "").removeprefix("base_model.model."): p for n, p in model.named_parameters() if "lora_" not in n}
    assert base.keys() == captured_model["base"].keys()
    for n, p in base.items():
        assert torch.equal(p, captured_model["base"][n]), n


def test_outlier_columns_go_through_float_and_the_rest_through_int8():
    """An input with one outlier column (as the MLP output projection's has): with that column in
    float the other columns keep their resolution, and the result is int8 of the rest plus float of it."""
    torch.manual_seed(0)
    weight = torch.randn(48, 96) * 0.05
    packed = pack_int8(weight, None)
    x = torch.randn(4, 96) * 0.2
    x[1, 7] = 300.0  # a massive activation in one row
    exact = x @ weight.t()
    plain = int8_matmul(x, packed)
    split = int8_matmul_outliers_in_float(x, packed, weight, threshold=16.0)
    rest = x.clone()
    rest[:, 7] = 0.0
    torch.testing.assert_close(split, int8_matmul(rest, packed) + x[:, 7:8] @ weight[:, 7:8].t())
    plain_error, split_error = (plain - exact).abs().max(), (split - exact).abs().max()
    assert split_error < plain_error / 10, (split_error, plain_error)
    # nothing beyond the threshold: exactly the plain int8 product; a [rows, 1, in] step keeps its shape
    assert torch.equal(int8_matmul_outliers_in_float(rest, packed, weight, threshold=16.0), int8_matmul(rest, packed))
    stepped = int8_matmul_outliers_in_float(x[:, None, :], packed, weight, threshold=16.0)
    assert stepped.shape == (4, 1, 48) and torch.equal(stepped[:, 0], split)
