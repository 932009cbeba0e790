"""Training checkpoints as safetensors (never pickle), written atomically so a killed run loses nothing.

A checkpoint is a folder ``step-000500/`` holding ``state.safetensors`` (model, EMA, optimizer tensors) and
``state.json`` (step, hyper-parameters). It is written under a temporary name and renamed into place, so a
half-written checkpoint is never mistaken for a finished one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write ``run_dir/step-XXXXXX`` atomically and delete all but the newest ``keep`` checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    temporary = run_dir / f".tmp-{final.name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(temporary / "state.safetensors"))
    (temporary / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def resolve_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``latest`` -> newest checkpoint in run_dir (None when there is none yet); otherwise a folder path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'state.safetensors'} not found: not a checkpoint folder")
    return path


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read (cut short by a full disk, damaged on disk)."""


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint. The tensors are on the CPU: whoever loads them puts each one where its
    parameter is (Roles.load_tensors; torch's Optimizer.load_state_dict does so for optimizer states)."""
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
        int(meta["step"])
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    return tensors, meta


def load_newest(run_dir: Path, load, say=print) -> Path | None:
    """``load(path)`` the newest checkpoint in ``run_dir`` that loads: a damaged one is set aside with one line
    saying so, and the one before it is tried. None: no checkpoint yet."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            load(path)
            return path
        except CheckpointError as err:
            say(f"{err}; set aside as {set_aside(path).name}, trying the one before it")
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept, never deleted): ``.damaged-step-000500``."""
    target = path.with_name(f".damaged-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def atomic_export(target: Path, write) -> None:
    """Call ``write(folder)`` on a temporary folder next to ``target``, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    write(temporary)
    previous = target.with_name(f".old-{target.name}")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(temporary, target)
    shutil.rmtree(previous, ignore_errors=True)
