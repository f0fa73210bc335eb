"""Resumable state of an episode in progress, written atomically.

A checkpoint holds everything that decides the rest of the run: the trainable adapter (and the
EMA teacher), optimizer and scheduler state, every RNG, the data sampler's position, the teacher's
answers written so far (sdcli.training.teacher_answers) and the step.
Resuming from it with the same recipe gives the same adapter as an uninterrupted run;
`restore_checkpoint` refuses a checkpoint whose recipe (budget aside) or data file has changed.

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

from sdcli.core.atomic import swap_folder, write_atomic
from sdcli.core.data import file_sha256
from sdcli.core.errors import DiskFullError, UserError, is_disk_full, write_error
from sdcli.recipe.loading import dump_recipe
from sdcli.recipe.schema import Recipe
from sdcli.training.distributed import Ranks

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
    # The aside folder has a fixed name because load_checkpoint reads it when a crash came between
    # swap_folder's two renames; a stale one, from such a crash, goes first (a folder cannot be
    # renamed onto a folder that is not empty).
    old = partial / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    swap_folder(tmp, target, old)


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


def resume_key(recipe: Recipe) -> dict[str, str]:
    """Everything that must match for a resumed run to continue the same trajectory: the recipe
    (budget aside) and the data file's content, which the recipe names only by path."""
    recipe_text = dump_recipe(
        recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": None, "epochs": None})})
    )
    return {"recipe": recipe_text, "data_sha256": file_sha256(recipe.data.path)}


def restore_checkpoint(partial: Path, recipe: Recipe, params: dict, optimizer, scheduler, sampler, metrics_path: Path, log,
                       dist: Ranks | None = None, teacher_answers=None) -> int:
    """Put the interrupted episode's state back; returns the step to continue from. Every rank
    reads the checkpoint; rank 0 alone rewrites the metrics."""
    dist = dist or Ranks()
    state = load_checkpoint(partial)
    if state is None:
        log(f"resume: {partial.name} has no checkpoint; starting it from step 0")
        if dist.is_main:
            metrics_path.unlink(missing_ok=True)
        return 0
    key = resume_key(recipe)
    if state["extra"].get("recipe") != key["recipe"]:
        raise UserError(
            f"--resume: the recipe differs from the one {partial.name} was started with "
            "(only train.max_steps or train.epochs may change on resume).",
            hint=f"Compare with {partial / 'recipe.yaml'}, or delete {partial} to start over.",
        )
    then = state["extra"].get("data_sha256")  # absent in checkpoints written before it was recorded
    if then is not None and then != key["data_sha256"]:
        raise UserError(
            f"--resume: the data file {recipe.data.path} changed since {partial.name} was started "
            f"(sha256 {then[:12]}... then, {key['data_sha256'][:12]}... now); the rest of the run would "
            "continue on other examples than its first steps.",
            hint=f"Put the original data file back, or delete {partial} to start over.",
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.restore(state["sampler"])
    if teacher_answers is not None:
        teacher_answers.restore(state["extra"].get("teacher_answers", []))
    rng = dist.own_rng(state, log)
    if rng is not None:
        set_rng_state(rng)
    step = state["step"]
    if dist.is_main:
        lines = metrics_path.read_text().splitlines()[:step] if metrics_path.exists() else []
        write_atomic(metrics_path, "".join(line + "\n" for line in lines))
    log(f"resume: continuing {partial.name} from step {step}")
    return step


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
