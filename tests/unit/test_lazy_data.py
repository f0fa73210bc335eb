"""Training data is indexed, not held: `report.examples` reads each example from the file when asked,
and must give exactly what reading the whole file would, in as little memory as an index takes."""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
from array import array
from pathlib import Path

import pytest

from sdcli.core.data import JsonlScan, LazyRecords
from sdcli.core.errors import DataError
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.signal_sections import DemonstrationsSignal, InteractionsSignal, RewardsSignal
from sdcli.signals import build_signal
from sdcli.signals import demonstrations, rewards
from sdcli.signals.interactions import InteractionsBuilder, parse_conversation

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def lines_of(path: Path):
    """(line_number, object) for every non-blank line, read without the code under test."""
    text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    return [(n, json.loads(s)) for n, s in enumerate(text.split("\n"), start=1) if s.strip()]


def eager_examples(builder, path: Path) -> list:
    """Every example of the file, built line by line from the whole file in memory, as sd did before
    it indexed the file, through the signal's own per-line function."""
    path = Path(path)
    out = []
    for line, record in lines_of(path):
        if isinstance(builder, InteractionsBuilder):
            messages = parse_conversation(record)
            made = [builder.turn_example(path, line, record, messages, i) for i, m in enumerate(messages) if m["role"] == "assistant"]
            out += [e for e in made if not isinstance(e, str)]
        elif isinstance(builder, demonstrations.DemonstrationsBuilder):
            out.append(demonstrations.line_example(path, line, record))
        else:
            out.append(rewards.line_example(path, line, record, lambda r: []))
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_lazy_examples_equal_the_eager_list_for_every_shipped_recipe(recipe):
    r = load_recipe(recipe, check_files=False)
    builder = build_signal(r.signal)
    examples = builder.load(r.data.path).examples
    eager = eager_examples(builder, r.data.path)
    assert isinstance(examples, LazyRecords)
    assert len(examples) == len(eager) > 0
    assert list(examples) == eager  # iteration
    assert [examples[i] for i in range(len(eager))] == eager  # indexing, one read each


def awkward_file(tmp_path: Path) -> Path:
    """A byte-order mark, blank lines, CRLF endings and multi-byte characters: offsets are in bytes."""
    rows = [{"prompt": "Café? ☕", "demonstration": "Oui, un café. 日本語"}, {"id": "x", "prompt": "Zwei?", "demonstration": "Zwei."},
            {"prompt": "Drei?", "demonstration": "Drei ✓"}, {"prompt": "Vier?", "demonstration": "Vier."}]
    raw = b"\xef\xbb\xbf" + json.dumps(rows[0], ensure_ascii=False).encode() + b"\r\n\n   \n"
    raw += b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows[1:3])
    raw += b"\n" + json.dumps(rows[3]).encode()  # the last line has no newline
    path = tmp_path / "awkward.jsonl"
    path.write_bytes(raw)
    return path


def test_offsets_survive_bom_blank_lines_crlf_and_multibyte_text(tmp_path):
    path = awkward_file(tmp_path)
    builder = demonstrations.DemonstrationsBuilder(DemonstrationsSignal())
    examples = builder.load(path).examples
    assert list(examples) == eager_examples(builder, path)
    assert [e.id for e in examples] == ["awkward.jsonl:1", "x", "awkward.jsonl:5", "awkward.jsonl:7"]
    assert examples[0].fields["demonstration"] == "Oui, un café. 日本語"


def test_negative_indices_and_slices_behave_as_on_a_list(tmp_path):
    path = awkward_file(tmp_path)
    builder = demonstrations.DemonstrationsBuilder(DemonstrationsSignal())
    examples, eager = builder.load(path).examples, eager_examples(builder, path)
    assert examples[-1] == eager[-1] and examples[-4] == eager[0]
    for s in (slice(1, 3), slice(None, 2), slice(-2, None), slice(None, None, -1), slice(0, 100, 2), slice(3, 1)):
        part = examples[s]
        assert isinstance(part, LazyRecords) and list(part) == eager[s] and len(part) == len(eager[s])
    assert list(examples[1:][1:]) == eager[2:] and examples[1:][-1] == eager[-1]
    assert [examples.line(i) for i in range(4)] == [1, 4, 5, 7]
    for bad in (4, -5):
        with pytest.raises(IndexError):
            examples[bad]


