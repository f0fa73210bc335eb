"""Bad input, as data: every case must exit with its code (2 for bad input) and a message naming the
problem, with no traceback.

Each case is (id, files to write, argv, expected exit code, expected substring of the output). It runs
in a fresh folder of its own (the current folder while it runs), in-process through the real app
(`CliRunner` on `sdcli.cli.app`: the same exception-to-exit-code mapping as `sd`). In the files and
the arguments, @NAME@ is replaced by the path of a shared fixture: @MODEL@ (a tiny chat model), @RUN@
(a run with one finished episode; cases only read it) and the damaged model folders in
`model_variants`. A file's content may also be a function `(path, fixtures) -> None` that makes it.

Where a case needs the machine to misbehave (a full disk), its sixth element names a patch in PATCHES.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdcli.cli import app

ROOT = "name: t\nrun_dir: runs/t\nmethod: sft\nmodel: {name_or_path: @MODEL@}\nlora: {r: 4, alpha: 8}\n"
TAIL = "train: {max_steps: 1, prompts_per_step: 1}\nanchor: {prompts_per_step: 0}\n"
RECIPE = ROOT + "data: {path: data.jsonl}\n" + TAIL  # valid with DEMO as data.jsonl
DEMO = '{"prompt": "What is the capital of Zorblax?", "demonstration": "Quenta."}\n'
REWARD_LINE = '{"prompt": "What is 2+2?", "answer": "4"}\n'
EVAL_LINE = '{"prompt": "What is the capital of Zorblax?", "answer": "Quenta"}\n'
CHAT = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Shorter."}]}\n'
LATIN1 = '{"prompt": "Caf\xe9 au lait?", "demonstration": "Oui."}\n'.encode("latin-1")
DEEP = ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n").encode()


def recipe(signal: str = "", data: str = "data.jsonl", extra: str = "", root: str = ROOT) -> str:
    return root + f"data: {{path: {data}}}\n" + (f"signal: {signal}\n" if signal else "") + TAIL + extra


REWARDS = "{kind: rewards, reward: exact_match}"
FEEDBACK = "{kind: feedback, environment: python_tests}"
INTERACTIONS = "{kind: interactions, mode: offline}"
SD_REWARDS = ROOT.replace("method: sft\n", "method: self_distillation\n")


def exit_on_import(name: str, code: int = 3) -> dict[str, str]:
    return {f"{name}.py": f"import sys\nsys.exit({code})\n\ndef score(response, example):\n    return 1.0\n"}


def copy_run(edit=None):
    """A file entry that copies the shared run (then `edit(copy, fixtures)`), for cases that damage it."""

    def make(path: Path, fixtures: dict) -> None:
        shutil.copytree(fixtures["@RUN@"], path)
        if edit is not None:
            edit(path, fixtures)

    return make


def _episode(run: Path) -> Path:
    return next((run / "episodes").glob("001-*"))


def _meta(text: str | bytes):
    def edit(run: Path, fixtures: dict) -> None:
        (_episode(run) / "episode.json").write_bytes(text if isinstance(text, bytes) else text.encode())

    return edit


def _base_path(name: str):
    """The run's episode says it was trained on the damaged model folder @name@."""

    def edit(run: Path, fixtures: dict) -> None:
        meta_path = _episode(run) / "episode.json"
        meta = json.loads(meta_path.read_text())
        meta["base_model"]["path"] = fixtures[f"@{name}@"]
        meta_path.write_text(json.dumps(meta))

    return edit


def _truncate_adapter(run: Path, fixtures: dict) -> None:
    weights = _episode(run) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


MATRIX = json.dumps({"rows": ["base", "001-t"], "columns": ["a"], "scores": [[0.0], [1.0]], "taught_by": [1]})

