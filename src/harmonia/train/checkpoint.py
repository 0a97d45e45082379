"""Crash-safe checkpoint files and RNG state capture.

:func:`atomic_save` writes to a temporary file in the target folder, fsyncs it and renames it onto the
target with ``os.replace`` (atomic on POSIX and Windows), so a process killed mid-write leaves either
the old checkpoint or the new one at ``path``, never a truncated file.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmonia.errors import CheckpointError

CHECKPOINT_FORMAT_VERSION = 1


def _fsync_dir(directory: Path) -> None:
    """Persist the rename in ``directory`` (best effort: not every OS/file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
        ) as tmp:
            tmp_path = Path(tmp.name)
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        raise
    _fsync_dir(target.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written with :func:`atomic_save` onto the CPU and check its format version.

    Raises :class:`~harmonia.errors.CheckpointError` when the file is missing, corrupt, not a dict, or
    has a ``format_version`` other than :data:`CHECKPOINT_FORMAT_VERSION`.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(
            f"no checkpoint at {file}; start without --resume or point to the run folder that has it"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {file} is corrupt or unreadable ({type(exc).__name__}: {exc}); resume from the "
            "previous checkpoint or start again with --overwrite"
        ) from exc
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(
            f"{file} is not a harmonia checkpoint (expected a dict with a 'format_version' key, got "
            f"{type(state).__name__}); point --resume to a checkpoint written by harmonia"
        )
    version = state["format_version"]
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {file} has format_version {version!r} but this harmonia reads version "
            f"{CHECKPOINT_FORMAT_VERSION}; use the harmonia release that wrote it or start again with "
            "--overwrite"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the Python ``random``, numpy global, torch CPU and (if available) all CUDA generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`.

    CUDA states are restored for the devices present in both the snapshot and this machine.
    """
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise CheckpointError(
            f"RNG state is missing {missing}; pass the dict returned by capture_rng_state() "
            "(the checkpoint may come from another program)"
        )
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)
