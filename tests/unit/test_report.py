"""`sd report` on a hand-made run folder: tables, Markdown, and real PNG files."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from sdcli.core.data import file_sha256
from sdcli.core.errors import UserError
from sdcli.evaluation.leaks import describe_leaks
from sdcli.evaluation.report import build_report, episode_table, markdown_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_episode(run: Path, number: int, name: str, method: str, losses: list[float], eval_: dict | None,
                 old_names: bool = True) -> None:
    """An episode folder as sd writes it; `old_names`: with the metric names of runs written before
    they were namespaced (`loss`, `kl`), which users' run folders still hold."""
    folder = run / "episodes" / f"{number:03d}-{name}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"not really weights, but not empty")
    loss, divergence = ("loss", "kl") if old_names else ("loss/total", "loss/divergence")
    rows = [{"step": i + 1, loss: v, divergence: v if method == "self_distillation" else float("nan"),
             **({"signal/reward_mean": 0.1 * i} if method == "self_distillation" else {})} for i, v in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "lo')  # torn last line
    meta = {"number": number, "name": name, "method": method, "signal": "demonstrations", "steps": len(losses),
            "final": rows[-1], "adapter_sha256": file_sha256(folder / "adapter_model.safetensors")}
    if eval_ is not None:
        meta["eval"] = eval_
    (folder / "episode.json").write_text(json.dumps(meta))


def _set(name, role, score, teacher=None, **extra):
    return {"role": role, "name": name, "path": f"/d/{name}.jsonl", "sha256": f"sha-{name}", "n": 4,
            "score": score, "teacher_score": teacher, "teacher_n": 4 if teacher is not None else 0, **extra}


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    fake_episode(run, 1, "a", "self_distillation", [2.0, 1.5, 1.0, 0.8], {
        "sets": [_set("a", "task", 0.75, 1.0, before={"score": 0.0, "teacher_score": 1.0},
                      base={"score": 0.0, "teacher_score": 1.0}), _set("b", "retain", 0.0, 0.5, leaked={"n": 0, "answers": {}})],
        "drift": {"kl_from_base": 0.02, "perplexity": 11.0, "base_perplexity": 10.0},
    })
    fake_episode(run, 2, "b", "sft", [3.0, 2.0, 1.2], {
        "sets": [_set("b", "task", 1.0, 1.0, before={"score": 0.0, "teacher_score": 0.5},
                      base={"score": 0.0, "teacher_score": 0.5},
                      by_kind={"direct": {"n": 2, "score": 1.0, "teacher_score": 1.0, "teacher_n": 2},
                               "situation": {"n": 2, "score": 0.5, "teacher_score": 1.0, "teacher_n": 2}}),
                 _set("a", "retain", 0.5, 1.0, leaked={"n": 2, "answers": {"Quenta": 1, "Tiln": 2}})],
        "drift": {"kl_from_base": 0.05, "perplexity": 12.5, "base_perplexity": 10.0},
    })
    return run


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 150, (path, width, height)
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    colours = {tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::7].round(2).tolist()}
    assert len(colours) > 20, f"{path} looks blank ({len(colours)} colours)"


def test_report_writes_plots_and_summary(run_dir, tmp_path):
    import matplotlib  # noqa: F401  (the plot extra; CI installs it, so a missing one fails)
    out = tmp_path / "report"
    report = build_report(run_dir, out)
    assert sorted(p.name for p in report.files) == ["drift.png", "matrix.png", "summary.md", "training.png"]
    for name in ("training.png", "matrix.png", "drift.png"):
        check_png(out / name)
    md = (out / "summary.md").read_text()
    assert "| 001 | a | self_distillation |" in md and "| 002 | b | sft |" in md
    assert "Continual-learning matrix" in md and "![matrix](matrix.png)" in md
    assert "| base | 0.00 | 0.00 | 0.00 |" in md  # both tasks unknown to the base
    assert "ACC (average score after the last episode, over 2 task(s)): 0.750" in md
    assert "BWT (backward transfer; negative = forgetting): -0.250" in md
    assert report.matrix.drift[0]["perplexity"] == 10.0


def test_report_default_folder_and_an_explicit_matrix_file(run_dir, tmp_path):
    import matplotlib  # noqa: F401  (the plot extra; CI installs it, so a missing one fails)
    matrix_file = tmp_path / "m.json"
    matrix_file.write_text(json.dumps({"matrix": {
        "rows": ["base", "001-a", "002-b"], "columns": ["x", "y"], "taught_by": [1, 2],
        "scores": [[0.0, 0.0], [1.0, 0.5], [0.5, 1.0]], "teacher": None,
    }}))
    report = build_report(run_dir, None, matrix_file)
    assert report.out_dir == run_dir / "report" and (run_dir / "report" / "matrix.png").is_file()
    assert report.matrix.columns == ["x", "y"]
    assert "drift.png" not in [p.name for p in report.files]  # the file has no drift rows
    assert f"from {matrix_file}" in (run_dir / "report" / "summary.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a matrix file"):
        build_report(run_dir, None, bad)


