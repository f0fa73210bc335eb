"""The student's and the teacher's pass over padded rows against the same rows packed end to end in one.

    python benchmarks/packed_rows.py            # SmolLM2-135M + LoRA r=16 on every linear, 2 threads

Four rows shaped like a reference step's (a 24-token chat header shared by all, then 9-20 prompt
tokens and 11-48 response tokens of their own): the forward and backward of the student's pass
(`response_hidden`, then a loss on every hidden state) and the teacher's forward without grad, each
way alternated, 4 rounds after a warm-up. Prints the mean seconds and each round's; asserts nothing.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    import sdcli.models.sequences as sequences
    from sdcli.models.model import load_base
    from sdcli.recipe.sections import ModelConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = get_peft_model(load_base(ModelConfig(), torch.device("cpu")).model,
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    decoder = model.get_base_model().model
    tokens = torch.Generator().manual_seed(1)

    def some(n: int) -> list[int]:
        return torch.randint(200, 40000, (n,), generator=tokens).tolist()

    header = some(24)
    prompts = [header + some(n) for n in (12, 20, 9, 15)]
    responses = [some(n) for n in (48, 14, 40, 11)]
    batch = sequences.score_batch(prompts, responses, 0, torch.device("cpu"))
    lengths = [int(n) for n in batch.attention_mask.sum(1)]
    chosen = sequences._packing_pays(decoder.config, lengths, batch.shared_prefix)
    pays = sequences._packing_pays

    def timed(way: str, grad: bool) -> float:
        sequences._packing_pays = lambda *a: way == "packed"
        started = time.perf_counter()
        if grad:
            sequences.response_hidden(decoder, batch).square().sum().backward()
        else:
            with torch.no_grad():
                sequences.response_hidden(decoder, batch)
        sequences._packing_pays = pays
        return time.perf_counter() - started

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {cpu_name()}  torch {torch.__version__}  "
          f"{platform.python_version()}  2 threads")
    print(f"rows of {lengths} tokens ({batch.shared_prefix} shared), padded to {batch.input_ids.shape[1]}: "
          f"{sum(lengths) - 3 * batch.shared_prefix} tokens to compute packed, "
          f"{len(lengths) * (batch.input_ids.shape[1] - batch.shared_prefix) + batch.shared_prefix} padded; "
          f"sd packs these: {chosen}")
    for grad, name in ((True, "student: forward + backward"), (False, "teacher: forward, no grad")):
        times = {"padded": [], "packed": []}
        timed("padded", grad), timed("packed", grad)
        for _ in range(4):
            for way in times:
                times[way].append(timed(way, grad))
        padded, packed = statistics.mean(times["padded"]), statistics.mean(times["packed"])
        print(f"{name:<28} padded {padded:.3f} s  packed {packed:.3f} s  ({packed / padded:.2f}x)   rounds: "
              + "  ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(times["padded"], times["packed"])))


if __name__ == "__main__":
    main()
