"""One prepared run for a lent GPU: are the CUDA paths correct, how fast is sd's step at a realistic
size and at what memory, and how does it compare with the peer (TRL's SDFTTrainer) there.

    python benchmarks/gpu_check.py --out gpu.json                          # on a CUDA machine, ~5 minutes
    python benchmarks/gpu_check.py --out gpu.json --model /models/Qwen2.5-0.5B-Instruct   # also a local model
    python benchmarks/gpu_check.py --device cpu --smoke --out smoke.json   # every path that needs no GPU (CI)

Where the built-in model's weights cannot travel (a lent machine that reaches no package registry;
the GGUF is 98 MB), its shapes can: `--write-shapes DIR` writes, here, the configs and tokenizer of
SmolLM2-135M-Instruct and of a Qwen2.5-0.5B-shaped model (its layers, SmolLM2's tokenizer and
vocabulary) without weights, and `--random-weights DIR/NAME` there measures a model of those shapes
with random weights. Speed depends on the shapes alone, except that random weights never sample the
end-of-text token, so every response runs to the token limit (the peer's too).

In order, each stage reusing the benchmark that owns it:
1. environment: versions, the GPU, bf16 support, whether trl is installed.
2. correctness (benchmarks/cuda_check.py): bf16, NF4, 8-bit, and NF4 with an EMA teacher, JSD and
   gradient checkpointing, each trained a few steps on a 12-layer model built from a config (finite
   loss, the LoRA moved, base weights bit-identical); teacher logits equal the plain base model's
   (bf16 and NF4); the NF4 run merged into the model and verified.
3. speed (benchmarks/step_speed.py, in this process): sd's training step on the built-in
   SmolLM2-135M-Instruct (no download) and on each --model, in bf16 and NF4, 16 prompts x 4
   samples, at most 128 new tokens, on-policy: seconds per step and per phase (each phase bracketed
   by torch.cuda.synchronize), sampled tokens/s, and peak torch.cuda.max_memory_allocated.
4. side by side (benchmarks/side_by_side.py): sd and TRL's SDFTTrainer alternated at the same size in
   bf16, ratios per round; skipped, with a line saying so, where trl is not installed.

Prints one JSON line per check or measurement, then a short summary; --out gets all of it (rewritten
after every line, so a crash still leaves what ran). Every line has "check", "stage" and either
"ok" or "skipped" (the reason). Exits 1 if any line has "ok": false. A measurement that would start
after --budget-s seconds is skipped and says so, so that the run fits a short GPU lease;
--stages runs some stages only (a rerun of the measurements after a partial lease).

--smoke: tiny sizes (2 prompts x 2 samples, 8 new tokens, 2 steps, one side-by-side round) on the
2-layer model built from a config, for CI on a CPU; with --device cpu the CUDA-only parts are named
in "skipped" lines (stage "cpu").
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmarks this one reuses
sys.path.insert(0, str(REPO))

BUILTIN = "builtin:smollm2-135m-instruct"
STAGES = ("correctness", "speed", "side_by_side")
# Qwen2.5-0.5B's published layer sizes; the vocabulary is the tokenizer's that travels with it (SmolLM2's)
QWEN25_05B_LAYERS = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         max_position_embeddings=32768)


@dataclass(frozen=True)
class Sizes:
    prompts: int
    samples: int
    new_tokens: int
    steps: int  # per speed run; the first is a warm-up and not timed
    check_steps: int  # per correctness configuration
    rounds: int  # side by side
    peer_steps: int


FULL = Sizes(prompts=16, samples=4, new_tokens=128, steps=6, check_steps=6, rounds=2, peer_steps=4)
SMOKE = Sizes(prompts=2, samples=2, new_tokens=8, steps=2, check_steps=1, rounds=1, peer_steps=2)

# What a CPU run cannot show, by name (stage "cpu"): listed so that a green smoke run is not read as a GPU result.
CUDA_ONLY = {
    "cuda/bf16": "bf16 weights and compute: on a CPU every check and measurement runs in float32",
    "cuda/bitsandbytes_kernels": "NF4 and 8-bit ran on bitsandbytes' CPU kernels, not its CUDA ones",
    "cuda/max_memory_allocated": "memory figures are the process's RSS, not torch.cuda.max_memory_allocated",
    "cuda/synchronized_phases": "phases timed without torch.cuda.synchronize (nothing is queued on a CPU)",
}


class Report:
    """Collects the lines, prints each as JSON when it comes, and keeps --out up to date."""

    def __init__(self, out: Path | None, argv: list[str]):
        self.out, self.lines, self.started = out, [], time.time()
        self.head = {"argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def elapsed(self) -> float:
        return time.time() - self.started

    def add(self, stage: str, line: dict) -> dict:
        line = {"check": line.pop("check"), "stage": stage, **line}
        self.lines.append(line)
        print(json.dumps(line, default=str), flush=True)
        self.save()
        return line

    def save(self, summary: list[str] | None = None) -> None:
        if self.out:
            failed = [r["check"] for r in self.lines if r.get("ok") is False]
            self.out.write_text(json.dumps({**self.head, "elapsed_s": round(self.elapsed(), 1), "failed": failed,
                                            "results": self.lines, "summary": summary}, indent=2, default=str))


def error_line(check: str, e: BaseException) -> dict:
    return {"check": check, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str) -> dict:
    import torch

    from machine import cpu_name

    line = {"check": "environment", "ok": True, "device": device, "python": platform.python_version(),
            **versions(), "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        line.update(gpu=props.name, gpu_memory_mb=round(props.total_memory / 2**20), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return line


def peer_missing() -> str | None:
    """Why the side by side cannot run here, or None. Looks for trl without importing it."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return "trl is not installed here (pip install 'trl==1.16.*' to compare with its SDFTTrainer)"
    if not (Path(list(spec.submodule_search_locations)[0]) / "experimental" / "sdft").is_dir():
        return f"trl {versions()['trl']} has no trl.experimental.sdft (SDFTTrainer); trl 1.16 has it"
    return None


