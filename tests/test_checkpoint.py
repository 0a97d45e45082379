"""Tests for harmonia.app.train.checkpoint: atomic saving, corrupt-file errors and RNG state."""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from harmonia.app.train import checkpoint as ckpt
from harmonia.app.train.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from harmonia.errors import CheckpointError


def _state(value: float = 1.0) -> dict[str, Any]:
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "epoch": 3,
        "model": {"w": torch.full((4, 4), value)},
        "history": [0.5, 0.25],
    }


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run" / "last.pt"
    atomic_save(_state(2.0), path)
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 3
    assert loaded["history"] == [0.5, 0.25]
    assert torch.equal(loaded["model"]["w"], torch.full((4, 4), 2.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_overwrite_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    for v in range(3):
        atomic_save(_state(float(v)), path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((4, 4), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*--resume"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file_is_reported_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save(_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "--overwrite" in str(info.value)


def test_garbage_file_is_reported_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_format_version_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    atomic_save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)
    atomic_save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a harmonia checkpoint"):
        load_checkpoint(path)
    atomic_save({"format_version": CHECKPOINT_FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_checkpoint(path)


def test_failed_save_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    atomic_save(_state(7.0), path)
    before = path.read_bytes()

    def broken_save(obj: object, f: Any, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=r"no space left on device.*is intact.*Free disk space.*resume"):
        atomic_save(_state(8.0), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((4, 4), 7.0))


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(obj: object, f: Any, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_state(), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def _draws() -> tuple[list[float], np.ndarray, torch.Tensor]:
    return [random.random() for _ in range(3)], np.random.rand(3), torch.rand(3)


def test_rng_round_trip_through_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    first = _draws()
    _draws()  # advance every generator further

    path = tmp_path / "rng.pt"
    atomic_save({"format_version": CHECKPOINT_FORMAT_VERSION, "rng": state}, path)
    restore_rng_state(load_checkpoint(path)["rng"])
    second = _draws()
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])


def test_restore_rejects_incomplete_state() -> None:
    with pytest.raises(CheckpointError, match="missing"):
        restore_rng_state({"python": random.getstate()})