def test_interactions_index_every_turn_of_a_line(tmp_path):
    row = {"messages": [{"role": r, "content": c} for r, c in [("user", "a?"), ("assistant", "A."), ("user", "No, b."),
                                                               ("assistant", "B."), ("user", "Shorter please.")]]}
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    builder = InteractionsBuilder(InteractionsSignal(max_history_messages=1))
    report = builder.load(path)
    assert [e.id for e in report.examples] == ["log.jsonl:1#1", "log.jsonl:1#3", "log.jsonl:2#1", "log.jsonl:2#3"]
    assert list(report.examples) == eager_examples(builder, path)
    assert "in 2 of 4 example(s)" in report.warnings[0]  # history cut where the turn had more before it


def test_a_file_changed_after_loading_is_refused(tmp_path):
    path = awkward_file(tmp_path)
    examples = demonstrations.DemonstrationsBuilder(DemonstrationsSignal()).load(path).examples
    examples[1]
    with open(path, "ab") as f:
        f.write(b'\n{"prompt": "Fuenf?", "demonstration": "Fuenf."}\n')
    with pytest.raises(DataError, match="changed since sd loaded it") as e:
        examples[1]
    assert "copy it and train on the copy" in e.value.render()
    with pytest.raises(DataError, match="changed since sd loaded it"):
        list(examples)
    path.unlink()
    with pytest.raises(DataError, match="cannot be read again"):
        examples[0]


def test_a_same_size_rewrite_is_refused_even_with_the_old_mtime(tmp_path):
    """Lines moved within a file of the same size, its mtime put back (or too coarse to tell)."""
    path = tmp_path / "d.jsonl"
    a, b = json.dumps({"prompt": "p", "demonstration": "d"}), json.dumps({"prompt": "pp", "demonstration": "dd"})
    path.write_text(a + "\n" + b + "\n")
    examples = demonstrations.DemonstrationsBuilder(DemonstrationsSignal()).load(path).examples
    before = os.stat(path)
    path.write_text(b + "\n" + a + "\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(DataError, match="line 2 again"):
        examples[1]


def test_a_file_changed_while_it_is_read_is_refused(tmp_path):
    path = awkward_file(tmp_path)
    lines = iter(JsonlScan(path))
    next(lines)
    with open(path, "ab") as f:
        f.write(b"\n{}\n")
    with pytest.raises(DataError, match="changed while sd was reading it"):
        list(lines)


def test_duplicate_ids_are_compared_as_text_not_by_hash(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"},
                                                            {"prompt": "3"}, {"id": "a", "prompt": "4"}, {"id": "r.jsonl:3", "prompt": "5"}]))
    report = rewards.RewardsBuilder(RewardsSignal(reward="mine:score")).load(path)
    assert report.warnings == [f"{path}:4: id 'a' was already used on line 1", f"{path}:5: id 'r.jsonl:3' was already used on line 3"]
    every_hash_equal = array("q", [7] * 5)  # as if every id hashed alike: only equal texts are duplicates
    assert rewards.duplicate_id_warnings(report.examples, every_hash_equal) == report.warnings


def write_demonstrations(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'{{"prompt": "What is {i} plus one?", "demonstration": "It is {i + 1}, one more than {i}."}}\n')


def test_a_loaded_report_holds_a_few_bytes_per_line(tmp_path):
    """200k lines: the parsed examples would hold about a kilobyte each; the index holds 12 bytes."""
    n = 200_000
    path = tmp_path / "big.jsonl"
    write_demonstrations(path, n)
    builder = demonstrations.DemonstrationsBuilder(DemonstrationsSignal())
    gc.collect()
    tracemalloc.start()
    try:
        report = builder.load(path)
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(report.examples) == n and report.examples[-1].fields["demonstration"] == f"It is {n}, one more than {n - 1}."
    assert held / n < 64, f"the loaded report holds {held / n:.0f} bytes a line"
    assert peak / n < 128, f"loading peaked at {peak / n:.0f} bytes a line"
