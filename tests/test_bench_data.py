"""``harmonia bench data``: prep against the decode-only floor, the loaders against the training step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from avfixtures import write_video
from harmonia.app.bench import data_loaders
from harmonia.app.bench.data_loaders import CyclingSampler, saved_bytes, step_batch_size
from harmonia.app.cli import main
from harmonia.data.media import read_frames


def _every_frame_then_pick(path: Path, fps: float, max_frames: int | None) -> np.ndarray:
    """The frames read_frames promises, from a decoding of every picture: the first at or after k / fps."""
    import av

    kept, next_time = [], 0.0
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            if frame.time + 1e-6 < next_time:
                continue
            kept.append(frame.to_ndarray(format="rgb24"))
            next_time += 1 / fps
            if max_frames is not None and len(kept) == max_frames:
                break
    return np.stack(kept)


def test_read_frames_skips_unreferenced_pictures_and_keeps_the_same_frames(tmp_path: Path) -> None:
    """On H.264 with B-frames (pictures no other refers to, which read_frames does not decode unless it
    keeps them), at several rates, the kept frames are those of decoding every picture."""
    import av
    from av.video.frame import PictureType

    video = write_video(tmp_path / "b.mp4", seconds=4.0, fps=25, size=64, codec="libx264")
    with av.open(str(video)) as container:
        kinds = {PictureType(frame.pict_type) for frame in container.decode(video=0)}
    assert PictureType.B in kinds  # the clip has pictures to skip
    for fps, max_frames in ((1.0, None), (2.0, 3), (3.7, None), (25.0, None), (0.5, 1)):
        got = read_frames(video, fps, max_frames)
        np.testing.assert_array_equal(got, _every_frame_then_pick(video, fps, max_frames))


def test_cycling_sampler_gives_full_batches_from_one_order_after_another() -> None:
    batches = list(CyclingSampler(5, 3, 4, seed=1))
    assert len(batches) == 4 and all(len(b) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))


class _LinearTrainer:
    """A trainer whose step is Linear(100 -> 50) then ReLU: autograd keeps the input [B, 100] (for the
    weight's gradient; the input needs none, so the weight is not kept) and the output [B, 50] (for the
    ReLU's): 600 bytes per sample."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.layer = torch.nn.Linear(100, 50)

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, float]:
        loss = torch.relu(self.layer(batch["inputs"]["x"])).sum()
        loss.backward()
        return None, float(loss.detach())


def test_step_batch_size_halves_the_batch_until_its_step_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _LinearTrainer()
    batch = {"inputs": {"x": torch.randn(64, 100)}, "labels": torch.zeros(64), "indices": torch.arange(64)}
    assert saved_bytes(trainer, {"inputs": {"x": torch.randn(2, 100)}}) == 2 * 600
    monkeypatch.setattr(data_loaders, "available_bytes", lambda: 10**9)
    assert step_batch_size(trainer, batch) == (64, 1.5 * 600 * 64)
    # 0.7 of 30,000 bytes holds 1.5 x 600 bytes x 16 samples, not x 32
    monkeypatch.setattr(data_loaders, "available_bytes", lambda: 30_000)
    assert step_batch_size(trainer, batch) == (16, 1.5 * 600 * 64)


@pytest.mark.integration
def test_bench_data_runs_end_to_end_on_tiny_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from harmonia.app.bench import data
    from harmonia.app.plotstyle import figure_problems
    from harmonia.data.prep import PrepSettings

    # one second of sound and one timed batch and step: the plumbing, not the figures
    monkeypatch.setattr(data, "PREP", {k: PrepSettings(seconds=1.0) for k in data.PREP})
    monkeypatch.setattr(data_loaders, "LOADER_BATCHES", (1, 1))
    monkeypatch.setattr(data_loaders, "STEPS", (0, 1))
    problems: list[list[str]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: problems.append(figure_problems(fig)))
    out = tmp_path / "bench"
    args = ["bench", "data", "--clips", "3", "--clip-seconds", "1", "--clip-size", "48x32", "--rounds", "1"]
    args += ["--loader-workers", "0", "1", "--out", str(out), "--quiet", "train.batch_size=2"]
    args += ["model.encoder=conv", "model.encoder_widths=[4]", "model.feature_dim=8", "data.image_size=16"]
    args += ["pretrain.width=8", "pretrain.embed_dim=8", "pretrain.depth=1", "pretrain.heads=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "data" / "data.json").read_text())
    assert [r["workers"] for r in summary["prep"]] == [1, 2]
    for r in summary["prep"]:
        assert r["prep_per_worker"] * r["workers"] == pytest.approx(r["prep_clips_per_s"])
        assert r["prep_over_floor"] > 0 and r["aa_floor_over_floor"] > 0
    assert [r["config"] for r in summary["loaders"]] == [
        "cremad_baseline",
        "kinetics_sounds_baseline",
        "shards_pretrain",
    ]
    for r in summary["loaders"]:
        assert set(r["loader_samples_per_s"]) == {"0", "1"} and r["step_samples_per_s"] > 0
    kinetics = summary["loaders"][1]["shapes"]
    assert kinetics["visual"] == [3, 3, 16, 16] and kinetics["audio"][:2] == [1, 257]  # 3 frames per clip
    assert "| 2 |" in printed and "bound |" in printed and "harmonia bench data" in printed
    assert "| kinetics_sounds_baseline | prepared folder | 2 | 1 |" in (out / "data" / "data.md").read_text()
    assert problems == [[]]  # one figure, readable
