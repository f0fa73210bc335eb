"""How far int8 sampling (rollout.sample_precision=int8) moves the sampled distribution. Prints numbers; asserts nothing.

    python benchmarks/int8_sampling_kl.py                 # built-in SmolLM2-135M, the quickstart prompts
    python benchmarks/int8_sampling_kl.py --samples 16 --threads 2

Responses are drawn from the float model at the rollout temperature (1, the default), as the
training loop would draw them with sample_precision=float. At every response position both
samplers' next-token distributions are computed on the same prefix, the way the decoding loop
computes them (prompt pass, then one step per token), and the script prints the mean
per-token KL(float || int8) over those positions: how much the int8 sampler's next token differs
from the float student's, per token, on the student's own trajectories. The model is the base at
the start of an episode (a fresh adapter is zero).

--rows: how many responses are decoded together (default 4, the reference step's 4 prompts x 1
sample). It matters: fbgemm rounds each call's whole input with one scale, so one row's outlier
coarsens every other row's activations, and the MLP output projections' outlier columns are those
of any row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402

DATA = [REPO / "recipes" / "data" / "facts.jsonl", REPO / "recipes" / "data" / "facts_eval.jsonl"]


def quickstart_prompts(encoder) -> list[list[int]]:
    from sdcli.core.data import as_messages

    rows = [json.loads(line) for path in DATA for line in path.read_text().splitlines() if line.strip()]
    return [encoder.encode(as_messages(row["prompt"])) for row in rows]


def sampler_logp(model, prompts, responses, int8: bool, pad_id: int):
    """The sampler's log-probabilities [N, T, V] at each response position, and the mask [N, T].

    Computed as `sdcli.models.rollout.decode` computes them, the prompt in one pass and then one
    position per step over the KV cache, but fed the given tokens instead of drawing its own: int8
    sampling treats the prompt pass and the steps differently, so scoring whole sequences in one
    pass would measure another sampler.
    """
    import torch
    from transformers import DynamicCache

    from sdcli.models.int8_sampling import int8_for_sampling
    from sdcli.models.sequences import cache_argument

    rows, width, steps = len(prompts), max(map(len, prompts)), max(map(len, responses))
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    forced = torch.full((rows, steps), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, steps), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, width - len(p):], attention[i, width - len(p):] = torch.tensor(p), 1
        forced[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = {cache_argument(model): DynamicCache()}
    out_logp = []
    with torch.no_grad(), int8_for_sampling(model, int8):
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **cache)
        for t in range(steps):
            out_logp.append(torch.log_softmax(out.logits[:, -1, :].float(), -1))
            attention = torch.cat([attention, torch.ones((rows, 1), dtype=attention.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=forced[:, t : t + 1], attention_mask=attention, position_ids=positions,
                        use_cache=True, logits_to_keep=1, **cache)
    return torch.stack(out_logp, dim=1), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rows", type=int, default=4, help="responses decoded together (default 4, the reference step)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from sdcli.models.model import load_base
    from sdcli.models.rollout import SamplingSettings, sample_responses
    from sdcli.models.sequences import PromptEncoder, eos_ids
    from sdcli.recipe.sections import ModelConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    loaded = load_base(ModelConfig(), torch.device("cpu"))  # builtin:smollm2-135m-instruct, float32
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [p for p in quickstart_prompts(PromptEncoder(tokenizer, 512)) for _ in range(args.samples)]
    stop = eos_ids(tokenizer, model)
    settings = SamplingSettings(args.max_new_tokens, args.temperature, 1.0, 0, merge=False, int8=False)
    responses = sample_responses(model, tokenizer, prompts, settings, stop)
    kept = [(p, r) for p, r in zip(prompts, responses) if r]
    prompts, responses = [p for p, _ in kept], [r for _, r in kept]

    def in_groups(int8: bool):
        parts = [sampler_logp(model, prompts[i:i + args.rows], responses[i:i + args.rows], int8, tokenizer.pad_token_id)
                 for i in range(0, len(prompts), args.rows)]
        steps = max(logp.shape[1] for logp, _ in parts)
        pad = torch.nn.functional.pad
        return (torch.cat([pad(logp, (0, 0, 0, steps - logp.shape[1])) for logp, _ in parts]),
                torch.cat([pad(mask, (0, steps - mask.shape[1])) for _, mask in parts]))

    float_logp, mask = in_groups(False)
    int8_logp, _ = in_groups(True)
    t = args.temperature or 1.0
    p_logp, q_logp = torch.log_softmax(float_logp / t, -1), torch.log_softmax(int8_logp / t, -1)  # the samplers' own
    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)[mask]
    same_top = (float_logp.argmax(-1) == int8_logp.argmax(-1))[mask].float().mean()
    sampled = torch.tensor([tok for r in responses for tok in r])
    shift = (float_logp - int8_logp)[mask].gather(-1, sampled[:, None]).squeeze(-1)

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {cpu_name()}  "
          f"torch {torch.__version__}  {platform.python_version()}  {args.threads} thread(s)")
    print(f"model {loaded.path.name}  {len(DATA)} quickstart files, {len(prompts)} responses x <= {args.max_new_tokens} "
          f"tokens at temperature {args.temperature:g}, decoded {args.rows} at a time: {int(mask.sum())} positions")
    print(f"mean per-token KL(float || int8)   {kl.mean():.5f} nats   (median {kl.median():.5f}, "
          f"95th percentile {kl.quantile(0.95):.5f}, max {kl.max():.4f})")
    print(f"same most likely token             {same_top:.1%} of positions")
    print(f"|log p_float(y) - log p_int8(y)|   {shift.abs().mean():.4f} mean over the sampled tokens y")


if __name__ == "__main__":
    main()
