"""Raw datasets to harmonia's prepared layout: PyAV decoding, the TPAMI spectrogram, and `harmonia prep` on
tiny generated fixtures in each dataset's raw layout (idempotent, resumable, corrupt files reported)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import spectrogram

from avfixtures import write_corrupt, write_video, write_wav
from harmonia.app.cli import main
from harmonia.data.media import MediaError, read_audio, read_frames, tpami_spectrogram


def test_frames_are_sampled_at_the_asked_rate(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", seconds=3.0, fps=10)
    frames = read_frames(video, fps=1.0)
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    # frame at t = k s is encoded frame 10k, whose first 30k mod 32 columns are bright
    for k, frame in enumerate(frames):
        bright = int((frame[16, :, 0] > 100).sum())
        assert abs(bright - (30 * k) % 32) <= 2, (k, bright)
    assert read_frames(video, fps=2.0).shape[0] == 6
    assert read_frames(video, fps=1.0, max_frames=2).shape[0] == 2


def test_audio_is_mono_resampled_and_keeps_its_pitch(tmp_path: Path) -> None:
    wave = read_audio(write_wav(tmp_path / "a.wav", seconds=2.0, sample_rate=22050, tone_hz=440), 16000)
    assert wave.dtype == np.float32 and abs(len(wave) - 32000) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 2
    from_video = read_audio(write_video(tmp_path / "v.mp4", tone_hz=1000), 16000)
    assert abs(len(from_video) / 16000 - 3.0) < 0.1


def test_tpami_spectrogram_is_the_scipy_recipe_on_the_tiled_clip() -> None:
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(20000).astype(np.float32)  # 1.25 s: tiled to 3 s
    got = tpami_spectrogram(wave, 16000, 3.0)
    x = np.concatenate([wave, wave, wave])[:48000].astype(np.float64)
    _, _, power = spectrogram(x, nperseg=512, noverlap=353)
    logs = np.log(power + 1e-7)
    np.testing.assert_allclose(got, (logs - logs.mean()) / logs.std(), rtol=1e-4, atol=1e-4)
    assert got.shape == (257, 299) and tpami_spectrogram(wave, 16000, 10.0).shape == (257, 1004)


def test_corrupt_and_empty_media_raise_a_media_error(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="cannot open"):
        read_frames(write_corrupt(tmp_path / "bad.flv"))
    with pytest.raises(MediaError, match="no audio stream"):
        read_audio(write_video(tmp_path / "silent.mp4"))


def _cremad(src: Path) -> None:
    for clip_id in ("1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_TIE_SAD_XX"):
        write_video(src / "VideoFlash" / f"{clip_id}.flv", container="flv", codec="flv")
        write_wav(src / "AudioWAV" / f"{clip_id}.wav")
    write_corrupt(src / "VideoFlash" / "1004_DFA_NEU_XX.flv")
    write_wav(src / "AudioWAV" / "1004_DFA_NEU_XX.wav")
    write_video(src / "VideoFlash" / "1005_DFA_FEA_XX.flv", container="flv", codec="flv")  # no audio file


def _index(dst: Path) -> list[dict[str, str]]:
    with open(dst / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.integration
def test_prep_cremad_reports_bad_clips_and_is_idempotent_and_resumable(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, dst = tmp_path / "CREMA-D", tmp_path / "prepared"
    _cremad(src)
    args = ["prep", "cremad", "--src", str(src), "--dst", str(dst), "--workers", "2", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "prepared 3 clips, 0 already done, 2 skipped" in printed
    index = _index(dst)
    assert [r["id"] for r in index] == ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_TIE_SAD_XX"]
    assert [r["label"] for r in index] == ["ANG", "HAP", "SAD"] and {r["frames"] for r in index} == {"3"}
    assert np.load(dst / "audio" / "1001_DFA_ANG_XX.npy").shape == (257, 299)
    assert len(list((dst / "frames" / "1002_IEO_HAP_HI").glob("*.jpg"))) == 3
    report = json.loads((dst / "prep_report.json").read_text())
    reasons = {f["id"]: f["reason"] for f in report["failed"]}
    assert "cannot open" in reasons["1004_DFA_NEU_XX"] and "missing audio" in reasons["1005_DFA_FEA_XX"]
    assert json.loads((dst / "meta.json").read_text())["settings"]["seconds"] == 3.0

    assert main(args) == 0  # idempotent: nothing left to do, same index
    assert "prepared 0 clips, 3 already done" in capsys.readouterr().out and _index(dst) == index
    shutil.rmtree(dst / "frames" / "1002_IEO_HAP_HI")  # as if killed before this clip finished
    assert main(args) == 0
    assert json.loads((dst / "prep_report.json").read_text())["prepared"] == ["1002_IEO_HAP_HI"]
    assert _index(dst) == index
    capsys.readouterr()
    assert main([*args, "--fps", "2"]) == 2  # finished clips of another recipe must not be mixed in
    assert "other settings (fps: 1.0 -> 2.0)" in capsys.readouterr().err


@pytest.mark.integration
def test_prep_reads_the_kinetics_sounds_ave_and_vggsound_layouts(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    write_video(ks / "train" / "playing_drums" / "abc.mp4", tone_hz=300)
    write_video(ks / "test" / "dog_barking" / "def.mp4", tone_hz=600)
    ave = tmp_path / "ave"
    write_video(ave / "AVE" / "vid1.mp4", seconds=10.0, fps=2, tone_hz=500)
    (ave / "trainSet.txt").write_text(
        "Category&VideoID&Quality&StartTime&EndTime\nChurch bell&vid1&good&0&10\n"
    )
    (ave / "valSet.txt").write_text("")
    (ave / "testSet.txt").write_text("Church bell&missing1&good&0&10\n")
    vgg = tmp_path / "vgg"
    write_video(vgg / "video" / "yt1_000030.mp4", tone_hz=800)
    (vgg / "vggsound.csv").write_text("yt1,30,playing violin,train\nyt2,10,dog barking,test\n")
    expected = {"kinetics_sounds": (ks, 2, 0), "ave": (ave, 1, 1), "vggsound": (vgg, 1, 1)}
    for dataset, (src, clips, failed) in expected.items():
        dst = tmp_path / f"out_{dataset}"
        assert main(["prep", dataset, "--src", str(src), "--dst", str(dst), "--workers", "1", "--quiet"]) == 0
        assert len(_index(dst)) == clips, dataset
        assert len(json.loads((dst / "prep_report.json").read_text())["failed"]) == failed, dataset
    assert _index(tmp_path / "out_ave")[0]["frames"] == "10"
    assert np.load(tmp_path / "out_ave" / "audio" / "vid1.npy").shape == (257, 1004)
    assert {r["label"] for r in _index(tmp_path / "out_kinetics_sounds")} == {"playing_drums", "dog_barking"}


def test_prep_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prep", "cremad", "--src", str(tmp_path), "--dst", str(tmp_path / "o"), "--quiet"]) == 2
    assert "VideoFlash" in capsys.readouterr().err
    assert main(["prep", "imagenet", "--src", str(tmp_path), "--dst", str(tmp_path / "o"), "--quiet"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_cremad_val_list_carves_a_validation_split_out_of_the_training_list(tmp_path: Path) -> None:
    """``val.csv`` (the Diagnosing & Re-learning repository's held-out list) moves its clips from ``train``
    to ``val``; without it CREMA-D has no validation split (the scan reads names only: empty files do)."""
    from harmonia.data.raw_layouts import scan_cremad

    ids = ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_TIE_SAD_XX", "1004_DFA_NEU_XX"]
    for folder, ext in (("VideoFlash", "flv"), ("AudioWAV", "wav")):
        (tmp_path / folder).mkdir()
        for clip_id in ids:
            (tmp_path / folder / f"{clip_id}.{ext}").touch()
    (tmp_path / "train.csv").write_text("".join(f"{i},x\n" for i in ids[:3]))
    (tmp_path / "test.csv").write_text(f"{ids[3]},x\n")
    splits = lambda: {c.id: c.split for c in scan_cremad(tmp_path).clips}  # noqa: E731
    assert splits() == {ids[0]: "train", ids[1]: "train", ids[2]: "train", ids[3]: "test"}
    (tmp_path / "val.csv").write_text(f"{ids[1]},x\n")
    assert splits() == {ids[0]: "train", ids[1]: "val", ids[2]: "train", ids[3]: "test"}


def _prepared_cremad(tmp_path: Path) -> Path:
    src, dst = tmp_path / "CREMA-D", tmp_path / "prepared"
    _cremad(src)
    (src / "train.csv").write_text("1001_DFA_ANG_XX,ANG\n1002_IEO_HAP_HI,HAP\n")
    (src / "test.csv").write_text("1003_TIE_SAD_XX,SAD\n")
    assert main(["prep", "cremad", "--src", str(src), "--dst", str(dst), "--workers", "1", "--quiet"]) == 0
    return dst


@pytest.mark.integration
def test_prepared_dataset_items_follow_the_recipe(tmp_path: Path) -> None:
    import torch

    from harmonia.data.prepared import PreparedAVDataset, collate

    dst = _prepared_cremad(tmp_path)
    train, test = PreparedAVDataset(dst, "train", seed=1), PreparedAVDataset(dst, "test")
    assert len(train) == 2 and len(test) == 1 and train.num_classes == 3  # classes seen in the scan
    item = train[0]
    assert item["inputs"]["audio"].shape == (1, 257, 299)
    assert item["inputs"]["visual"].shape == (1, 3, 224, 224)  # CREMA-D: one frame
    assert item["label"] == train.classes.index("ANG")
    torch.testing.assert_close(train[0]["inputs"]["visual"], item["inputs"]["visual"])  # (seed, epoch, i)
    train.set_epoch(1)
    assert not torch.equal(train[0]["inputs"]["visual"], item["inputs"]["visual"])  # a new draw
    torch.testing.assert_close(test[0]["inputs"]["visual"], test[0]["inputs"]["visual"])
    three = PreparedAVDataset(dst, "test", frames=3)
    assert three.frame_positions(3, __import__("random").Random(0)) == [0, 1, 2]
    assert three[0]["inputs"]["visual"].shape == (3, 3, 224, 224)
    batch = collate([train[0], train[1]])
    assert batch["inputs"]["visual"].shape == (2, 1, 3, 224, 224) and batch["indices"].tolist() == [0, 1]
    with pytest.raises(Exception, match="no clip in split"):
        PreparedAVDataset(dst, "val")


def test_global_batch_sampler_gives_the_batches_of_the_in_memory_loader() -> None:
    import torch

    from harmonia.data.loader import BatchLoader
    from harmonia.data.prepared import GlobalBatchSampler

    labels = torch.arange(23)
    memory = BatchLoader({"x": labels[:, None]}, labels, 8, shuffle=True, seed=5, rank=1, world_size=2)
    sampler = GlobalBatchSampler(23, 8, seed=5, rank=1, world_size=2)
    for epoch in (0, 3):
        memory.set_epoch(epoch)
        sampler.set_epoch(epoch)
        assert [b["indices"].tolist() for b in memory] == list(sampler)