def test_report_without_eval_results_still_plots_training(tmp_path):
    import matplotlib  # noqa: F401  (the plot extra; CI installs it, so a missing one fails)
    run = tmp_path / "run"
    fake_episode(run, 1, "a", "sft", [2.0, 1.0], None)
    report = build_report(run, tmp_path / "out")
    assert sorted(p.name for p in report.files) == ["summary.md", "training.png"]
    check_png(tmp_path / "out" / "training.png")
    assert "No evaluation results" in (tmp_path / "out" / "summary.md").read_text()


def test_missing_matplotlib_is_a_clear_user_error(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(UserError) as caught:
        build_report(run_dir, None)
    assert "pip install 'sd[plot]'" in caught.value.render()


def test_not_a_run_folder(tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        build_report(tmp_path, None)


def test_episode_table_and_markdown(run_dir):
    from sdcli.models.episodes import list_episodes

    header, rows = episode_table(list_episodes(run_dir))
    assert header[7:14] == ["demo NLL student / teacher", "disagreement", "task score", "teacher", "task by kind",
                            "retain (mean)", "leaked answers"]
    assert rows[0][5:] == ["0.8000", "0.8000", "- / -", "-", "0.750", "1.000", "-", "0.000", "0", "0.0200", "11.00"]
    assert rows[1][13] == "2 (Tiln 2, Quenta 1)"  # the most frequent answer first
    # several retain sets: their answers added up; none looked for (an older run): "-"
    assert describe_leaks([{"n": 2, "answers": {"Quenta": 1, "Tiln": 2}}, {"n": 1, "answers": {"Tiln": 1}}]) == \
        "3 (Tiln 3, Quenta 1)"
    assert describe_leaks([]) == "-" and describe_leaks([{"n": 0, "answers": {}}]) == "0"
    assert rows[1][11] == "direct 1.000, situation 0.500"  # eval lines that name a kind
    assert rows[1][6] == "-"  # sft has no divergence
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_training_plot_shows_the_learning_view_when_the_metrics_have_it(run_dir, tmp_path):
    from sdcli.evaluation.report import plot_training, require_matplotlib, training_panels
    from sdcli.models.episodes import list_episodes

    rows = [{"step": i + 1, "loss/total": 1.0 / (i + 1), "loss/divergence": 0.5, "learn/demo_nll_student": 3.0 - i,
             "learn/demo_nll_teacher": 0.4, "learn/disagreement": 0.3} for i in range(3)]
    titles = [title for title, _ in training_panels([rows])]
    assert any("demonstration NLL" in t for t in titles) and any("top tokens differ" in t for t in titles)
    assert not any("anchor" in t for t in titles)  # no data, no panel
    episodes = list_episodes(run_dir)[:1]
    path = plot_training(require_matplotlib(), episodes, [rows], tmp_path / "training.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_runs_written_with_the_old_metric_names_report_as_new_ones(tmp_path):
    """metrics.jsonl and episode.json of older runs say `loss` and `kl`; `sd report` reads them as
    loss/total and loss/divergence: the same table and the same training panels as a new run."""
    from sdcli.evaluation.report import read_metrics, training_panels
    from sdcli.models.episodes import list_episodes

    tables, panels, rows = [], [], []
    for old in (True, False):
        run = tmp_path / ("old" if old else "new")
        fake_episode(run, 1, "a", "self_distillation", [2.0, 1.0], None, old_names=old)
        episodes = list_episodes(run)
        tables.append(episode_table(episodes))
        rows.append(read_metrics(episodes[0]))
        panels.append([title for title, _ in training_panels([rows[-1]])])
    assert tables[0] == tables[1]
    assert tables[0][1][0][5:7] == ["1.0000", "1.0000"]  # final loss and divergence, read from the old names
    assert rows[0] == rows[1] and rows[0][0]["loss/total"] == 2.0 and "loss" not in rows[0][0]
    assert panels[0] == panels[1] and panels[0][:2] == ["loss", "divergence (student vs teacher, per token)"]


def test_sd_report_without_matplotlib_prints_the_install_command(run_dir, monkeypatch):
    """The command as the user sees it: rich markup used to swallow `[plot]`, leaving "pip install 'sd'"."""
    from typer.testing import CliRunner

    from sdcli.cli import app

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    done = CliRunner().invoke(app, ["report", str(run_dir)])
    printed = done.output + (done.stderr if done.stderr_bytes is not None else "")
    assert done.exit_code == 2, printed
    assert "pip install 'sd[plot]'" in printed
