"""The teacher is the base model (episode adapter off); sampling with folded weights changes nothing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdcli.models.model import add_trainable_adapter, load_base, merged_for_sampling
from sdcli.models.sequences import response_hidden, score_batch
from sdcli.recipe.sections import LoraSettings, ModelConfig, TeacherKind
from sdcli.training.teacher import EMA_ADAPTER, add_ema_adapter, teacher_adapters, teacher_hidden, update_ema


def randomize_lora(model, name, scale=0.5):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture()
def student(tiny_model_dir):
    loaded = load_base(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = add_trainable_adapter(loaded.model, "ep001", LoraSettings(r=4, alpha=8))
    randomize_lora(model, "ep001")
    return model


def batch():
    return score_batch([[1, 5, 9, 12], [1, 7]], [[20, 21, 22], [30, 2]], pad_id=0, device="cpu")


def logits_of(model, hidden):
    return model.get_base_model().get_output_embeddings()(hidden)


def test_teacher_logits_equal_plain_base_model(student, tiny_model_dir):
    b = batch()
    decoder = student.get_base_model().get_decoder()
    teacher = logits_of(student, teacher_hidden(student, decoder, b, teacher_adapters(TeacherKind.base, [], "ep001")))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        full = plain(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    want = full.gather(1, b.predict_positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    mask = b.response_mask
    torch.testing.assert_close(teacher[mask], want[mask], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        s = logits_of(student, response_hidden(decoder, b))
    assert (s[mask] - want[mask]).abs().max() > 1e-2  # the adapter really changes the student


def test_live_teacher_is_the_student_and_flags_survive(student):
    b = batch()
    decoder = student.get_base_model().get_decoder()
    live = teacher_hidden(student, decoder, b, teacher_adapters(TeacherKind.live, [], "ep001"))
    with torch.no_grad():
        s = response_hidden(decoder, b)
    torch.testing.assert_close(live, s)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".ep001." in n and "lora_" in n for n in trainable)


def test_folded_sampling_weights_match_and_restore_bit_for_bit(student):
    b = batch()
    decoder = student.get_base_model().get_decoder()
    before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        unfolded = response_hidden(decoder, b)
        with merged_for_sampling(student, True):
            folded = response_hidden(decoder, b)
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5)
    for n, p in student.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert any(p.requires_grad for p in student.parameters())


def test_ema_teacher_starts_as_episode_adapter_and_moves_by_decay(student):
    add_ema_adapter(student, "ep001", LoraSettings(r=4, alpha=8))
    params = dict(student.named_parameters())
    key = next(n for n in params if ".ep001." in n and "lora_B" in n)
    ema_key = key.replace(".ep001.", f".{EMA_ADAPTER}.")
    assert torch.equal(params[key], params[ema_key]) and not params[ema_key].requires_grad
    assert params[key].requires_grad
    old_ema = params[ema_key].detach().clone()
    with torch.no_grad():
        params[key].add_(1.0)
    update_ema(student, "ep001", decay=0.9)
    torch.testing.assert_close(params[ema_key], 0.9 * old_ema + 0.1 * params[key])
    assert student.base_model.active_adapters == ["ep001"]  # the EMA adapter is never in the student


def test_folding_is_skipped_for_a_quantized_base_and_the_adapter_still_counts(tiny_model_dir):
    from sdcli.recipe.sections import Quantization

    loaded = load_base(ModelConfig(name_or_path=str(tiny_model_dir), quantization=Quantization.four_bit))
    model = add_trainable_adapter(loaded.model, "ep001", LoraSettings(r=4, alpha=8))
    randomize_lora(model, "ep001")
    b = batch()
    decoder = model.get_base_model().get_decoder()
    with torch.no_grad():
        unfolded = response_hidden(decoder, b)
        with merged_for_sampling(model, True):
            inside = response_hidden(decoder, b)
        with model.disable_adapter():
            bare = response_hidden(decoder, b)
    torch.testing.assert_close(inside, unfolded)
    assert (inside - bare).abs().max() > 1e-3


def test_folding_inside_an_adapter_off_context_folds_nothing_and_keeps_them_off(student, tiny_model_dir):
    """merged_for_sampling owns the fold decision: under active_adapters(model, []) (the bare base) the
    adapters are still listed as active, and folding them put them back, inside the block and after it."""
    from transformers import AutoTokenizer

    from sdcli.models.rollout import SamplingSettings, sample_responses
    from sdcli.models.stack import active_adapters

    b = batch()
    decoder = student.get_base_model().get_decoder()
    with torch.no_grad():
        adapted = response_hidden(decoder, b)
        with active_adapters(student, []):
            bare = response_hidden(decoder, b)
            with merged_for_sampling(student, True):
                inside = response_hidden(decoder, b)
            after = response_hidden(decoder, b)  # the caller's context is still adapter-off
    assert (adapted - bare).abs().max() > 1e-3  # the adapter matters, so folding it would show
    torch.testing.assert_close(inside, bare)
    torch.testing.assert_close(after, bare)

    # the same through the sampling helper: greedy with merge=True under adapters-off is the bare base
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[1, 5, 9, 12], [1, 7, 3]]
    settings = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0)
    with active_adapters(student, []):
        folded = sample_responses(student, tokenizer, prompts, SamplingSettings(**settings, merge=True), {-1})
        plain = sample_responses(student, tokenizer, prompts, SamplingSettings(**settings, merge=False), {-1})
    with student.disable_adapter():
        base = sample_responses(student, tokenizer, prompts, SamplingSettings(**settings, merge=False), {-1})
    adapted_answers = sample_responses(student, tokenizer, prompts, SamplingSettings(**settings, merge=False), {-1})
    assert folded == plain == base
    assert adapted_answers != base  # greedy answers that can tell the two apart


def test_teacher_memo_reuses_off_policy_hidden_states_exactly(student, tiny_model_dir, monkeypatch):
    """teacher: base never changes in an episode, so a demonstration scored again (next epoch)
    takes its first pass's hidden states; samples are scored every time; the memo has a size cap."""
    from transformers import AutoTokenizer

    import sdcli.training.teacher as teacher
    from sdcli.models.sequences import TeacherPromptEncoder
    from sdcli.signals.base import TeacherView
    from sdcli.training.batch import OFF_POLICY, ON_POLICY, Sequence

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoder = TeacherPromptEncoder(tokenizer, 512)
    decoder = student.get_base_model().get_decoder()
    adapters = teacher_adapters(TeacherKind.base, [], "ep001")

    def sequences():
        view = TeacherView(messages=[{"role": "user", "content": "The answer is 4. What is 2+2?"}])
        return [Sequence([1, 5, 9], [20, 21, 22], view, OFF_POLICY), Sequence([1, 7], [30, 2], view, ON_POLICY)]

    rows_scored = []
    real = teacher.teacher_hidden
    monkeypatch.setattr(teacher, "teacher_hidden",
                        lambda m, d, b, a: rows_scored.append(b.input_ids.shape[0]) or real(m, d, b, a))
    memo = teacher.TeacherMemo()
    plain = teacher.teacher_pass(student, decoder, encoder, sequences(), 0, "cpu", adapters, adapters)
    first = teacher.teacher_pass(student, decoder, encoder, sequences(), 0, "cpu", adapters, adapters, memo)
    again = teacher.teacher_pass(student, decoder, encoder, sequences(), 0, "cpu", adapters, adapters, memo)
    assert rows_scored == [2, 2, 1]  # the second time only the sample is scored
    torch.testing.assert_close(first, plain)
    valid = torch.tensor([[True, True, True], [True, True, False]])  # the sample's last slot is padding
    torch.testing.assert_close(again[valid], plain[valid], rtol=1e-5, atol=1e-5)
    assert memo.bytes == 3 * plain.shape[-1] * 4

    full = teacher.TeacherMemo(max_bytes=memo.bytes - 1)  # no room for even one: everything scored each time
    teacher.teacher_pass(student, decoder, encoder, sequences(), 0, "cpu", adapters, adapters, full)
    teacher.teacher_pass(student, decoder, encoder, sequences(), 0, "cpu", adapters, adapters, full)
    assert rows_scored[3:] == [2, 2] and full.bytes == 0
