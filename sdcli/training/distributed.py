"""Data-parallel episodes on torch.distributed: one process per rank, started by torchrun.

    torchrun --nproc_per_node=N -m sdcli train RECIPE [KEY=VALUE ...]

Every rank loads the base model and the same LoRA adapter (the base is replicated, not sharded).
Per step every rank draws the same global batch of `train.prompts_per_step` prompts from the same
`ExampleSampler` and takes its contiguous share (`share_bounds`), so each example is used exactly
once per pass over the data; anchor prompts are split the same way. Each rank samples, builds the
teacher's contexts and scores teacher and student for its share only. Then one exchange gives
every rank the other ranks' sequence counts (and the figures of the log line), and one all-reduce
sums the LoRA gradients weighted by sequence count, so that they equal the gradient of one
process on the whole batch (the loss is a mean over sequences). Clipping and the optimizer step
follow on every rank, on the same numbers. Sampling draws from a random stream per rank, derived
from `train.seed` and the rank, so a run is reproducible for a given number of ranks.

Rank 0 alone writes: the episode folder, metrics, checkpoints (with every rank's random state),
the evaluation and the published episode, and it holds the run lock. The other ranks read what
they need (data, model, earlier episodes, a checkpoint to resume from) from the same paths.

Failures. Every collective is an exchange of each rank's status first (`exchange`). A rank whose
command fails (bad data, a full disk, a bug) reports it at its next exchange instead of leaving;
there every rank learns it, all stop at the same point, and rank 0 alone prints one message
naming the rank (`JobStopped`). A rank that dies (kill -9, out of memory) cannot report: the
others' next collective fails, each says it lost contact, and torchrun stops the rest.

With no torchrun variables (or a world of one) nothing here creates a process group, and every
function returns its input unchanged: a single process runs exactly the code it ran before.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import re
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from sdcli.core.errors import DiskFullError, Interrupted, JobStopped, UserError, is_disk_full

# how long a rank waits in a collective for the others (rank 0 alone evaluates at the end of an
# episode while the others wait): SD_DIST_TIMEOUT_MIN minutes
DEFAULT_TIMEOUT_MIN = 120.0


def share_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n items: shares differ in size by at most one,
    every item belongs to exactly one rank, and rank order is item order."""
    return rank * n // world, (rank + 1) * n // world