def precisions(device: str) -> dict[str, list[str]]:
    """Label -> recipe overrides. bf16 where the GPU has it (fp16 otherwise); float32 on a CPU."""
    import torch

    if device == "cuda":
        label, dtype = ("bf16", "bfloat16") if torch.cuda.is_bf16_supported() else ("fp16", "float16")
    else:
        label, dtype = "fp32", "float32"
    return {label: [f"model.dtype={dtype}"], "nf4": ["model.quantization=4bit", f"model.dtype={dtype}"]}


def write_shapes(out: Path) -> list[Path]:
    """Configs and tokenizers, no weights: what a machine without the built-in model's weights needs
    to measure its shapes (and a 0.5B model's) with --random-weights."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2Config

    from sdcli.models.builtin_model import ensure_builtin_model

    source = ensure_builtin_model()
    tokenizer, config = AutoTokenizer.from_pretrained(source), AutoConfig.from_pretrained(source)
    qwen = Qwen2Config(vocab_size=config.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                       pad_token_id=config.pad_token_id, **QWEN25_05B_LAYERS)
    folders = []
    for name, shapes in (("smollm2-135m-instruct", config), ("qwen2.5-0.5b-shapes", qwen)):
        folder = out / name
        shapes.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def random_weights(shapes: Path, tmp: Path) -> Path:
    """A model folder with `shapes`' config and tokenizer and seeded random weights."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(shapes)
    torch.manual_seed(0)
    folder = tmp / f"{shapes.name}-random"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for f in shapes.iterdir():  # the tokenizer's files (the config is already there)
        if f.is_file() and not (folder / f.name).exists():
            shutil.copy2(f, folder / f.name)
    return folder


def builtin_missing() -> str | None:
    from sdcli.core.errors import UserError
    from sdcli.models.builtin_model import gguf_path

    try:
        gguf_path()
    except UserError as e:
        return f"{e} (--random-weights measures its shapes; see --write-shapes)"
    return None


def speed_recipe(tmp: Path) -> Path:
    """The quickstart's setting without its eval (a benchmark times steps, not the held-out score)."""
    path = tmp / "speed.yaml"
    path.write_text(
        f"name: speed\nrun_dir: {tmp / 'speed-runs'}\nmodel: {{name_or_path: {BUILTIN}}}\n"
        "lora: {r: 16, alpha: 32, target_modules: all-linear}\nsignal: {kind: demonstrations}\n"
        f"data: {{path: {REPO / 'recipes' / 'data' / 'facts.jsonl'}}}\ntrain: {{seed: 0}}\n"
    )
    return path


