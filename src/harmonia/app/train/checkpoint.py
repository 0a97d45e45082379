"""Crash-safe checkpoint files that cannot run code, and RNG state capture.

:func:`atomic_save` writes to a temporary file in the target folder, fsyncs it and renames it onto the
target with ``os.replace`` (atomic on POSIX and Windows), so a process killed mid-write leaves either
the old checkpoint or the new one at ``path``, never a truncated file. A kill during the write can leave the
temporary file behind; :func:`remove_stale_temp_files` deletes those when a run starts or resumes.

:func:`load_checkpoint` unpickles with ``torch.load(..., weights_only=True)``: a checkpoint may hold only
tensors and plain containers (dict, list, tuple, str, int, float, bool, None), so a file crafted to run code
when unpickled (a ``__reduce__`` payload) is refused instead of executed. Everything harmonia saves, RNG
states included, is written in those types.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmonia.errors import CheckpointError

CHECKPOINT_FORMAT_VERSION = 1


def last_checkpoint_path(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/last.pt``: where a run keeps the checkpoint it resumes from."""
    return Path(run_dir) / "checkpoints" / "last.pt"


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


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete the temporary files that a process killed inside :func:`atomic_save` left beside ``path``.

    Call it only when no other process is writing ``path``. Returns the files removed.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    removed = []
    for stale in target.parent.glob(f"{_temp_prefix(target)}*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed.append(stale)
    return removed


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer reports a failed write as RuntimeError("... file write failed")
    return isinstance(exc, RuntimeError) and "write failed" in str(exc)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    Raises :class:`~harmonia.errors.CheckpointError` when the file cannot be written (disk full, no
    permission); the previous file at ``path``, if any, is left intact and the temporary file removed.
    """
    target = Path(path)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=_temp_prefix(target), suffix=".tmp", delete=False
        ) as tmp:
            tmp_path = Path(tmp.name)
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_path, target)
    except BaseException as exc:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        if not isinstance(exc, (OSError, RuntimeError)):
            raise
        kept = f"the previous checkpoint at {target} is intact" if target.exists() else "nothing was written"
        if _is_disk_full(exc):
            raise CheckpointError(
                f"could not write checkpoint {target}: no space left on device ({exc}); {kept}. Free disk "
                "space and continue the run with --resume"
            ) from exc
        raise CheckpointError(
            f"could not write checkpoint {target} ({type(exc).__name__}: {exc}); {kept}. Make the folder "
            "writable (or choose another out_dir) and continue the run with --resume"
        ) from exc
    _fsync_dir(target.parent)


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint written with :func:`atomic_save` onto the CPU and check its format version.

    Only tensors and plain containers are unpickled (``weights_only=True``); nothing in the file can run
    code. Raises :class:`~harmonia.errors.CheckpointError` when the file is missing, corrupt, holds other
    objects, is not a dict, has a ``format_version`` other than :data:`CHECKPOINT_FORMAT_VERSION`, or lacks
    one of the ``required`` keys.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(
            f"no checkpoint at {file}; start without --resume or point to the run folder that has it"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()]
        detail = next((ln for ln in lines if "global" in ln.lower() and "unsupported" in ln.lower()), "")
        if not detail:  # not a pickle at all (e.g. "Unsupported operand"): damaged, not unsafe
            raise _corrupt(file, exc) from exc
        raise CheckpointError(
            f"{file} is not a harmonia checkpoint: it holds Python objects other than tensors and plain "
            f"containers, which harmonia refuses to unpickle because loading them can run arbitrary code "
            f"({detail[:200]}). Point to a checkpoint written by harmonia; never "
            "load files from a source you do not trust"
        ) from exc
    except Exception as exc:
        raise _corrupt(file, exc) from exc
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
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {file} has no {', '.join(repr(k) for k in missing)} entry (it has "
            f"{', '.join(sorted(map(str, state))) or 'nothing'}); it was not written by this harmonia's "
            "trainer, or was edited. Point to a complete checkpoint or start again with --overwrite"
        )
    return state


def _corrupt(file: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {file} is corrupt or unreadable ({type(exc).__name__}: {exc}); resume from the "
        "previous checkpoint or start again with --overwrite"
    )


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the Python ``random``, numpy global, torch CPU and (if available) all CUDA generators.

    Only plain types and tensors, so that :func:`load_checkpoint` reads them back with ``weights_only``.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
    return {
        "python": random.getstate(),
        "numpy": (
            str(kind),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached_gaussian),
        ),
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
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)
