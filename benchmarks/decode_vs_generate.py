"""sd's decoding loop against transformers' `generate`, interleaved in one process.

    python benchmarks/decode_vs_generate.py                # about 3 minutes on 2 cores
    python benchmarks/decode_vs_generate.py --rounds 8 --prompts 8

sd samples with its own loop over the KV cache (sdcli.models.rollout.decode). Issue #12 asks to
keep it only if it is at least 10% faster than `generate` at the reference setting, measured side
by side. Both run here on the same model as training samples from (the built-in
SmolLM2-135M-Instruct, fp32, with a LoRA adapter of r=16 on every linear layer, non-zero), the
same prompts (the quickstart's), temperature 1 with no top-k/top-p, and exactly --new-tokens
tokens per row (no stop token, so both do the same work), inside the same sampling contexts
training uses: int8 copies of the base (the CPU default) and the adapter folded into float
weights (rollout.sample_precision: float). Order per round: A B B A, so a slow minute hits both.
Prints each pair's seconds, then the median and range of the per-round ratio generate / decode.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SD_BENCH_THREADS", "2")))
    args = parser.parse_args()

    import torch
    from transformers import GenerationConfig

    from sdcli.models.int8_sampling import int8_for_sampling
    from sdcli.models.model import add_trainable_adapter, eval_mode, load_base, merged_for_sampling
    from sdcli.models.rollout import SamplingSettings, decode
    from sdcli.models.sequences import PromptEncoder
    from sdcli.recipe.sections import LoraSettings, ModelConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_base(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    model = add_trainable_adapter(loaded.model, "ep001", LoraSettings(r=16, alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)  # a trained adapter is not zero; zero B would fold to nothing
    tokenizer = loaded.tokenizer
    rows = [json.loads(line) for line in (HERE.parent / "recipes" / "data" / "facts_eval.jsonl").read_text().splitlines()]
    encoder = PromptEncoder(tokenizer, 512)
    prompts = [encoder.encode([{"role": "user", "content": rows[i % len(rows)]["prompt"]}]) for i in range(args.prompts)]
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, merge=True)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run_decode() -> int:
        out = decode(model, prompts, settings, stop_ids={-1}, pad_id=tokenizer.pad_token_id)
        return sum(len(r) for r in out)

    def run_generate() -> int:
        out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        return int((out.shape[1] - width) * out.shape[0])

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {cpu_name()}, {args.threads} threads; "
          f"{args.prompts} prompts x {args.new_tokens} new tokens, SmolLM2-135M fp32 + LoRA r=16")
    for label, int8 in (("int8 copies (CPU default)", True), ("float, adapter folded", False)):
        ratios = []
        with torch.no_grad(), eval_mode(model), merged_for_sampling(model, not int8), int8_for_sampling(model, int8):
            run_decode(), run_generate()  # warm-up: first-call allocations and packing
            for r in range(args.rounds):
                seconds = {"decode": [], "generate": []}
                for name in ("decode", "generate", "generate", "decode"):
                    start = time.perf_counter()
                    tokens = run_decode() if name == "decode" else run_generate()
                    seconds[name].append(time.perf_counter() - start)
                    assert tokens == args.prompts * args.new_tokens, (name, tokens)
                d, g = statistics.mean(seconds["decode"]), statistics.mean(seconds["generate"])
                ratios.append(g / d)
                print(f"{label:28s} round {r + 1}: decode {d:.3f} s, generate {g:.3f} s, generate/decode {g / d:.3f}")
        print(f"{label:28s} median generate/decode {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}; >1: sd's loop is faster)")


if __name__ == "__main__":
    main()
