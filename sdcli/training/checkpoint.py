"""Resumable state of an episode in progress, written atomically.

A checkpoint holds everything that decides the rest of the run: the trainable adapter (and the
EMA teacher), optimizer and scheduler state, every RNG, the data sampler's position and the step.
Resuming from it with the same recipe gives the same adapter as an uninterrupted run.

It is read with `torch.load(weights_only=True)`: a checkpoint holds only tensors and plain values,
and a full unpickler would run whatever code a crafted `state.pt` names, just by resuming.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import torch

from sdcli.core.errors import DiskFullError, UserError, is_disk_full, write_error

CHECKPOINT = "checkpoint"
STATE_FILE = "state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(partial: Path, *, step: int, params: dict[str, torch.Tensor], optimizer, scheduler, sampler_state: dict, extra: dict) -> None:
    """Write the state into `partial/checkpoint`, replacing the previous one only once it is whole.

    `torch.save` reports a full disk as "RuntimeError: ... unexpected pos", which names neither the
    disk nor the file; it writes through a Python file here, whose OSError stays attached to that
    error, so a full disk is a DiskFullError naming the file. The previous checkpoint stays."""
    target = partial / CHECKPOINT
    tmp = partial / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {
        "step": step,
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "sampler": sampler_state,
        "extra": extra,
    }
    try:
        tmp.mkdir(parents=True)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            problem = write_error(e, target / STATE_FILE)
        else:  # torch's writer turns the file's OSError into "RuntimeError: ... unexpected pos"
            problem = DiskFullError(target / STATE_FILE) if is_disk_full(e) else None
        if problem is None:
            raise
        if target.exists():
            problem.problems.append(f"the previous checkpoint, {target}, is unchanged")
        raise problem from None
    old = partial / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(partial: Path) -> dict | None:
    path = partial / CHECKPOINT / STATE_FILE
    if not path.is_file():
        old = partial / f".{CHECKPOINT}.old" / STATE_FILE  # crashed between the two renames
        path = old if old.is_file() else None
    if path is None:
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise _unreadable(path, partial, e) from None


def _unreadable(path: Path, partial: Path, e: BaseException) -> UserError:
    hint = f"Delete {partial} to start the episode over."
    if "Weights only load failed" in str(e):  # the restricted unpickler met an object it will not build
        return UserError(
            f"{path}: refusing to load this checkpoint; it holds objects other than tensors and plain values, "
            "so it was not written by sd or was altered. Nothing in it was run.",
            [_refused_object(e)], hint=hint,
        )
    return UserError(f"{path}: the checkpoint is damaged and cannot be read (truncated?).", [_first_line(e)], hint=hint)


def _refused_object(e: BaseException) -> str:
    """torch's message leads with how to load the file anyway; keep only what was refused."""
    for line in str(e).splitlines():
        if "Unsupported global" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0]
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
