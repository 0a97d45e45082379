"""WebDataset-style shards for pre-training: `harmonia prep shards` on generated videos with transcripts
(resumable, idempotent, bad clips reported), the shard stream's split across ranks and workers, and a
pre-training run read from shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avfixtures import write_corrupt, write_video
from harmonia.app.cli import main
from harmonia.data.shards import ShardCorpus, ShardLoader, ShardStream, WordTokenizer, read_shard

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shards_pretrain.yaml"
WORDS = ("drums", "violin", "dog", "rain", "engine", "bird", "piano", "water")


def _videos(src: Path, n: int = 12) -> None:
    for i in range(n):
        folder = src / f"channel{i % 2}"
        write_video(folder / f"clip.{i}.mp4", seconds=2.0, fps=8, tone_hz=200.0 + 100 * (i % 8))
        lines = [f"a {WORDS[i % 8]} sound", "", f"someone plays the {WORDS[i % 8]} again"]
        (folder / f"clip.{i}.txt").write_text("\n".join(lines[: 1 + i % 3]) + "\n")
    write_video(src / "no_transcript.mp4", seconds=1.0)
    write_corrupt(src / "broken.mp4")
    (src / "broken.txt").write_text("never decoded\n")


def _prep(src: Path, dst: Path, *extra: str) -> list[str]:
    sizes = ["--frames", "4", "--frame-size", "16", "--seconds", "2", "--n-mels", "16", "--shard-size", "2"]
    return ["prep", "shards", "--src", str(src), "--dst", str(dst), "--quiet", *sizes, *extra]


@pytest.mark.integration
def test_prep_shards_writes_resumable_shards_and_reports_bad_clips(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, dst = tmp_path / "videos", tmp_path / "shards"
    _videos(src)
    assert main(_prep(src, dst, "--test-fraction", "0.25", "--workers", "2")) == 0
    index = json.loads((dst / "shards.json").read_text())
    samples = {s: e["samples"] for s, e in index["splits"].items()}
    assert sum(samples.values()) == 12 and samples["test"] > 0 and samples["train"] > samples["test"]
    failed = {f["id"]: f["reason"] for f in json.loads((dst / "prep_report.json").read_text())["failed"]}
    assert "missing transcript" in failed["no_transcript"] and "cannot open" in failed["broken"]
    assert {"a", "drums", "sound", "someone"} <= set(index["vocabulary"])
    assert index["vocabulary"][:2] == ["<pad>", "<unk>"]

    first = index["splits"]["train"]["shards"][0]
    sample = next(read_shard(dst / first))
    assert sample["video"].shape == (4, 16, 16, 3) and sample["video"].dtype == np.uint8
    assert sample["audio"].shape == (16, index["audio_frames"]) == (16, 101)  # 2 s, 20 ms hop
    assert "." not in sample["key"] and sample["text"] and all(line.strip() for line in sample["text"])

    capsys.readouterr()
    assert main(_prep(src, dst, "--test-fraction", "0.25")) == 0
    assert "wrote 0 shards" in capsys.readouterr().out  # idempotent
    before = (dst / first).read_bytes()
    (dst / first).unlink()  # as if killed while writing it
    assert main(_prep(src, dst, "--test-fraction", "0.25")) == 0
    assert "wrote 1 shards" in capsys.readouterr().out and (dst / first).read_bytes() == before
    assert main([*_prep(src, dst, "--test-fraction", "0.25"), "--frames", "2"]) == 2
    assert "other settings (frames: 4 -> 2)" in capsys.readouterr().err


@pytest.mark.integration
def test_word_tokenizer_pads_bags_and_marks_unknown_words() -> None:
    tokenize = WordTokenizer(["<pad>", "<unk>", "a", "dog"], captions=3, length=2)
    ids, mask = tokenize([["a dog barks"], ["Dog", "zebra a", "x", "y"]])
    assert ids.tolist() == [[[2, 3], [0, 0], [0, 0]], [[3, 0], [1, 2], [1, 0]]]
    torch.testing.assert_close(mask, ids != 0)


@pytest.mark.integration
def test_shard_stream_gives_disjoint_shards_to_ranks_and_workers_and_equal_steps(tmp_path: Path) -> None:
    src, dst = tmp_path / "videos", tmp_path / "shards"
    _videos(src, n=16)
    assert main(_prep(src, dst, "--test-fraction", "0.1", "--shard-size", "1", "--workers", "2")) == 0
    corpus = ShardCorpus(dst, captions=2, words=4)
    n_train = corpus.samples("train")
    streams = [ShardStream(corpus, 2, 3, seed=1, rank=r, world_size=2).stream_shards(s, 4) for r, s in
               ((0, 0), (0, 1), (1, 2), (1, 3))]  # fmt: skip
    taken = [shard for shards in streams for shard in shards]
    assert sorted(taken) == sorted(corpus.shards("train")) and len(taken) == n_train  # a partition

    keys = {}
    for rank in (0, 1):
        stream = ShardStream(corpus, 2, 3, seed=1, rank=rank, world_size=2, shuffle_buffer=2)
        loader = ShardLoader(stream, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        assert batches[0]["inputs"]["video"].shape == (2, 3, 4, 16, 16)
        assert batches[0]["inputs"]["text"].shape == (2, 2, 4)
        keys[rank] = {k for b in batches for k in b["keys"]}
        again = [b["keys"] for b in ShardLoader(stream, num_workers=2)]
        assert again == [b["keys"] for b in batches]  # (seed, epoch) decide the stream
        stream.set_epoch(1)
        assert [b["keys"] for b in ShardLoader(stream, num_workers=2)] != again
    assert not keys[0] & keys[1]  # ranks read disjoint shards
    with pytest.warns(UserWarning, match="samples repeat"):
        ShardLoader(ShardStream(corpus, 1, 1, world_size=n_train), num_workers=2)


@pytest.mark.integration
def test_pretraining_reads_shards_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, dst = tmp_path / "videos", tmp_path / "shards"
    _videos(src)
    assert main(_prep(src, dst, "--test-fraction", "0.25")) == 0
    overrides = [
        f"data.root={dst}", f"out_dir={tmp_path / 'runs'}", "data.num_workers=0", "train.epochs=2",
        "train.batch_size=4", "pretrain.width=16", "pretrain.depth=1", "pretrain.heads=2",
        "pretrain.embed_dim=8", "pretrain.tubelet=[2,8,8]", "pretrain.audio_patch=[8,20]",
        "harmonize.mode=feature",
    ]  # fmt: skip
    assert main(["train", str(CONFIG), "--quiet", *overrides]) == 0
    run = tmp_path / "runs" / "shards_pretrain"
    results = json.loads((run / "results.json").read_text())
    assert results["probe"] == {} and "video_to_text/R@1" in results["test"]  # on the 5 test clips
    train = json.loads((dst / "shards.json").read_text())["splits"]["train"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["global_step"] == 2 * (train["samples"] // 4)
    # the harmonizer's per-triplet export names shard samples: shard number x shard size + place in it
    names = {int(n.split("-")[1].split(".")[0]) * 2 + k for n in train["shards"] for k in (0, 1)}
    for epoch in (0, 1):
        conflicts = np.load(run / "conflicts" / f"epoch_{epoch:03d}.npz")
        index = conflicts["index"].tolist()
        assert len(index) == 4 == len(set(index)) and set(index) <= names
        assert not conflicts["noisy"].any()  # real data: no ground truth
    assert main(["train", str(CONFIG), "--quiet", *overrides[:1], "data.root=/nonexistent"]) == 2
    assert "harmonia prep shards" in capsys.readouterr().err


def test_caption_bags_of_different_sizes_are_padded_with_masked_candidates() -> None:
    from harmonia.models.pretrain import TriModalPretrainModel

    model = TriModalPretrainModel((4, 8), (8, 8), 40, 6, width=8, heads=2, embed_dim=4)
    ids, mask = model.tokenize_captions([["the digit one"], ["a two", "number 3", "digit", "dropped"]], k=3)
    assert ids.shape == mask.shape == (2, 3, 6)
    assert mask.any(-1).tolist() == [[True, False, False], [True, True, True]]
    assert (ids[0, 1:] == 0).all() and mask[0, 0].sum() == 3
