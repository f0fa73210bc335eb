"""sd's former decoding loop against transformers' `generate`, interleaved in one process.

    python benchmarks/decode_vs_generate.py                # about 3 minutes on 2 cores
    python benchmarks/decode_vs_generate.py --rounds 8 --prompts 8

sd sampled with its own loop over the KV cache until 2026-11-29 (kept below as `hand_loop`, as it
was in sdcli/models/rollout.py). Issue #12 asked to keep it only if it was at least 10% faster
than `generate` at the reference setting, measured side by side; it was not (README, "Speed and
memory"), and sd now samples through `generate`. Both run here on the same model as training samples from (the built-in
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

import torch

from machine import cpu_name  # benchmarks/machine.py
from sdcli.models.rollout import SamplingSettings
from sdcli.models.sequences import cache_argument

HERE = Path(__file__).resolve().parent


def pick_next_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else temperature / top-k / top-p sampling."""
    if settings.temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= settings.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def hand_loop(model, prompts: list[list[int]], settings: SamplingSettings, stop_ids: set[int], pad_id: int) -> list[list[int]]:
    """Autoregressive sampling with a KV cache. prompts: token ids per row. Returns new tokens per row."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    cache = {cache_argument(model): DynamicCache()}  # filled in place by every forward
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1, **cache)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for _ in range(settings.max_new_tokens):
        next_tokens = pick_next_tokens(out.logits[:, -1, :], settings)
        next_tokens = next_tokens.masked_fill(finished, pad_id)
        generated.append(next_tokens)
        finished |= torch.isin(next_tokens, stop)
        if bool(finished.all()):
            break
        attention = torch.cat([attention, torch.ones((rows, 1), dtype=attention.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_tokens[:, None], attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **cache)
    if not generated:
        return [[] for _ in prompts]
    return torch.stack(generated, dim=1).tolist()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SD_BENCH_THREADS", "2")))
    args = parser.parse_args()

    from transformers import GenerationConfig

    from sdcli.models.int8_sampling import int8_for_sampling
    from sdcli.models.model import add_trainable_adapter, eval_mode, load_base, merged_for_sampling
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
        out = hand_loop(model, prompts, settings, stop_ids={-1}, pad_id=tokenizer.pad_token_id)
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