def speed(recipe: Path, model: str, label: str, overrides: list[str], sizes: Sizes) -> dict:
    import torch

    from step_speed import run_one

    size = [f"model.name_or_path={model}", f"train.prompts_per_step={sizes.prompts}",
            f"rollout.num_samples={sizes.samples}", f"rollout.max_new_tokens={sizes.new_tokens}"]
    # what earlier stages left allocated sits under every phase peak: said, so that a leak cannot pass as sd's
    before_mb = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
    try:
        r = run_one(str(recipe), sizes.steps, 1, size + overrides)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "check": f"step/{label}", "ok": True, "model": model, "overrides": overrides,
        "prompts": sizes.prompts, "samples": sizes.samples, "max_new_tokens": sizes.new_tokens,
        "steps_timed": r["steps_timed"], "s_per_step": round(r["s_per_step"], 4),
        "phase_s": {k: round(v, 4) for k, v in r["phase_s"].items()},
        "tokens_per_s": round(r["tokens_per_s"], 1), "rollout_tokens_per_s": round(r["rollout_tokens_per_s"], 1),
        "mean_response_tokens": round(r["mean_response_tokens"], 1),
        "gpu_peak_mb": round(r["gpu_peak_mb"], 1) if "gpu_peak_mb" in r else None,
        "gpu_allocated_before_mb": None if before_mb is None else round(before_mb, 1),
        "phase_peak_mb": r["phase_peak_mb"], "process_peak_rss_mb": round(r["process_peak_rss_mb"], 1),
        "phases_synchronized": r.get("phases_synchronized", False),
    }


def side_by_side(recipe: Path, device: str, model: str, label: str, sizes: Sizes, report: Report,
                 budget_s: float) -> dict:
    from side_by_side import Setting, compare

    setting = Setting(device=device, prompts=sizes.prompts, samples=sizes.samples, new_tokens=sizes.new_tokens,
                      model=None if model == BUILTIN else model, recipe=str(recipe))
    result = compare(sizes.rounds, sizes.peer_steps, [], setting,
                     say=lambda line: print(f"# {label}: {line}", flush=True),
                     keep_going=lambda: report.elapsed() < budget_s)
    fields = ("s_per_step", "tokens_per_s", "gpu_peak_mb", "process_peak_rss_mb", "steps_timed")
    return {
        "check": f"side_by_side/{label}", "ok": True, "setting": asdict(setting), "rounds": len(result["rounds"]),
        "memory": result["memory"],
        "runs": [{tool: {k: run[tool].get(k) for k in fields} for tool in ("peer", "sd")} for run in result["rounds"]],
        "ratios": result["ratios"], "median": result["median"],
    }


