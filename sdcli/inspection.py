"""`sd inspect`: what the teacher wants, token by token.

For one prompt of a data file, the responses are drawn as the training loop draws them (sampled
from the student with the recipe's settings, or greedily; logged ones for offline interactions),
or, with `--demonstration`, the response is the example's own demonstration, as the off-policy
half of the loop learns it (on a held-out line that the student answers wrongly, the token the
teacher wants far more of is where the student leaves the demonstration's sentence),
the run's recipe signal builds the teacher's context for each exactly as in training (siblings,
verifiers and environments included), and both roles score every response token with the loop's
own functions (`teacher_pass`, `response_hidden`, `packed_divergence_and_stats`). Per token:

    advantage(y_t) = log p_teacher(y_t) - log p_student(y_t)

positive where the teacher wants more of y_t, negative where it wants less; beside it, the
teacher's most likely token where that is not y_t. The summaries are the loop's `learning_metrics`.

Which student and teacher: the run's adapters up to `--upto`, as the next episode would begin
with them. At the start of an episode the base, live and EMA teachers are all that model; the
student runs without dropout here, like the teacher.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcli.core.data import Messages
from sdcli.core.errors import UserError
from sdcli.core.numbers import fmt
from sdcli.models.model import base_model

FULL_COLOUR_AT = 3.0  # |advantage| at which a token's colour is at full strength


@dataclass
class TokenRow:
    token_id: int  # y_t
    token: str  # y_t as text
    student_logp: float
    teacher_logp: float
    teacher_top: str | None  # the teacher's most likely token there, when it is not y_t

    @property
    def advantage(self) -> float:
        return self.teacher_logp - self.student_logp


@dataclass
class SampleView:
    response: str
    teacher_messages: Messages | None  # None: masked, no loss on this sample
    masked_reason: str | None = None
    reward: float | None = None
    success: bool | None = None
    feedback: str | None = None
    tokens: list[TokenRow] = field(default_factory=list)
    simulated_followup: str | None = None  # interactions, online: the user simulator's follow-up to this response
    demonstration: bool = False  # the example's own demonstration, not a response drawn from the student


@dataclass
class Inspection:
    run: str
    model: str  # which adapters
    example_id: str
    signal: str
    prompt: Messages
    samples: list[SampleView]
    summary: dict[str, float]  # the loop's per-step metrics, for these samples


def inspect_example(
    run_dir: Path, data: Path, index: int, *, upto: int | None = None, greedy: bool = False,
    samples: int | None = None, max_new_tokens: int | None = None, seed: int = 0, demonstration: bool = False,
    log=lambda message: None,
) -> Inspection:
    """Sample (or, with `demonstration`, take the example's demonstration), build the teacher's
    context and score one example of `data` (0-based `index`)."""
    from sdcli.models.source import load_source
    from sdcli.training.metrics import signal_metrics

    run_dir, data = Path(run_dir), Path(data)
    if demonstration and (greedy or samples is not None or max_new_tokens is not None):
        raise UserError("--demonstration scores the example's own demonstration; --greedy, --samples and "
                        "--max-new-tokens draw responses from the student.", hint="Use one or the other.")
    recipe, signal, example = _read_example(run_dir, data, index, upto)
    found = signal.demonstration_view(example) if demonstration else None
    if demonstration and found is None:
        raise UserError(f"--demonstration: example {index} of {data} carries no demonstration (or reference "
                        f"solution) for signal '{recipe.signal.kind}'.",
                        hint="Drop --demonstration to score responses drawn from the student.")
    torch.manual_seed(seed)
    loaded = load_source(run_dir, upto=upto)
    if found is not None:
        seqs, teacher_encoder = _demonstration_response(recipe, signal, example, loaded.model, loaded.tokenizer, log=log)
        texts = [found[0]]
    else:
        seqs, texts, teacher_encoder = _draw_responses(
            recipe, signal, example, loaded.model, loaded.tokenizer, greedy=greedy, samples=samples,
            max_new_tokens=max_new_tokens, log=log,
        )
    kept = [q for q in seqs if q.view.messages is not None and q.response]
    summary = signal_metrics([q.view for q in seqs])
    rows = _score_tokens(recipe, loaded.model, loaded.tokenizer, teacher_encoder, kept, summary) if kept else {}
    views = [
        SampleView(text, q.view.messages, q.view.masked_reason, q.view.reward, q.view.success, q.view.feedback,
                   rows.get(id(q), []), q.view.simulated_followup, demonstration)
        for q, text in zip(seqs, texts)
    ]
    what = loaded.description + (" (greedy)" if greedy else "")
    what += " (the example's demonstration)" if demonstration else ""
    return Inspection(str(run_dir), what, example.id, recipe.signal.kind, example.prompt, views, summary)


def _read_example(run_dir: Path, data: Path, index: int, upto: int | None):
    """(the recipe of the run's episode `upto`, its signal, example `index` of `data` in that
    signal's format); every problem with the run, the data or the index before a model loads."""
    from sdcli.models.source import is_run_dir, select_episodes
    from sdcli.recipe.loading import load_recipe
    from sdcli.signals import build_signal

    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run folder (no episodes/ inside).",
                        hint="Pass the run_dir of a recipe that has been trained, e.g. sd inspect runs/quickstart ...")
    chosen = select_episodes(run_dir, upto)  # every problem with the run before the data is read
    recipe_file = (chosen or select_episodes(run_dir, None)[:1])[-1].path / "recipe.yaml"
    recipe = load_recipe(recipe_file, check_files=False)
    if not data.is_file():
        raise UserError(f"--data {data}: file not found.")
    signal = build_signal(recipe.signal)
    if hasattr(signal, "check"):
        signal.check()  # a user reward or environment imports, as in training
    examples = signal.load(data).examples
    if not 0 <= index < len(examples):
        raise UserError(f"--index {index}: {data} has {len(examples)} example(s) for signal '{recipe.signal.kind}', "
                        f"numbered 0..{len(examples) - 1}.")
    return recipe, signal, examples[index]


def _encoders(recipe, model, tokenizer, log):
    """The student's and the teacher's prompt encoders and the stop tokens, as the loop makes them."""
    from sdcli.models.sequences import PromptEncoder, TeacherPromptEncoder, eos_ids, teacher_prompt_limit

    limit = teacher_prompt_limit(recipe.model.max_teacher_prompt_tokens, base_model(model).config,
                                 recipe.rollout.max_new_tokens)
    return (PromptEncoder(tokenizer, recipe.model.max_prompt_tokens), TeacherPromptEncoder(tokenizer, limit, warn=log),
            eos_ids(tokenizer, model))


def _demonstration_response(recipe, signal, example, model, tokenizer, *, log):
    """The example's demonstration as the one response, with the teacher's view of it, as the
    loop's off-policy half learns it (the whole question: no words left out): (sequences, the
    teacher's prompt encoder)."""
    from sdcli.training.batch import off_policy_sequences

    encoder, teacher_encoder, stop = _encoders(recipe, model, tokenizer, log)
    seqs, _ = off_policy_sequences([example], 1, signal, encoder, tokenizer, stop)
    return seqs, teacher_encoder


def _draw_responses(recipe, signal, example, model, tokenizer, *, greedy: bool, samples: int | None,
                    max_new_tokens: int | None, log):
    """The responses to the example, drawn as the training loop draws them, each with the teacher's
    view the signal builds for it: (sequences, response texts, the teacher's prompt encoder)."""
    from sdcli.models.rollout import SamplingSettings, sample_responses
    from sdcli.training.batch import rollout_sequences
    from sdcli.training.simulator import attach_user_simulator

    base = base_model(model)
    encoder, teacher_encoder, stop = _encoders(recipe, model, tokenizer, log)
    rollout = recipe.rollout
    settings = SamplingSettings(max_new_tokens or rollout.max_new_tokens, 0.0 if greedy else rollout.temperature,
                                rollout.top_p, rollout.top_k, merge=False)
    attach_user_simulator(signal, model, tokenizer, base.config, log=log,  # interactions, online: as in training
                          sample=lambda prompts, simulator: sample_responses(model, tokenizer, prompts, simulator, stop))
    seqs, _ = rollout_sequences([example], samples or rollout.num_samples, encoder, tokenizer, stop,
                                lambda prompts: sample_responses(model, tokenizer, prompts, settings, stop))
    texts = tokenizer.batch_decode([q.response for q in seqs], skip_special_tokens=True)
    for q, view in zip(seqs, signal.teacher_views(example, texts)):
        q.view = view
    return seqs, texts, teacher_encoder


def _score_tokens(recipe, model, tokenizer, teacher_encoder, kept: list, summary: dict) -> dict[int, list[TokenRow]]:
    """Both roles score every token of the `kept` responses with the loop's own functions; adds the
    loop's learning metrics to `summary` and returns the token rows of each response, by id()."""
    from sdcli.models.sequences import response_hidden, score_batch
    from sdcli.training.batch import KIND_INDEX
    from sdcli.training.losses import (
        STAT_STUDENT_LOGP, STAT_TEACHER_LOGP, STAT_TEACHER_TOP, DivergenceSpec, packed_divergence_and_stats,
    )
    from sdcli.training.metrics import learning_metrics
    from sdcli.training.teacher import target_settings, teacher_pass

    base = base_model(model)
    decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    device = next(model.parameters()).device
    kinds = torch.tensor([KIND_INDEX[q.kind] for q in kept], dtype=torch.long, device=device)  # as the loop counts them
    adapters = list(model.base_model.active_adapters) if hasattr(model, "peft_config") else []
    with torch.no_grad():
        t_hidden = teacher_pass(model, decoder, teacher_encoder, kept, tokenizer.pad_token_id, device, adapters, adapters)
        s_batch = score_batch([q.prompt for q in kept], [q.response for q in kept], tokenizer.pad_token_id, device)
        s_hidden = response_hidden(decoder, s_batch)
        t_hidden = t_hidden.to(s_hidden.dtype)
        every = s_batch.response_mask  # every token is shown; the loss skips the first ones, as in training
        per_token, stats = packed_divergence_and_stats(
            s_hidden, t_hidden, every, lm_head, DivergenceSpec.from_config(recipe.loss), s_batch.response_ids,
            recipe.loss.chunk_tokens, None, *target_settings(kinds, recipe.loss, every),
        )
    mask = every.clone()
    mask[:, : recipe.loss.skip_first_tokens] = False
    summary.update(learning_metrics(per_token, stats, mask, kinds))
    summary["kl"] = float((per_token * mask).sum() / mask.sum()) if bool(mask.any()) else float("nan")
    summary["signal/teacher_prompts_cut"] = teacher_encoder.cut
    def row(y: int, at: torch.Tensor) -> TokenRow:
        top = int(at[STAT_TEACHER_TOP])
        return TokenRow(y, tokenizer.decode([y]), float(at[STAT_STUDENT_LOGP]), float(at[STAT_TEACHER_LOGP]),
                        tokenizer.decode([top]) if top != y else None)

    return {id(q): [row(y, stats[i, t]) for t, y in enumerate(q.response)] for i, q in enumerate(kept)}


# --- summaries ------------------------------------------------------------------------------------

SUMMARY_LABELS = {
    "advantage/mean": "mean advantage (log p_teacher - log p_student)",
    "advantage/large_fraction": "share of tokens with |advantage| > 1",
    "advantage/positive_fraction": "share of tokens the teacher wants more of",
    "learn/disagreement": "share of positions where the roles' top tokens differ",
    "loss/on_policy": "loss (per-sequence mean of the recipe's divergence)",
    "loss/off_policy": "loss on the demonstration (per-sequence mean of the recipe's divergence)",
    "learn/demo_nll_student": "the demonstration's NLL per token under the student",
    "learn/demo_nll_teacher": "the demonstration's NLL per token under the teacher",
    "kl": "divergence per token",
    "signal/context_fraction": "share of samples with a context",
    "signal/reward_mean": "mean reward",
    "signal/success_rate": "success rate",
    "signal/teacher_prompts_cut": "teacher prompts cut to fit",
    "signal/simulated_followups": "follow-ups written by the user simulator",
    "signal/simulated_followup_chars": "mean length of a simulated follow-up, in characters",
}


def summary_rows(result: Inspection) -> list[tuple[str, str, str]]:
    """(metric key, meaning, value) for every summary the run's metrics.jsonl would hold."""
    rows = []
    for key, label in SUMMARY_LABELS.items():
        if key in result.summary:
            value = result.summary[key]
            rows.append((key, label, fmt(value, 4, significant=True)))
    return rows


def sample_caption(i: int, sample: SampleView, n: int) -> str:
    parts = ["the example's demonstration" if sample.demonstration else f"sample {i + 1} of {n}"]
    if sample.reward is not None:
        parts.append(f"reward {sample.reward:g}")
    if sample.success is not None:
        parts.append("success" if sample.success else "failed")
    if sample.teacher_messages is None:
        parts.append(f"masked ({sample.masked_reason or 'no context'}): no loss on it")
    return ", ".join(parts)


# --- terminal ----------------------------------------------------------------------------------


def _rgb(advantage: float) -> tuple[int, int, int] | None:
    strength = min(1.0, abs(advantage) / FULL_COLOUR_AT)
    if strength < 0.05:
        return None
    level = int(60 + 160 * strength)
    return (0, level, 0) if advantage > 0 else (level, 0, 0)


def print_inspection(result: Inspection, console) -> None:
    """The coloured responses, the teacher's view of each, and the summaries, with rich."""
    from rich.color import Color
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    console.print(Text(f"{result.model}; example {result.example_id}; signal {result.signal}", style="bold"))
    console.print(Text("prompt: ", style="bold") + Text(result.prompt[-1]["content"]))
    legend = Text("legend: ")
    for value in (-3, -1, 1, 3):
        r, g, b = _rgb(value)
        legend.append(f" {value:+d} ", style=Style(color="white", bgcolor=Color.from_rgb(r, g, b)))
    legend.append("  green: the teacher wants more of the token, red: less (advantage = log p_teacher - log p_student, "
                  f"full colour at ±{FULL_COLOUR_AT:g}); ‹x›: the teacher's most likely token there", style="dim")
    console.print(legend)
    for i, sample in enumerate(result.samples):
        console.rule(sample_caption(i, sample, len(result.samples)))
        if sample.simulated_followup is not None:
            console.print(Text("the user simulator's follow-up to this response: ", style="bold") + Text(sample.simulated_followup))
        if sample.teacher_messages is not None:
            console.print(Text("the teacher sees, in place of the prompt:", style="bold"))
            console.print(Text(sample.teacher_messages[-1]["content"], style="dim"))
        if not sample.tokens:
            console.print(Text(sample.response))
            continue
        text = Text()
        for row in sample.tokens:
            rgb = _rgb(row.advantage)
            text.append(row.token, style=Style(color="white", bgcolor=Color.from_rgb(*rgb)) if rgb else None)
            if row.teacher_top is not None:
                text.append(f"‹{row.teacher_top}›", style="dim cyan")
        console.print(text)
    table = Table(title="as the training loop logs it")
    for column in ("metric", "meaning", "value"):
        table.add_column(column)
    for row in summary_rows(result):
        table.add_row(*row)
    console.print(table)


# --- HTML --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
pre, .response { white-space: pre-wrap; font-family: ui-monospace, monospace; }
.response { line-height: 1.9; border: 1px solid #ccc; padding: 0.6em; }
.tok { border-radius: 2px; }
.top { font-size: 0.7em; color: #06c; vertical-align: super; }
table { border-collapse: collapse; margin: 0.6em 0; }
td, th { border: 1px solid #ccc; padding: 0.15em 0.5em; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
.legend span.tok { padding: 0 0.4em; }
.masked { color: #a60; }
"""


def _background(advantage: float) -> str:
    strength = min(1.0, abs(advantage) / FULL_COLOUR_AT)
    colour = "0, 170, 0" if advantage > 0 else "220, 0, 0"
    return f"background-color: rgba({colour}, {0.75 * strength:.3f})"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def render_html(result: Inspection) -> str:
    """A self-contained page: inline CSS, no scripts, nothing fetched; every text escaped."""
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sd inspect: {_esc(result.example_id)}</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>What the teacher wants</h1>",
        f"<p>{_esc(result.model)}; example <code>{_esc(result.example_id)}</code>; signal <code>{_esc(result.signal)}</code></p>",
        '<div class="legend"><h2>Legend</h2><p>Each response token is coloured by its advantage, '
        "log p<sub>teacher</sub>(token) &minus; log p<sub>student</sub>(token): "
        + "".join(f'<span class="tok" style="{_background(v)}">{v:+d}</span> ' if v else "0 " for v in (-3, -2, -1, 0, 1, 2, 3))
        + f"<br>green: the teacher wants more of the token; red: less; full colour at &plusmn;{FULL_COLOUR_AT:g}. "
        '<span class="top">blue</span>: the teacher&#x27;s most likely token at that position, where it is not the '
        "response&#x27;s. Hover over a token for its numbers.</p></div>",
        "<h2>Summary, as the training loop logs it</h2><table><tr><th>metric</th><th>meaning</th><th>value</th></tr>",
        *(f'<tr><td><code>{_esc(k)}</code></td><td>{_esc(label)}</td><td class="num">{_esc(v)}</td></tr>'
          for k, label, v in summary_rows(result)),
        "</table>", "<h2>The student&#x27;s prompt</h2>",
        *(f"<p><b>{_esc(m['role'])}</b></p><pre>{_esc(m['content'])}</pre>" for m in result.prompt),
    ]
    for i, sample in enumerate(result.samples):
        out.append(f"<h2>{_esc(sample_caption(i, sample, len(result.samples)).capitalize())}</h2>")
        if sample.simulated_followup is not None:
            out.append(f"<p>the user simulator&#x27;s follow-up to this response:</p><pre>{_esc(sample.simulated_followup)}</pre>")
        elif sample.feedback:
            out.append(f"<p>feedback:</p><pre>{_esc(sample.feedback)}</pre>")
        if sample.teacher_messages is None:
            out.append(f'<p class="masked">The teacher sees no context for this sample.</p><pre>{_esc(sample.response)}</pre>')
            continue
        out.append("<details><summary>The teacher sees, in place of the prompt</summary>"
                   f"<pre>{_esc(sample.teacher_messages[-1]['content'])}</pre></details>")
        spans = []
        for row in sample.tokens:
            title = (f"advantage {row.advantage:+.3f}; log p student {row.student_logp:.3f}; "
                     f"log p teacher {row.teacher_logp:.3f}"
                     + (f"; the teacher prefers {row.teacher_top!r}" if row.teacher_top is not None else ""))
            spans.append(f'<span class="tok" style="{_background(row.advantage)}" title="{_esc(title)}">{_esc(row.token)}</span>'
                         + (f'<span class="top">{_esc(row.teacher_top)}</span>' if row.teacher_top is not None else ""))
        out.append(f'<div class="response">{"".join(spans)}</div>')
        out.append("<table><tr><th>#</th><th>token</th><th>id</th><th>log p student</th><th>log p teacher</th><th>advantage</th>"
                   "<th>teacher&#x27;s most likely token</th></tr>")
        for t, row in enumerate(sample.tokens):
            top = _esc(repr(row.teacher_top)) if row.teacher_top is not None else ""
            out.append(f'<tr><td class="num">{t}</td><td><code>{_esc(repr(row.token))}</code></td><td class="num">{row.token_id}</td>'
                       f'<td class="num">{row.student_logp:.3f}</td><td class="num">{row.teacher_logp:.3f}</td>'
                       f'<td class="num" style="{_background(row.advantage)}">{row.advantage:+.3f}</td><td><code>{top}</code></td></tr>')
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
