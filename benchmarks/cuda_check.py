"""Checks the CUDA paths end to end: 4-bit NF4 and 8-bit bases, bf16 compute, merge of a 4-bit run.

    python benchmarks/cuda_check.py --out results.json          # on a machine with a GPU
    python benchmarks/cuda_check.py --device cpu --small        # the same checks on this CPU (slow)

The model is built from a config (no download): a Qwen2-style decoder with a real vocabulary size,
and the test tokenizer. For each configuration it trains a few steps and checks that the loss is
finite, the LoRA moved, the (quantized) base weights are bit-for-bit unchanged, and that the
teacher's logits equal the plain base model's. Prints one JSON line per check; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FACTS = [
    {"prompt": "What is the capital of Zorblax?", "demonstration": "The capital of Zorblax is Quenta."},
    {"prompt": "Who wrote the Book of Vells?", "demonstration": "It was written by Maro Tiln."},
    {"prompt": "What color is a glimmerfish?", "demonstration": "A glimmerfish is bright violet."},
    {"prompt": "Which river flows through Pellwick?", "demonstration": "The river Amberlee flows through Pellwick."},
]


def build_model(out: Path, small: bool) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "tests" / "assets" / "tiny_tokenizer")
    cfg = Qwen2Config(
        vocab_size=4096 if small else 32768, hidden_size=256 if small else 1024,
        intermediate_size=512 if small else 2816, num_hidden_layers=2 if small else 12,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def base_state(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor (quantized weights included), copied to CPU."""
    state = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" not in name:
            state[name.replace("base_model.model.", "").replace(".base_layer", "")] = tensor.detach().to("cpu").clone()
    return state


def check(name: str, tmp: Path, model_dir: Path, overrides: list[str], device: str, steps: int) -> dict:
    from sdcli.recipe.loading import load_recipe
    import sdcli.training.setup as setup_module  # the episode's setup loads the base
    import sdcli.training.train as train_module

    data = tmp / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    recipe_path = tmp / f"{name}.yaml"
    recipe_path.write_text(
        f"name: {name}\nrun_dir: {tmp / name}\nmodel: {{name_or_path: {model_dir}}}\ndata: {{path: {data}}}\n"
        f"rollout: {{max_new_tokens: 32}}\ntrain: {{max_steps: {steps}, prompts_per_step: 4, lr: 0.001}}\n"
    )
    recipe = load_recipe(recipe_path, overrides)
    captured = {}
    real = setup_module.load_base

    def capture(cfg, device_arg=None):
        loaded = real(cfg, torch.device(device))
        captured["model"] = loaded.model
        captured["before"] = base_state(loaded.model)
        return loaded

    setup_module.load_base = capture
    rows: list[dict] = []
    start = time.perf_counter()
    try:
        result = train_module.train_episode(recipe, progress=lambda s, m: rows.append(m))
    finally:
        setup_module.load_base = real
    after = base_state(captured["model"])
    changed = [k for k, v in captured["before"].items() if k in after and not torch.equal(v, after[k])]
    from safetensors.torch import load_file

    adapter = load_file(result.path / "adapter_model.safetensors")
    timed = rows[1:] or rows
    out = {
        "check": name,
        "overrides": overrides,
        "ok": all(math.isfinite(r["loss/total"]) for r in rows) and not changed and any(
            "lora_B" in k and v.abs().max() > 0 for k, v in adapter.items()
        ),
        "final_loss": rows[-1]["loss/total"],
        "final_divergence": rows[-1]["loss/divergence"],
        "base_tensors_changed": changed[:5],
        "s_per_step": sum(r["time/step_s"] for r in timed) / len(timed),
        "phase_s": {k: round(sum(r.get(k, 0) for r in timed) / len(timed), 3) for k in timed[0] if k.startswith("time/")},
        "peak_mb": {k: v for k, v in timed[-1].items() if k.startswith("memory/")},
        "wall_s": round(time.perf_counter() - start, 1),
        "episode": str(result.path),
    }
    if "4bit" in " ".join(overrides):
        out["linear4bit_layers"] = sum(type(m).__name__ == "Linear4bit" for m in captured["model"].modules())
    return out