def summary(report: Report, device: str, sizes: Sizes) -> list[str]:
    lines = []
    ran = [r for r in report.lines if "skipped" not in r]
    env = next((r for r in ran if r["check"] == "environment"), {})
    lines.append(f"gpu_check on {env.get('gpu') or env.get('cpu', '?')} ({device}), {report.elapsed():.0f} s")
    checks = [r for r in ran if r["stage"] == "correctness"]
    bad = [r["check"] for r in checks if not r.get("ok")]
    lines.append(f"correctness: {len(checks) - len(bad)} passed, {len(bad)} failed" + (f": {', '.join(bad)}" if bad else ""))
    steps = [r for r in ran if r["stage"] == "speed"]
    if steps:
        lines.append(f"sd's step, {sizes.prompts} prompts x {sizes.samples} samples, <= {sizes.new_tokens} new tokens:")
    for r in steps:
        if r.get("ok"):
            order = ["rollout", "context", "teacher", "student", "sync", "optimizer"]
            named = sorted(r["phase_s"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
            phases = ", ".join(f"{k} {v:.2f}" for k, v in named if v >= 0.005)
            memory = (f"{r['gpu_peak_mb']:.0f} MB peak GPU allocated" if r["gpu_peak_mb"] is not None
                      else f"{max(r['phase_peak_mb'].values(), default=0):.0f} MB peak RSS")
            lines.append(f"  {r['check'][5:]:<32} {r['s_per_step']:.3f} s/step ({phases}); "
                         f"{r['tokens_per_s']:.0f} tokens/s; {memory}")
        else:
            lines.append(f"  {r['check'][5:]:<32} failed: {r.get('error', '?')[:160]}")
    for r in ran:
        if r["stage"] == "side_by_side" and r.get("ok"):
            m = r["median"]
            lines.append(f"{r['check']}: sd over TRL's SDFTTrainer, median of {r['rounds']} round(s): "
                         f"steps/s {m['steps_per_s']:.2f}x, tokens/s {m.get('tokens_per_s', float('nan')):.2f}x, "
                         f"{r['memory']} {m['peak_memory']:.2f}x")
        elif r["stage"] == "side_by_side":
            lines.append(f"{r['check']}: failed: {r.get('error', '?')[:300]}")
    skipped = [r for r in report.lines if "skipped" in r]
    if skipped:
        lines.append("skipped: " + ", ".join(r["check"] for r in skipped if r["stage"] == "cpu") + " (on a CPU)"
                     if any(r["stage"] == "cpu" for r in skipped) else "skipped:")
        lines += [f"  {r['check']}: {r['skipped']}" for r in skipped if r["stage"] != "cpu"]
    failed = [r["check"] for r in report.lines if r.get("ok") is False]
    lines.append(f"FAILED: {', '.join(failed)}" if failed else "all checks passed")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when torch sees a GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the model built from a config (CI)")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="also measure this local model folder (repeatable); nothing is downloaded")
    parser.add_argument("--random-weights", action="append", default=[], metavar="DIR",
                        help="also measure a model of DIR's shapes (config.json and a tokenizer) with random weights")
    parser.add_argument("--write-shapes", type=Path, metavar="DIR",
                        help="write the built-in model's and a 0.5B model's shapes (no weights) into DIR, then exit")
    parser.add_argument("--no-peer", action="store_true", help="skip the side by side even where trl is installed")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="run only these (default all); each one left out gets a 'skipped' line")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no measurement after this many seconds (default 420: a 15-minute lease, with "
                             "start-up and a rerun to spare)")
    parser.add_argument("--out", type=Path, help="write every line and the summary to this JSON file")
    args = parser.parse_args()
    if args.write_shapes:
        for folder in write_shapes(args.write_shapes):
            print(folder)
        return

    if args.device == "cpu":  # sd trains on a GPU whenever one is visible: hide it from this process and its children
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a lent GPU machine reaches nothing outside it
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    if device == "cuda":  # the host side of a GPU step (sampling loop, bitsandbytes) may use the machine's cores
        os.environ.setdefault("SD_BENCH_THREADS", str(os.cpu_count() or 2))
    sizes = SMOKE if args.smoke else FULL
    report = Report(args.out, sys.argv[1:])

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        report.add("environment", environment(device))
        if device == "cpu":
            for name, why in CUDA_ONLY.items():
                report.add("cpu", {"check": name, "skipped": why})
        for stage in STAGES:
            if stage not in args.stages:
                report.add(stage, {"check": stage, "skipped": "not in --stages"})

        import cuda_check

        # the 2-layer model the correctness checks train on stands in for SmolLM2 in a smoke run
        tiny = cuda_check.build_model(tmp / "model", small=True) if args.smoke else None
        if "correctness" in args.stages:
            cuda_check.run_checks(tmp, device, small=args.smoke, steps=sizes.check_steps, model_dir=tiny,
                                  emit=lambda r: report.add("correctness", dict(r)))

        models = {"tiny-qwen2": str(tiny)} if args.smoke else {"smollm2-135m-instruct": BUILTIN}
        models.update({Path(m).name: str(Path(m).resolve()) for m in args.model})
        for shapes in map(Path, args.random_weights):
            models[f"{shapes.name}-random"] = str(random_weights(shapes, tmp))
        absent = None if args.smoke else builtin_missing()
        recipe = speed_recipe(tmp)
        for name, model in models.items() if "speed" in args.stages else ():
            for precision, overrides in precisions(device).items():
                label = f"{name}/{precision}"
                if model == BUILTIN and absent:
                    report.add("speed", {"check": f"step/{label}", "skipped": absent})
                elif report.elapsed() > args.budget_s:
                    report.add("speed", {"check": f"step/{label}", "skipped": f"past --budget-s {args.budget_s:.0f}"})
                    continue
                try:
                    report.add("speed", speed(recipe, model, label, overrides, sizes))
                except Exception as e:  # report and go on: a failed size must not hide the next one
                    report.add("speed", error_line(f"step/{label}", e))

        missing = "--no-peer" if args.no_peer else peer_missing()
        dtype_label = next(iter(precisions(device)))
        for name, model in models.items() if "side_by_side" in args.stages else ():
            label = f"{name}/{dtype_label}"
            if model == BUILTIN and absent:
                report.add("side_by_side", {"check": f"side_by_side/{label}", "skipped": absent})
            elif missing:
                report.add("side_by_side", {"check": f"side_by_side/{label}", "skipped": missing})
            elif report.elapsed() > args.budget_s:
                report.add("side_by_side", {"check": f"side_by_side/{label}", "skipped": f"past --budget-s {args.budget_s:.0f}"})
            else:
                try:
                    report.add("side_by_side", side_by_side(recipe, device, model, label, sizes, report, args.budget_s))
                except Exception as e:
                    report.add("side_by_side", error_line(f"side_by_side/{label}", e))

    lines = summary(report, device, sizes)
    print("\n".join(lines))
    report.save(lines)
    sys.exit(1 if any(r.get("ok") is False for r in report.lines) else 0)


if __name__ == "__main__":
    main()