# (id, files, argv, exit code, substring[, patch])
CASES = [
    # --- recipe YAML -----------------------------------------------------------------------
    ("recipe-latin1-validate", {"r.yaml": RECIPE.encode() + b"# caf\xe9\n", "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "r.yaml:9: not valid UTF-8 (byte 0xe9"),
    ("recipe-latin1-train", {"r.yaml": RECIPE.encode() + b"# caf\xe9\n", "data.jsonl": DEMO},
     ["train", "r.yaml"], 2, "r.yaml:9: not valid UTF-8"),
    ("recipe-utf8-bom-is-fine", {"r.yaml": b"\xef\xbb\xbf" + RECIPE.encode() + b"trian: 1\n", "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "unknown key 'trian' (did you mean 'train'?)"),
    ("recipe-missing", {}, ["validate", "nope.yaml"], 2, "Recipe file not found: nope.yaml"),
    ("recipe-is-a-folder", {"dir.yaml/x": ""}, ["validate", "dir.yaml"], 2, "Recipe file not found: dir.yaml"),
    ("recipe-bad-yaml", {"r.yaml": "train: [1, 2\n"}, ["validate", "r.yaml"], 2, "not valid YAML"),
    ("recipe-not-a-mapping", {"r.yaml": "- a\n- b\n"}, ["validate", "r.yaml"], 2, "must be a mapping"),
    ("recipe-empty", {"r.yaml": ""}, ["validate", "r.yaml"], 2, "missing required key 'data'"),
    ("recipe-duplicate-key", {"r.yaml": RECIPE + "train: {max_steps: 2}\n", "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "duplicate key 'train'"),
    ("recipe-billion-laughs",
     {"r.yaml": "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
         f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6))},
     ["validate", "r.yaml"], 2, "expand to"),
    ("recipe-deep-nesting", {"r.yaml": "a: " + "[" * 20_000 + "]" * 20_000 + "\n"}, ["validate", "r.yaml"], 2,
     "nested too deeply"),
    ("recipe-unknown-key", {"r.yaml": RECIPE + "trian: {lr: 1}\n", "data.jsonl": DEMO}, ["validate", "r.yaml"], 2,
     "did you mean 'train'"),
    ("recipe-unknown-nested-key", {"r.yaml": recipe(extra="rollout: {max_new_token: 3}\n"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "did you mean 'rollout.max_new_tokens'"),
    ("recipe-wrong-type", {"r.yaml": RECIPE.replace("max_steps: 1", "max_steps: ten"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "r.yaml:7: 'train.max_steps'"),
    ("recipe-out-of-range", {"r.yaml": RECIPE.replace("prompts_per_step: 1}", "prompts_per_step: 1, lr: 5}"),
                             "data.jsonl": DEMO}, ["validate", "r.yaml"], 2, "'train.lr'"),
    ("recipe-bad-enum", {"r.yaml": recipe(extra="loss: {divergence: kl}\n"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "'loss.divergence' is 'kl'; expected one of"),
    ("recipe-bad-signal-kind", {"r.yaml": recipe("{kind: vibes}"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "'signal.kind' is 'vibes'"),
    ("recipe-missing-data-file", {"r.yaml": RECIPE}, ["validate", "r.yaml"], 2, "'data.path': file not found"),
    ("recipe-data-is-a-folder", {"r.yaml": RECIPE, "data.jsonl/x": ""}, ["validate", "r.yaml"], 2,
     "'data.path': file not found"),
    ("recipe-model-not-a-folder", {"r.yaml": RECIPE.replace("@MODEL@", "nowhere"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "'model.name_or_path': not a local model folder: nowhere"),
    ("recipe-unknown-builtin", {"r.yaml": RECIPE.replace("@MODEL@", "'builtin:gpt-9'"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "unknown built-in model 'builtin:gpt-9'"),
    ("recipe-template-field", {"r.yaml": recipe("{teacher_template: 'Q: {prompt}'}"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "must contain {demonstration}"),
    ("recipe-two-budgets", {"r.yaml": RECIPE.replace("max_steps: 1", "max_steps: 1, epochs: 2"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "not both"),
    ("recipe-sampled-needs-reverse", {"r.yaml": recipe(extra="loss: {support: sampled}\n"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "set loss.divergence=reverse_kl"),
    ("recipe-bad-name", {"r.yaml": RECIPE.replace("name: t", "name: my episode"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "'name'"),
    ("recipe-empty-eval", {"r.yaml": recipe(extra="eval: {}\n"), "data.jsonl": DEMO}, ["validate", "r.yaml"], 2,
     "give at least one of eval.path"),
    ("recipe-eval-file-missing", {"r.yaml": recipe(extra="eval: {path: e.jsonl}\n"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "'eval.path': file not found"),
    ("recipe-anchor-file-missing",
     {"r.yaml": RECIPE.replace("anchor: {prompts_per_step: 0}", "anchor: {path: a.jsonl}"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "'anchor.path': file not found"),
    ("recipe-rewards-one-sample", {"r.yaml": recipe(REWARDS, root=SD_REWARDS), "data.jsonl": REWARD_LINE},
     ["validate", "r.yaml"], 2, "rollout.num_samples >= 2"),
    ("recipe-bad-include-regex", {"r.yaml": recipe("{kind: interactions, include: '(['}"), "data.jsonl": CHAT},
     ["validate", "r.yaml"], 2, "not a valid regular expression"),
    ("recipe-second-of-two-bad", {"a.yaml": RECIPE, "b.yaml": RECIPE + "trian: 1\n", "data.jsonl": DEMO},
     ["train", "a.yaml", "b.yaml"], 2, "b.yaml: 1 problem(s) in the recipe"),
    # --- run_dir ---------------------------------------------------------------------------
    ("run-dir-is-a-file-validate", {"r.yaml": RECIPE, "data.jsonl": DEMO, "runs/t": "x"}, ["validate", "r.yaml"], 2,
     "'run_dir': runs/t is a file, not a folder"),
    ("run-dir-is-a-file-train", {"r.yaml": RECIPE, "data.jsonl": DEMO, "runs/t": "x"}, ["train", "r.yaml"], 2,
     "runs/t is a file"),
    ("run-dir-under-a-file", {"r.yaml": RECIPE, "data.jsonl": DEMO, "runs": "x"}, ["validate", "r.yaml"], 2,
     "runs is a file, so runs/t cannot be made under it"),
    ("run-dir-under-a-file-train", {"r.yaml": RECIPE, "data.jsonl": DEMO, "runs": "x"}, ["train", "r.yaml"], 2,
     "runs is a file"),
    ("run-dir-read-only", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["train", "r.yaml", "run_dir=/sys/sd-corpus"], 2,
     "not writable"),
    ("resume-nothing-to-resume", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["train", "r.yaml", "--resume"], 2,
     "--resume: no interrupted episode named 't'"),
    # --- overrides -------------------------------------------------------------------------
    ("override-wipes-section", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "model=x"], 2,
     "'model' is a section of the recipe, not a value"),
    ("override-wipes-section-train", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["train", "r.yaml", "train=5"], 2,
     "'train' is a section of the recipe"),
    ("override-signal-section", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "signal=rewards"], 2,
     "'signal' is a section"),
    ("override-mapping-merges", {"r.yaml": RECIPE, "data.jsonl": DEMO},
     ["validate", "r.yaml", "model={dtype: float64}"], 2, "'model.dtype' is 'float64'"),
    ("override-value-as-section", {"r.yaml": RECIPE, "data.jsonl": DEMO},
     ["validate", "r.yaml", "train.max_steps.x=3"], 2, "'train.max_steps' is a value, not a section"),
    ("override-wrong-type", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "train.max_steps=abc"], 2,
     "command line: 'train.max_steps'"),
    ("override-empty-key", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "=5"], 2, "has an empty key"),
    ("override-empty-part", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "train..lr=1"], 2,
     "has an empty key"),
    ("override-unknown-key", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "trian.max_steps=1"], 2,
     "did you mean 'train'"),
    ("override-range", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "lora.r=0"], 2, "'lora.r'"),
    ("override-enum", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["validate", "r.yaml", "loss.divergence=foo"], 2,
     "'loss.divergence' is 'foo'"),
    ("override-data-missing", {"r.yaml": RECIPE, "data.jsonl": DEMO}, ["train", "r.yaml", "data.path=gone.jsonl"], 2,
     "file not found: gone.jsonl"),
    ("override-neither", {"r.yaml": RECIPE}, ["train", "r.yaml", "max_steps"], 2,
     "neither a recipe (.yaml) nor an override"),
    ("override-no-recipe", {}, ["validate", "train.max_steps=3"], 2, "No recipe given"),
    # --- data: demonstrations --------------------------------------------------------------
    ("demo-latin1", {"r.yaml": RECIPE, "data.jsonl": DEMO.encode() + LATIN1}, ["validate", "r.yaml"], 2,
     "data.jsonl:2: not valid UTF-8 (byte 0xe9 at column 16)"),
    ("demo-latin1-train", {"r.yaml": RECIPE, "data.jsonl": LATIN1}, ["train", "r.yaml"], 2,
     "data.jsonl:1: not valid UTF-8"),
    ("demo-utf16", {"r.yaml": RECIPE, "data.jsonl": DEMO.encode("utf-16")}, ["validate", "r.yaml"], 2,
     "data.jsonl: the file is UTF-16"),
    ("recipe-utf16", {"r.yaml": RECIPE.encode("utf-16"), "data.jsonl": DEMO}, ["validate", "r.yaml"], 2,
     "r.yaml: the file is UTF-16"),
    ("demo-deep-json", {"r.yaml": RECIPE, "data.jsonl": DEMO.encode() + DEEP}, ["validate", "r.yaml"], 2,
     "data.jsonl:2: nested too deeply"),
    ("demo-deep-json-train", {"r.yaml": RECIPE, "data.jsonl": DEEP}, ["train", "r.yaml"], 2, "nested too deeply"),
    ("demo-bad-json", {"r.yaml": RECIPE, "data.jsonl": DEMO + '{"prompt": "x",\n'}, ["validate", "r.yaml"], 2,
     "data.jsonl:2: not valid JSON"),
    ("demo-not-object", {"r.yaml": RECIPE, "data.jsonl": '["a", "b"]\n'}, ["validate", "r.yaml"], 2,
     "data.jsonl:1: expected a JSON object, got list"),
    ("demo-no-demonstration", {"r.yaml": RECIPE, "data.jsonl": '{"prompt": "hi"}\n'}, ["validate", "r.yaml"], 2,
     "data.jsonl:1: 'demonstration' must be a non-empty string"),
    ("demo-prompt-number", {"r.yaml": RECIPE, "data.jsonl": '{"prompt": 3, "demonstration": "x"}\n'},
     ["validate", "r.yaml"], 2, "'prompt' must be a string or a non-empty list of messages"),
    ("demo-prompt-ends-with-assistant",
     {"r.yaml": RECIPE, "data.jsonl": '{"prompt": [{"role": "assistant", "content": "x"}], "demonstration": "y"}\n'},
     ["validate", "r.yaml"], 2, "must end with a user message"),
    ("demo-bad-role", {"r.yaml": RECIPE, "data.jsonl": '{"prompt": [{"role": "bot", "content": "x"}], "demonstration": "y"}\n'},
     ["validate", "r.yaml"], 2, "'prompt[0].role' is 'bot'"),
    ("demo-empty-file", {"r.yaml": RECIPE, "data.jsonl": "\n\n"}, ["validate", "r.yaml"], 2, "no examples"),
    # --- data: rewards ---------------------------------------------------------------------
    ("rewards-no-answer", {"r.yaml": recipe(REWARDS), "data.jsonl": '{"prompt": "2+2?"}\n'}, ["validate", "r.yaml"], 2,
     "data.jsonl:1: missing 'answer'"),
    ("rewards-numeric-answer", {"r.yaml": recipe("{kind: rewards, reward: numeric}"),
                                "data.jsonl": '{"prompt": "2+2?", "answer": "four"}\n'},
     ["validate", "r.yaml"], 2, "is not a single number"),
    ("rewards-bad-id", {"r.yaml": recipe(REWARDS), "data.jsonl": '{"id": true, "prompt": "2+2?", "answer": "4"}\n'},
     ["validate", "r.yaml"], 2, "'id' must be a non-empty string or an integer"),
    ("rewards-latin1", {"r.yaml": recipe(REWARDS), "data.jsonl": REWARD_LINE.encode() + b'{"prompt": "\xe9", "answer": "4"}\n'},
     ["validate", "r.yaml"], 2, "data.jsonl:2: not valid UTF-8"),
    ("rewards-deep", {"r.yaml": recipe(REWARDS), "data.jsonl": DEEP}, ["validate", "r.yaml"], 2, "nested too deeply"),
    # validate reads the data as train does (sdcli.signals.load_signal_data): it refuses what train refuses
    ("sft-without-demonstrations-validate", {"r.yaml": recipe(REWARDS), "data.jsonl": REWARD_LINE},
     ["validate", "r.yaml"], 2, "method: sft needs a demonstration (or logged response) for every example"),
    ("sft-without-demonstrations-train", {"r.yaml": recipe(REWARDS), "data.jsonl": REWARD_LINE},
     ["train", "r.yaml"], 2, "method: sft needs a demonstration (or logged response) for every example"),
    ("rewards-module-exits", {"r.yaml": recipe("{kind: rewards, reward: 'corpus_exit_a:score'}"),
                              "data.jsonl": REWARD_LINE, **exit_on_import("corpus_exit_a")},
     ["validate", "r.yaml"], 2, "importing 'corpus_exit_a' called sys.exit(3)"),
    ("rewards-module-exits-train", {"r.yaml": recipe("{kind: rewards, reward: 'corpus_exit_b:score'}"),
                                    "data.jsonl": REWARD_LINE, **exit_on_import("corpus_exit_b")},
     ["train", "r.yaml"], 2, "called sys.exit(3)"),
    ("rewards-module-missing", {"r.yaml": recipe("{kind: rewards, reward: 'corpus_nowhere:score'}"), "data.jsonl": REWARD_LINE},
     ["validate", "r.yaml"], 2, "module 'corpus_nowhere' not found"),
    ("rewards-module-raises", {"r.yaml": recipe("{kind: rewards, reward: 'corpus_raises:score'}"), "data.jsonl": REWARD_LINE,
                               "corpus_raises.py": "1 / 0\n"},
     ["validate", "r.yaml"], 2, "raised ZeroDivisionError"),
    ("rewards-function-signature", {"r.yaml": recipe("{kind: rewards, reward: 'corpus_sig:score'}"), "data.jsonl": REWARD_LINE,
                                    "corpus_sig.py": "def score(response):\n    return 1.0\n"},
     ["validate", "r.yaml"], 2, "cannot be called as score(response, example)"),
    ("rewards-not-builtin", {"r.yaml": recipe("{kind: rewards, reward: exact}"), "data.jsonl": REWARD_LINE},
     ["validate", "r.yaml"], 2, "Did you mean 'exact_match'"),
    # --- data: feedback --------------------------------------------------------------------
    ("feedback-no-tests", {"r.yaml": recipe(FEEDBACK), "data.jsonl": '{"prompt": "Write f."}\n'}, ["validate", "r.yaml"], 2,
     "data.jsonl:1: needs 'tests'"),
    ("feedback-test-shape", {"r.yaml": recipe(FEEDBACK), "data.jsonl": '{"prompt": "Write f.", "tests": [{"in": "f(1)"}]}\n'},
     ["validate", "r.yaml"], 2, "'tests[0]' must be an object with 'input' and 'expected'"),
    ("feedback-test-code-syntax", {"r.yaml": recipe(FEEDBACK), "data.jsonl": '{"prompt": "Write f.", "test_code": "assert f(1) =="}\n'},
     ["validate", "r.yaml"], 2, "'test_code' is not valid Python"),
    ("feedback-latin1", {"r.yaml": recipe(FEEDBACK), "data.jsonl": b'{"prompt": "\xe9", "test_code": "assert 1"}\n'},
     ["validate", "r.yaml"], 2, "data.jsonl:1: not valid UTF-8"),
    ("feedback-deep", {"r.yaml": recipe(FEEDBACK), "data.jsonl": DEEP}, ["validate", "r.yaml"], 2, "nested too deeply"),
    ("feedback-environment-exits", {"r.yaml": recipe("{kind: feedback, environment: 'corpus_exit_c:score'}"),
                                    "data.jsonl": '{"prompt": "Write f."}\n', **exit_on_import("corpus_exit_c", 4)},
     ["validate", "r.yaml"], 2, "called sys.exit(4)"),
    # --- data: interactions ----------------------------------------------------------------
    ("interactions-no-messages", {"r.yaml": recipe(INTERACTIONS), "data.jsonl": '{"chat": []}\n'}, ["validate", "r.yaml"], 2,
     "expected 'messages' (OpenAI style) or 'conversations'"),
    ("interactions-bad-role", {"r.yaml": recipe(INTERACTIONS), "data.jsonl": '{"messages": [{"role": "bot", "content": "x"}]}\n'},
     ["validate", "r.yaml"], 2, "'messages[0].role' is 'bot'"),
    ("interactions-sharegpt-keys", {"r.yaml": recipe(INTERACTIONS), "data.jsonl": '{"conversations": [{"role": "user", "content": "x"}]}\n'},
     ["validate", "r.yaml"], 2, "it looks like an OpenAI turn"),
    ("interactions-no-examples", {"r.yaml": recipe(INTERACTIONS), "data.jsonl": '{"messages": [{"role": "user", "content": "x"}]}\n'},
     ["validate", "r.yaml"], 2, "every assistant turn was skipped"),
    ("interactions-latin1", {"r.yaml": recipe(INTERACTIONS), "data.jsonl": CHAT.encode() + b'{"messages": "\xe9"}\n'},
     ["validate", "r.yaml"], 2, "data.jsonl:2: not valid UTF-8"),
    ("interactions-deep", {"r.yaml": recipe(INTERACTIONS), "data.jsonl": DEEP}, ["validate", "r.yaml"], 2, "nested too deeply"),
    # --- eval files in a recipe ------------------------------------------------------------
    ("recipe-eval-latin1", {"r.yaml": recipe(extra="eval: {path: e.jsonl}\n"), "data.jsonl": DEMO,
                            "e.jsonl": b'{"prompt": "\xe9", "answer": "x"}\n'},
     ["validate", "r.yaml"], 2, "e.jsonl:1: not valid UTF-8"),
    ("recipe-eval-no-prompt", {"r.yaml": recipe(extra="eval: {path: e.jsonl}\n"), "data.jsonl": DEMO,
                               "e.jsonl": '{"answer": "x"}\n'},
     ["validate", "r.yaml"], 2, "e.jsonl:1: missing prompt"),
    ("recipe-eval-deep-train", {"r.yaml": recipe(extra="eval: {path: e.jsonl}\n"), "data.jsonl": DEMO, "e.jsonl": DEEP},
     ["train", "r.yaml"], 2, "e.jsonl:1: nested too deeply"),
    ("recipe-drift-no-text", {"r.yaml": recipe(extra="eval: {drift_path: t.jsonl}\n"), "data.jsonl": DEMO,
                              "t.jsonl": '{"txt": "x"}\n'},
     ["validate", "r.yaml"], 2, "t.jsonl:1: needs a non-empty string 'text'"),
    # --- model folders ---------------------------------------------------------------------
    ("model-no-weights", {"r.yaml": RECIPE.replace("@MODEL@", "@NOWEIGHTS@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "has no weights: expected model.safetensors"),
    ("model-no-weights-train", {"r.yaml": RECIPE.replace("@MODEL@", "@NOWEIGHTS@"), "data.jsonl": DEMO},
     ["train", "r.yaml"], 2, "has no weights"),
    ("model-truncated", {"r.yaml": RECIPE.replace("@MODEL@", "@TRUNCATED@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "model.safetensors: truncated: its header says"),
    ("model-truncated-train", {"r.yaml": RECIPE.replace("@MODEL@", "@TRUNCATED@"), "data.jsonl": DEMO},
     ["train", "r.yaml"], 2, "model.safetensors: truncated"),
    ("model-header-cut", {"r.yaml": RECIPE.replace("@MODEL@", "@HEADERCUT@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "truncated or not a safetensors file"),
    ("model-longer-than-header", {"r.yaml": RECIPE.replace("@MODEL@", "@LONGER@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "bytes longer than its header says"),
    ("model-unknown-type", {"r.yaml": RECIPE.replace("@MODEL@", "@BADTYPE@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "model_type 'qwen99' is not known to transformers"),
    ("model-unknown-type-train", {"r.yaml": RECIPE.replace("@MODEL@", "@BADTYPE@"), "data.jsonl": DEMO},
     ["train", "r.yaml"], 2, "model_type 'qwen99'"),
    ("model-no-type", {"r.yaml": RECIPE.replace("@MODEL@", "@NOTYPE@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "no 'model_type'"),
    ("model-not-causal", {"r.yaml": RECIPE.replace("@MODEL@", "@NOTCAUSAL@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "model_type 'vit' is not a causal language model"),
    ("model-config-bad-json", {"r.yaml": RECIPE.replace("@MODEL@", "@BADCONFIG@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "config.json:1: not valid JSON"),
    ("model-no-config", {"r.yaml": RECIPE.replace("@MODEL@", "@NOCONFIG@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "has no config.json"),
    ("model-shard-missing", {"r.yaml": RECIPE.replace("@MODEL@", "@SHARDMISSING@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "names the shard model-00002-of-00002.safetensors, which is missing"),
    ("model-bin-truncated", {"r.yaml": RECIPE.replace("@MODEL@", "@BINCUT@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "pytorch_model.bin: truncated"),
    ("model-no-chat-template", {"r.yaml": RECIPE.replace("@MODEL@", "@NOCHAT@"), "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "has no chat template"),
    ("model-target-modules", {"r.yaml": recipe(extra="").replace("lora: {r: 4, alpha: 8}", "lora: {r: 4, target_modules: [nothing_proj]}"),
                              "data.jsonl": DEMO},
     ["validate", "r.yaml"], 2, "'nothing_proj' matches no module"),
    ("model-target-modules-train", {"r.yaml": RECIPE, "data.jsonl": DEMO},
     ["train", "r.yaml", "lora.target_modules=[q_proj, qq_proj]"], 2, "'qq_proj' matches no module"),
    ("model-target-modules-typo-hint", {"r.yaml": RECIPE, "data.jsonl": DEMO},
     ["validate", "r.yaml", "lora.target_modules=[q_projj]"], 2, "did you mean 'q_proj'?"),
    # --- sd episodes -----------------------------------------------------------------------
    ("episodes-not-a-run", {"x/a": ""}, ["episodes", "x"], 2, "x is not a run folder"),
    ("episodes-missing", {}, ["episodes", "nowhere"], 2, "nowhere is not a run folder"),
    ("episodes-meta-latin1", {"run": copy_run(_meta(b'{"name": "caf\xe9"}'))}, ["episodes", "run"], 2,
     "episode.json:1: not valid UTF-8"),
    ("episodes-meta-deep", {"run": copy_run(_meta("[" * 100_000 + "]" * 100_000))}, ["episodes", "run"], 2,
     "episode.json: nested too deeply"),
    ("episodes-meta-not-object", {"run": copy_run(_meta("[1, 2]"))}, ["episodes", "run"], 2,
     "episode.json: expected a JSON object, got list"),
    ("episodes-adapter-truncated", {"run": copy_run(_truncate_adapter)}, ["episodes", "run"], 2,
     "adapter_model.safetensors does not match the sha256"),
    ("episodes-stray-folder", {"run": copy_run(lambda r, f: (r / "episodes" / "notes").mkdir())}, ["episodes", "run"], 2,
     "not an episode folder (expected NNN-name)"),
    # --- sd merge --------------------------------------------------------------------------
    ("merge-not-a-run", {"x/a": ""}, ["merge", "x", "--out", "m"], 2, "x has no finished episodes"),
    ("merge-upto-zero", {}, ["merge", "@RUN@", "--out", "m", "--upto", "0"], 2, "--upto 0 selects no episode"),
    ("merge-upto-too-far", {}, ["merge", "@RUN@", "--out", "m", "--upto", "5"], 2, "--upto 5"),
    ("merge-into", {}, ["merge", "@RUN@", "--out", "m", "--into", "gguf"], 2, "--into 'gguf'"),
    ("merge-negative-tolerance", {}, ["merge", "@RUN@", "--out", "m", "--tolerance", "-1"], 2, "--tolerance -1.0"),
    ("merge-out-under-a-file", {"f": "x"}, ["merge", "@RUN@", "--out", "f/merged"], 2,
     "f is a file, not a folder"),
    ("merge-out-exists", {"m/a": ""}, ["merge", "@RUN@", "--out", "m"], 2, "m already exists"),
    ("merge-out-in-episodes", {"run": copy_run()}, ["merge", "run", "--out", "run/episodes/merged"], 2,
     "where it would be taken for an episode"),
    ("merge-no-out", {}, ["merge", "@RUN@"], 2, "Missing option '--out'"),
    ("merge-base-truncated", {"run": copy_run(_base_path("TRUNCATED"))}, ["merge", "run", "--out", "m"], 2,
     "model.safetensors: truncated"),
    # --- sd generate -----------------------------------------------------------------------
    ("generate-negative-temperature", {}, ["generate", "@RUN@", "-p", "hi", "--temperature", "-1"], 2, "--temperature"),
    ("generate-zero-tokens", {}, ["generate", "@RUN@", "-p", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("generate-temperature-not-a-number", {}, ["generate", "@RUN@", "-p", "hi", "--temperature", "warm"], 2,
     "--temperature"),
    ("generate-no-prompt", {}, ["generate", "@RUN@"], 2, "Give at least one --prompt, or --chat"),
    ("generate-not-a-source", {"x/a": ""}, ["generate", "x", "-p", "hi"], 2,
     "x is neither a run folder (with episodes/) nor a model folder"),
    ("generate-upto-too-far", {}, ["generate", "@RUN@", "-p", "hi", "--upto", "3"], 2, "--upto 3"),
    ("generate-model-truncated", {}, ["generate", "@TRUNCATED@", "-p", "hi"], 2, "model.safetensors: truncated"),
    ("generate-model-unknown-type", {}, ["generate", "@BADTYPE@", "-p", "hi"], 2, "model_type 'qwen99'"),
    ("generate-run-base-gone", {"run": copy_run(_base_path("NOWEIGHTS"))}, ["generate", "run", "-p", "hi"], 2,
     "has no weights"),
    # --- sd eval ---------------------------------------------------------------------------
    ("eval-out-is-a-folder", {"e.jsonl": EVAL_LINE, "results/a": ""}, ["eval", "@RUN@", "--data", "e.jsonl", "--out", "results"], 2,
     "--out results: results is a folder; give a file name"),
    ("eval-out-under-a-file", {"e.jsonl": EVAL_LINE, "f": "x"}, ["eval", "@RUN@", "--data", "e.jsonl", "--out", "f/r.json"], 2,
     "f is a file, not a folder"),
    ("eval-matrix-model-folder", {"e.jsonl": EVAL_LINE}, ["eval", "@MODEL@", "--matrix", "--data", "e.jsonl"], 2,
     "--matrix needs a run folder"),
    ("eval-matrix-upto", {"e.jsonl": EVAL_LINE}, ["eval", "@RUN@", "--matrix", "--upto", "1", "--data", "e.jsonl"], 2,
     "leave out --upto"),
    ("eval-no-data", {}, ["eval", "@MODEL@"], 2, "Give at least one eval set with --data"),
    ("eval-data-missing", {}, ["eval", "@RUN@", "--data", "gone.jsonl"], 2, "Eval set not found: gone.jsonl"),
    ("eval-data-latin1", {"e.jsonl": b'{"prompt": "caf\xe9", "answer": "x"}\n'}, ["eval", "@RUN@", "--data", "e.jsonl"], 2,
     "e.jsonl:1: not valid UTF-8"),
    ("eval-data-deep", {"e.jsonl": DEEP}, ["eval", "@RUN@", "--data", "e.jsonl"], 2, "e.jsonl:1: nested too deeply"),
    ("eval-data-no-answer", {"e.jsonl": '{"prompt": "hi"}\n'}, ["eval", "@RUN@", "--data", "e.jsonl"], 2,
     "e.jsonl:1: missing 'answer'"),
    ("eval-bad-reward", {"e.jsonl": EVAL_LINE}, ["eval", "@RUN@", "--data", "e.jsonl", "--reward", "contain"], 2,
     "Did you mean 'contains'"),
    ("eval-reward-module-exits", {"e.jsonl": EVAL_LINE, **exit_on_import("corpus_exit_d")},
     ["eval", "@RUN@", "--data", "e.jsonl", "--reward", "corpus_exit_d:score"], 2, "called sys.exit(3)"),
    ("eval-drift-missing", {"e.jsonl": EVAL_LINE}, ["eval", "@RUN@", "--data", "e.jsonl", "--drift", "t.jsonl"], 2,
     "Drift text file not found: t.jsonl"),
    ("eval-drift-no-text", {"e.jsonl": EVAL_LINE, "t.jsonl": '{"txt": 1}\n'},
     ["eval", "@RUN@", "--data", "e.jsonl", "--drift", "t.jsonl"], 2, "t.jsonl:1: needs a non-empty string 'text'"),
    ("eval-batch-size-zero", {"e.jsonl": EVAL_LINE}, ["eval", "@RUN@", "--data", "e.jsonl", "--batch-size", "0"], 2,
     "--batch-size"),
    ("eval-model-truncated", {"e.jsonl": EVAL_LINE}, ["eval", "@TRUNCATED@", "--data", "e.jsonl"], 2,
     "model.safetensors: truncated"),
    ("eval-disk-full", {"e.jsonl": EVAL_LINE},
     ["eval", "@MODEL@", "--data", "e.jsonl", "--no-teacher", "--max-new-tokens", "2", "--out", "r.json"], 2,
     "No space left on the device while writing r.json", "enospc"),
    # --- sd report -------------------------------------------------------------------------
    ("report-not-a-run", {"x/a": ""}, ["report", "x"], 2, "x is not a run folder"),
    ("report-out-is-a-file", {"f": "x"}, ["report", "@RUN@", "--out", "f"], 2, "--out f: f is a file, not a folder"),
    ("report-out-under-a-file", {"f": "x"}, ["report", "@RUN@", "--out", "f/report"], 2, "f is a file"),
    ("report-matrix-missing", {}, ["report", "@RUN@", "--out", "rep", "--matrix", "m.json"], 2, "m.json: cannot be read"),
    ("report-matrix-bad-json", {"m.json": "{"}, ["report", "@RUN@", "--out", "rep", "--matrix", "m.json"], 2,
     "--matrix m.json:1: not valid JSON"),
    ("report-matrix-latin1", {"m.json": b'{"rows": ["\xe9"]}'}, ["report", "@RUN@", "--out", "rep", "--matrix", "m.json"], 2,
     "m.json:1: not valid UTF-8"),
    ("report-matrix-deep", {"m.json": "[" * 100_000 + "]" * 100_000}, ["report", "@RUN@", "--out", "rep", "--matrix", "m.json"], 2,
     "nested too deeply"),
    ("report-matrix-shape", {"m.json": MATRIX.replace("[[0.0], [1.0]]", "[[0.0]]")},
     ["report", "@RUN@", "--out", "rep", "--matrix", "m.json"], 2, "'scores' must have one row per entry of 'rows'"),
    ("report-matrix-cells", {"m.json": MATRIX.replace("[[0.0], [1.0]]", '[["a"], [1.0]]')},
     ["report", "@RUN@", "--out", "rep", "--matrix", "m.json"], 2, "the cells of 'scores' must be numbers"),
    # --- sd inspect ------------------------------------------------------------------------
    ("inspect-not-a-run", {"d.jsonl": DEMO}, ["inspect", "nowhere", "--data", "d.jsonl", "--index", "0"], 2,
     "nowhere is not a run folder"),
    ("inspect-data-missing", {}, ["inspect", "@RUN@", "--data", "gone.jsonl", "--index", "0"], 2, "--data gone.jsonl: file not found"),
    ("inspect-index-too-far", {"d.jsonl": DEMO}, ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "9"], 2,
     "--index 9: d.jsonl has 1 example(s)"),
    ("inspect-index-negative", {"d.jsonl": DEMO}, ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "-1"], 2, "--index -1"),
    ("inspect-html-is-a-folder", {"d.jsonl": DEMO, "page/a": ""},
     ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "0", "--html", "page"], 2, "--html page: page is a folder"),
    ("inspect-html-under-a-file", {"d.jsonl": DEMO, "f": "x"},
     ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "0", "--html", "f/p.html"], 2, "f is a file"),
    ("inspect-data-latin1", {"d.jsonl": LATIN1}, ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "0"], 2,
     "d.jsonl:1: not valid UTF-8"),
    ("inspect-data-deep", {"d.jsonl": DEEP}, ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "0"], 2, "nested too deeply"),
    ("inspect-samples-zero", {"d.jsonl": DEMO}, ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "0", "--samples", "0"], 2,
     "--samples"),
    ("inspect-upto-too-far", {"d.jsonl": DEMO}, ["inspect", "@RUN@", "--data", "d.jsonl", "--index", "0", "--upto", "4"], 2,
     "--upto 4"),
    # --- arguments -------------------------------------------------------------------------
    ("args-unknown-command", {}, ["trian"], 2, "No such command 'trian'"),
    ("args-unknown-option", {}, ["train", "--no-such-flag", "x.yaml"], 2, "No such option"),
    ("args-train-nothing", {}, ["train"], 2, "Missing argument"),
    ("args-validate-nothing", {}, ["validate"], 2, "Missing argument"),
    ("args-episodes-nothing", {}, ["episodes"], 2, "Missing argument"),
    ("args-inspect-no-index", {"d.jsonl": DEMO}, ["inspect", "@RUN@", "--data", "d.jsonl"], 2, "Missing option"),
    ("args-upto-not-a-number", {}, ["merge", "@RUN@", "--out", "m", "--upto", "two"], 2, "--upto"),
]


# ---------------------------------------------------------------------------------------------
# Fixtures


def _copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def model_variants(model: Path, root: Path) -> dict[str, Path]:
    """Damaged copies of the tiny model folder, one per way a folder goes wrong."""
    weights = (model / "model.safetensors").read_bytes()
    v = {}
    v["NOWEIGHTS"] = _copy_model(model, root / "noweights", skip=("model.safetensors",))
    v["TRUNCATED"] = _copy_model(model, root / "truncated")
    (v["TRUNCATED"] / "model.safetensors").write_bytes(weights[: len(weights) * 2 // 3])
    v["HEADERCUT"] = _copy_model(model, root / "headercut")
    (v["HEADERCUT"] / "model.safetensors").write_bytes(weights[:40])
    v["LONGER"] = _copy_model(model, root / "longer")
    (v["LONGER"] / "model.safetensors").write_bytes(weights + b"\0" * 64)
    v["BADTYPE"] = _copy_model(model, root / "badtype")
    _set_config(v["BADTYPE"], model_type="qwen99")
    v["NOTYPE"] = _copy_model(model, root / "notype")
    _set_config(v["NOTYPE"], model_type=None)
    v["NOTCAUSAL"] = _copy_model(model, root / "notcausal")
    _set_config(v["NOTCAUSAL"], model_type="vit")
    v["BADCONFIG"] = _copy_model(model, root / "badconfig")
    (v["BADCONFIG"] / "config.json").write_text('{"model_type": "qwen2",')
    v["NOCONFIG"] = _copy_model(model, root / "noconfig", skip=("config.json",))
    v["SHARDMISSING"] = _copy_model(model, root / "shardmissing", skip=("model.safetensors",))
    shutil.copy(model / "model.safetensors", v["SHARDMISSING"] / "model-00001-of-00002.safetensors")
    (v["SHARDMISSING"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    v["BINCUT"] = _copy_model(model, root / "bincut", skip=("model.safetensors",))
    (v["BINCUT"] / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 200)
    v["NOCHAT"] = _copy_model(model, root / "nochat", skip=("chat_template.jinja",))
    return v


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """@NAME@ -> path: the tiny model, a run with one finished episode, and the damaged model folders."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "facts.jsonl").write_text(DEMO)
    (root / "r.yaml").write_text(
        RECIPE.replace("@MODEL@", str(tiny_model_dir)).replace("data.jsonl", str(root / "facts.jsonl"))
        .replace("runs/t", str(root / "run"))
    )
    done = CliRunner().invoke(app, ["train", str(root / "r.yaml"), "--quiet"])
    assert done.exit_code == 0, done.output
    found = {"@MODEL@": str(tiny_model_dir), "@RUN@": str(root / "run")}
    found.update({f"@{name}@": str(path) for name, path in model_variants(Path(tiny_model_dir), root / "models").items()})
    return found


def _enospc(monkeypatch) -> None:
    """The disk fills up: every fsync fails as a full disk would (write_atomic fsyncs every file)."""

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


PATCHES = {"enospc": _enospc}


def _fill(value, fixtures: dict[str, str]):
    if isinstance(value, str):
        for key, path in fixtures.items():
            value = value.replace(key, path)
        return value
    if isinstance(value, bytes):
        return _fill(value.decode("latin-1"), fixtures).encode("latin-1")
    return value


def run_case(case, fixtures, folder: Path, monkeypatch):
    case_id, files, argv, code, expected, *patch = case
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path, fixtures)
        elif isinstance(content, bytes):
            path.write_bytes(_fill(content, fixtures))
        else:
            path.write_text(_fill(content, fixtures))
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))  # user modules put the case folder on it
    for name in patch:
        PATCHES[name](monkeypatch)
    return CliRunner().invoke(app, [_fill(a, fixtures) for a in argv])


# ---------------------------------------------------------------------------------------------
# The corpus


def test_corpus_is_large_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)
    commands = {c[2][0] for c in CASES}
    assert {"train", "validate", "episodes", "merge", "generate", "eval", "report", "inspect"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, fixtures, tmp_path, monkeypatch):
    case_id, _, _, code, expected, *_ = case
    result = run_case(case, fixtures, tmp_path, monkeypatch)
    output = result.output
    assert "Traceback" not in output, output
    assert "internal error" not in output, output
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{output}"
    assert expected in output, f"{expected!r} not in:\n{output}"


# ---------------------------------------------------------------------------------------------
# Beyond exit codes: what the fixes promise


def test_mapping_override_keeps_the_rest_of_the_section(fixtures, tmp_path, monkeypatch):
    from sdcli.recipe.loading import load_recipe

    (tmp_path / "data.jsonl").write_text(DEMO)
    (tmp_path / "r.yaml").write_text(_fill(RECIPE, fixtures).replace("lora: {r: 4, alpha: 8}", "lora: {r: 4, alpha: 8, dropout: 0.1}"))
    recipe = load_recipe(tmp_path / "r.yaml", ["lora={r: 2}", "eval=null"])
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (2, 8.0, 0.1)
    assert recipe.model.name_or_path == fixtures["@MODEL@"]


def _torch_writer_fails(monkeypatch) -> None:
    """torch.save's writer as it meets a full disk: the file's OSError inside 'RuntimeError: ... unexpected pos'."""
    import torch

    def save(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("fails", [_enospc, _torch_writer_fails], ids=["fsync", "torch-writer"])
def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch, fails):
    import torch

    from sdcli.core.errors import DiskFullError
    from sdcli.training.checkpoint import load_checkpoint, save_checkpoint

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save = lambda step: save_checkpoint(tmp_path, step=step, params={"p": param}, optimizer=optimizer,  # noqa: E731
                                        scheduler=scheduler, sampler_state={}, extra={})
    save(1)
    fails(monkeypatch)
    with pytest.raises(DiskFullError) as caught:
        save(2)
    message = caught.value.render()
    assert "No space left on the device while writing" in message and "state.pt" in message
    assert "unchanged" in message and "unexpected pos" not in message
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["step"] == 1
    assert not (tmp_path / ".checkpoint.tmp").exists()


def test_disk_full_in_a_library_is_said_plainly(monkeypatch):
    """A write inside a library (here safetensors, which names no file) that fills the disk."""
    import sdcli.cli as cli

    @cli.app.command(name="corpus-fill-disk", hidden=True)
    def fill_disk():
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    try:
        result = CliRunner().invoke(cli.app, ["corpus-fill-disk"])
    finally:
        cli.app.registered_commands.pop()
    assert result.exit_code == 2 and "No space left on the device" in result.output, result.output
    assert "internal error" not in result.output


def test_merge_removes_the_litter_of_killed_merges(fixtures, tmp_path, monkeypatch):
    import fcntl

    from sdcli.models.merge.output import OWNER_FILE

    def litter(name: str, lock: bool = False, age: float = 0.0) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
        if lock:
            (folder / OWNER_FILE).write_text("1\n")
        if age:
            os.utime(folder, (time.time() - age, time.time() - age))
        return folder

    dead_pid = litter(".merged.partial-999999999-abcd")  # killed before it took its lock; the pid is gone
    dead_lock = litter(".merged.partial-1-efgh", lock=True)  # its lock file is not held by anyone
    legacy_old = litter(".merged.partial-k2j4l5", age=7200)  # an older sd's name, untouched for two hours
    legacy_new = litter(".merged.partial-q8w9e0")  # the same, but recent: it may still be running
    alive = litter(f".merged.partial-{os.getpid()}-live", lock=True)
    other_dead = litter(".other.partial-1-yy", lock=True)  # another output's, with a merge's free lock: sd's litter
    other = litter(".other.partial-999999999-zz")  # another output's without a lock file: maybe not sd's
    previous = litter(".merged.replaced-999999999-zz")  # killed between publish's renames: the only copy of the old output
    held = os.open(alive / OWNER_FILE, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, ["merge", fixtures["@RUN@"], "--out", "merged"])
    finally:
        os.close(held)
    assert result.exit_code == 0, result.output
    for gone in (dead_pid, dead_lock, legacy_old, other_dead):
        assert not gone.exists() and f"removed {gone.name}" in result.output
    for kept in (legacy_new, alive, other, previous):
        assert kept.exists()
    assert f"kept {previous.name}: it holds the previous merged" in result.output
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / OWNER_FILE).exists()
    assert not [p for p in tmp_path.glob(".merged.partial-*") if p not in (legacy_new, alive)]