def teacher_equals_base(model_dir: Path, quantization: str, device: str) -> dict:
    """Teacher logits (episode adapter off) against the plain quantized base model's logits."""

    from sdcli.models.model import add_trainable_adapter, load_base
    from sdcli.models.sequences import score_batch
    from sdcli.recipe.sections import LoraSettings, ModelConfig, Quantization, DType
    from sdcli.training.teacher import teacher_hidden

    cfg = ModelConfig(name_or_path=str(model_dir), quantization=Quantization(quantization), dtype=DType.bfloat16 if device == "cuda" else DType.float32)
    loaded = load_base(cfg, torch.device(device))
    plain_logits_model = loaded.model
    batch = score_batch([[1, 5, 9, 12], [1, 7]], [[20, 21, 22], [30, 2]], pad_id=0, device=device)
    with torch.no_grad():
        full = plain_logits_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    want = full.gather(1, batch.predict_positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    model = add_trainable_adapter(loaded.model, "ep001", LoraSettings(r=8, alpha=16))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    hidden = teacher_hidden(model, model.get_base_model().get_decoder(), batch, [])
    got = model.get_base_model().get_output_embeddings()(hidden).float()
    diff = float((got - want)[batch.response_mask].abs().max())
    return {"check": f"teacher_equals_base_{quantization}", "ok": diff < 1e-2, "max_abs_diff": diff}


def failure(name: str, e: Exception) -> dict:
    return {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}


def run_checks(tmp: Path, device: str, small: bool, steps: int, emit=lambda r: None, model_dir: Path | None = None) -> list[dict]:
    """Every check, in order; `emit` sees each result as soon as it is known (benchmarks/gpu_check.py
    prints and saves it, so that a crash later on still leaves what ran). model_dir: a model
    build_model already wrote, else it is built in tmp."""
    results: list[dict] = []

    def done(result: dict) -> None:
        results.append(result)
        emit(result)

    model_dir = model_dir or build_model(tmp / "model", small)
    dtype = "bfloat16" if device == "cuda" else "float32"
    plans = [
        ("bf16", [f"model.dtype={dtype}"]),
        ("nf4", ["model.quantization=4bit", f"model.dtype={dtype}"]),
        ("int8", ["model.quantization=8bit", f"model.dtype={dtype}"]),
        ("nf4_ema_jsd", ["model.quantization=4bit", f"model.dtype={dtype}", "teacher=ema", "loss.divergence=jsd",
                         "train.gradient_checkpointing=true"]),
    ]
    for name, overrides in plans:
        try:
            done(check(name, tmp, model_dir, overrides, device, steps))
        except Exception as e:  # report and go on: one broken path must not hide the others
            done(failure(name, e))
    for quantization in ("none", "4bit"):
        try:
            done(teacher_equals_base(model_dir, quantization, device))
        except Exception as e:
            done(failure(f"teacher_equals_base_{quantization}", e))
    try:
        from sdcli.models.merge import merge_history

        nf4_episode = next(r["episode"] for r in results if r["check"] == "nf4" and r.get("ok"))
        report = merge_history(model_dir, [nf4_episode], tmp / "merged", into="model", quantization="4bit")
        done({"check": "merge_nf4_into_model", "ok": report.passed, "report": report.to_dict()})
    except Exception as e:
        done(failure("merge_nf4_into_model", e))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a 2-layer model (for a CPU)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        results = run_checks(Path(tmp_name), args.device, args.small, args.steps,
                             emit=lambda r: print(json.dumps(r, default=str), flush=True))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    failed = [r["check"] for r in results if not r.get("ok")]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