@dataclass
class Ranks:
    """This process's place in the job: rank `rank` of `world` (world 1: no job, one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    in_sync: bool = True  # False once a collective failed: no more collectives, not even at exit
    _objects: object = field(default=None, repr=False)  # process group for exchanges (gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device this rank trains on; None for one process (the usual default device)."""
        if self.world == 1:
            return None
        import torch

        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    # --- the share of a step ------------------------------------------------------------------

    def split(self, items: list) -> list:
        """This rank's contiguous share of `items` (all of them for one process)."""
        if self.world == 1:
            return items
        start, end = share_bounds(len(items), self.world, self.rank)
        return items[start:end]

    def share_of_batch(self, batch: list, n_off: int, carries_demonstration) -> tuple[list, int]:
        """This rank's share of the global batch, and how many of the batch's `n_off` off-policy
        prompts are in it. One process takes the first `n_off` examples that carry a demonstration;
        that choice is made over the global batch, so a rank's share of them is what is left of
        `n_off` after the carriers in the shares before its own."""
        if self.world == 1:
            return batch, n_off
        start, end = share_bounds(len(batch), self.world, self.rank)
        before = sum(1 for ex in batch[:start] if carries_demonstration(ex)) if n_off else 0
        return batch[start:end], max(0, n_off - before)

    def seed_sampling(self, seed: int) -> None:
        """Each rank samples from its own random stream, derived from the seed and the rank (called
        after the adapter is initialised, which must be the same on every rank)."""
        if self.world == 1:
            return
        import torch

        derived = (seed * 1_000_003 + 7_919 * (self.rank + 1)) % 2**63
        torch.manual_seed(derived)
        random.seed(derived)

    # --- collectives ------------------------------------------------------------------------------

    def exchange(self, payload=None) -> list:
        """Every rank's `payload`, in rank order, on every rank. Raises JobStopped on every rank when
        one of them reported a failure instead (`report`)."""
        if self.world == 1:
            return [payload]
        return self._exchange({"failure": None, "payload": payload})

    def from_main(self, value):
        """Rank 0's `value` on every rank (the others pass anything, e.g. None)."""
        if self.world == 1:
            return value
        return self.exchange(value if self.is_main else None)[0]

    def any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        return any(self.exchange(bool(flag)))

    def totals(self, *counts: int) -> tuple[int, ...]:
        if self.world == 1:
            return counts
        shares = self.exchange(list(counts))
        return tuple(sum(s[i] for s in shares) for i in range(len(counts)))

    def check_same(self, facts: dict) -> None:
        """Refuse to train when the ranks disagree on what they train (the data, the recipe, the
        earlier episodes, the step a resume starts from): on several machines, run_dir must be
        the same folder (a shared filesystem) and the data and model paths must hold the same files."""
        if self.world == 1:
            return
        shares = self.exchange(facts)
        problems = [
            f"rank {r}: {key} = {str(share[key])[:120]!r}, rank 0: {str(facts_0)[:120]!r}"
            for r, share in enumerate(shares[1:], start=1)
            for key, facts_0 in shares[0].items()
            if share.get(key) != facts_0
        ]
        if problems:
            raise UserError(
                "The ranks of this job disagree on what they train:", problems,
                hint="Give every rank the same command; on several machines run_dir must be one shared folder, "
                "and the data and model paths must hold the same files on every machine.",
            )

    def broadcast_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Rank 0's values of `params` on every rank (the same seed gives the same LoRA init; this
        makes sure of it, whatever the device does)."""
        if self.world == 1:
            return
        import torch

        self.exchange()  # no rank failed before this collective
        with self._collective():
            for name in sorted(params):
                torch.distributed.broadcast(params[name].data, src=0)

    def with_rank_rng(self, extra: dict) -> dict:
        """`extra` for a checkpoint, plus every rank's random state (gathered on rank 0), so that a
        resumed run samples on every rank what the uninterrupted run would have."""
        if self.world == 1:
            return extra
        from sdcli.training.checkpoint import rng_state

        states = self.exchange(rng_state())
        return {**extra, "world_size": self.world, "rank_rng": states}

    def own_rng(self, state: dict, log) -> dict | None:
        """The random state this rank resumes with from a checkpoint `state`; None: keep the
        current one (the checkpoint was written by another number of ranks)."""
        ranks = state["extra"].get("rank_rng")
        written_by = len(ranks) if ranks is not None else 1
        if written_by == self.world:
            return ranks[self.rank] if ranks is not None else state["rng"]
        if log:
            log(f"note: the checkpoint was written by {written_by} rank(s) and is resumed by {self.world}: "
                "training continues from it, but samples differ from an uninterrupted run")
        return state["rng"] if self.is_main else None

    def average_gradients(self, params: list[torch.Tensor], figures: dict) -> list[dict]:
        """Make every rank's gradients those of one process on the whole global batch.

        `figures["sequences"]` is the number of sequences this rank's loss averaged over; each
        rank's gradient is weighted by its share of all sequences and the weighted gradients are
        summed. A parameter no rank has a gradient for keeps none (as one process on a batch with
        nothing to learn from: AdamW then skips it). Returns every rank's `figures`."""
        import torch

        has_grad = [p.grad is not None for p in params]
        shares = self.exchange({**figures, "has_grad": has_grad})
        total = sum(s["sequences"] for s in shares)
        anywhere = [any(s["has_grad"][i] for s in shares) for i in range(len(params))]
        if total == 0 or not any(anywhere):
            for p in params:
                p.grad = None
            return shares
        device = params[0].device
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float32)
            for p, used in zip(params, anywhere) if used
        ])
        flat.mul_(figures["sequences"] / total)
        with self._collective():
            torch.distributed.all_reduce(flat)
        offset = 0
        for p, used in zip(params, anywhere):
            if not used:
                p.grad = None
                continue
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        return shares

    # --- failures ---------------------------------------------------------------------------------

    @contextmanager
    def one_job(self):
        """The body of a command that every rank runs: an exception on one rank is reported at the
        other ranks' next exchange, so every rank stops there, rank 0 says why once, and every rank
        exits with the code one process would have exited with."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except JobStopped:
            raise
        except Exception as e:
            self.report(e)
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: this rank leaves without telling the others
            self.in_sync = False
            raise

    def report(self, error: Exception) -> None:
        """Tell the other ranks that this one failed with `error`; raises what this rank should
        exit with: rank 0 its own error (printed as by one process), the others a silent JobStopped.
        When the others cannot be told (no process group), this rank says it itself, whichever it is."""
        summary = _summary(error)
        if self.in_sync:
            try:
                self._exchange({"failure": summary, "payload": None}, own=error)
            except JobStopped as stopped:
                if os.environ.get("SD_DEBUG"):
                    raise error from None  # its traceback, on the rank it happened on
                raise stopped from None
            except Exception as e:
                if e is error:  # rank 0 failed: its own error, as one process would show it
                    raise
        self.in_sync = False
        if os.environ.get("SD_DEBUG"):
            raise error
        raise JobStopped(f"rank {self.rank} of {self.world} ({summary['host']}): {summary['text']}", summary["code"],
                         label=summary["label"], hint=summary["hint"]) from None

    def _exchange(self, sent: dict, own: Exception | None = None) -> list:
        import torch

        self._ensure_group()
        got: list = [None] * self.world
        with self._collective():
            torch.distributed.all_gather_object(got, sent, group=self._objects)
        failures = [(r, g["failure"]) for r, g in enumerate(got) if g["failure"] is not None]
        if not failures:
            return [g["payload"] for g in got]
        if self.is_main and own is not None:
            raise own
        first_rank, first = failures[0]
        code = first["code"]
        if not self.is_main:
            raise JobStopped(None, code)
        others = [r for r, _ in failures[1:]]
        also = f" (rank(s) {', '.join(map(str, others))} failed too)" if others else ""
        raise JobStopped(f"rank {first_rank} of {self.world} ({first['host']}){also}: {first['text']}", code,
                         label=first["label"], hint=first["hint"])

    @contextmanager
    def _collective(self):
        """A failing collective means a rank is gone (killed, crashed) or stuck past the timeout."""
        try:
            yield
        except Exception as e:
            self.in_sync = False
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:160]  # gloo: "[file.cc:537] Read error ..."
            raise JobStopped(
                f"rank {self.rank} of {self.world} ({socket.gethostname()}): lost contact with the other ranks "
                f"({first}). Another rank was killed or failed; its own message, or torchrun's summary, says which.",
                1, hint="With train.checkpoint_every set, the same command plus --resume continues from the last checkpoint.",
            ) from None

    def _ensure_group(self) -> None:
        import torch

        dist = torch.distributed
        if dist.is_initialized():
            return
        timeout = timedelta(minutes=float(os.environ.get("SD_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN)))
        if torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"rank {self.rank} has local rank {self.local_rank}, but this machine has "
                    f"{torch.cuda.device_count()} GPU(s); sd trains one rank per GPU.",
                    hint="Start at most one process per GPU (torchrun --nproc_per_node).",
                )
            torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl", timeout=timeout)
            self._objects = dist.new_group(backend="gloo", timeout=timeout)  # pickled objects stay on the CPU
        else:
            dist.init_process_group("gloo", timeout=timeout)
            self._objects = None  # the default group
        atexit.register(self._finish)

    def _finish(self) -> None:
        """At exit: wait for the other ranks (rank 0 may still be printing why the job stopped,
        and torchrun stops every rank as soon as one exits), then leave the group."""
        import torch

        dist = torch.distributed
        if not dist.is_initialized():
            return
        if self.in_sync:
            try:
                dist.barrier(group=self._objects)
            except Exception:
                pass
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _summary(error: Exception) -> dict:
    """What the other ranks need to know of a failure: what rank 0 prints, and the exit code."""
    host = socket.gethostname()
    if isinstance(error, UserError):
        return {"code": 2, "label": "error", "text": error.render(), "hint": None, "host": host}
    if isinstance(error, Interrupted):
        return {"code": error.code, "label": None, "text": str(error), "hint": None, "host": host}
    if is_disk_full(error):
        problem = DiskFullError(None, f" ({type(error).__name__}: {error})")
        return {"code": 2, "label": "error", "text": problem.render(), "hint": None, "host": host}
    return {"code": 1, "label": "internal error", "text": f"{type(error).__name__}: {error}", "host": host,
            "hint": "Run again with SD_DEBUG=1 for the full traceback, and please report it."}


_current: Ranks | None = None


def current() -> Ranks:
    """This process's rank and world size, from torchrun's environment variables."""
    global _current
    if _current is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            _current = Ranks(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        else:
            _current = Ranks()
    return _current


def stack_padded(tensors: list, fill=0) -> torch.Tensor | None:
    """[B_r, T_r, ...] tensors (None skipped) as one [sum B_r, max T_r, ...] tensor, padded with `fill`."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return None
    width = max(t.shape[1] for t in tensors)
    out = tensors[0].new_full((sum(t.shape[0] for t in tensors), width, *tensors[0].shape[2:]), fill)
    row = 0
    for t in tensors:
        out[row : row + t.shape[0], : t.shape[1]] = t
        row += t.shape[0]
    return out


def launch_local(nproc: int, args: list[str]) -> int:
    """`sd train --nproc N`: start N ranks of `python -m sdcli ARGS` on this machine as
    `torchrun --standalone --nproc_per_node=N` does; returns the exit code of the first rank that
    failed (0 when all succeeded), without torchrun's traceback (the ranks have said what failed)."""
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: N processes of all cores each would crowd the CPU
        os.environ["OMP_NUM_THREADS"] = "1"
    for name in list(logging.root.manager.loggerDict):  # the ranks say what failed; torchrun's agent need not
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # The agent keeps each rank's error file in a folder of its own; left to itself it makes one
    # in the temporary folder on every launch and never removes it.
    with tempfile.TemporaryDirectory(prefix="sd-ranks-") as agent_files:
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
            rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=agent_files),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "sdcli", *args)
        except SignalException as e:  # Ctrl-C: passed on to every rank, which stop after their step (and say so)
            return 130 if e.sigval == signal.SIGINT else 128 + int(e.sigval)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            if failure.exitcode > 0:
                return failure.exitcode
            name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else -failure.exitcode
            print(f"error: rank {rank} of {nproc} was killed ({name}), so the job stopped.", file=sys.stderr, flush=True)
            return 128 - failure.exitcode
    return 0
