"""WebDataset-style shards for pre-training: `harmonia prep shards` on generated videos with transcripts
(resumable, idempotent, bad clips reported); reading through the webdataset library from a folder, brace
patterns and `pipe:` URLs; the shard stream's split across ranks and workers (disjoint keys, equal steps,
a shuffle that depends on (seed, epoch) only); the errors of damaged shards, failing commands and missing
metadata; and a pre-training run read from shards."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import harmonia.data.shards as shards_module
from avfixtures import write_corrupt, write_video
from harmonia.app.cli import main
from harmonia.app.config import load_config
from harmonia.data.shards import (
    ShardCorpus,
    ShardLoader,
    ShardSettings,
    ShardStream,
    TranscribedVideo,
    WordTokenizer,
    shard_samples,
    write_shard,
)
from harmonia.errors import ConfigError, InputError

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

    train = index["splits"]["train"]
    assert sum(train["sizes"]) == train["samples"] and len(train["sizes"]) == len(train["shards"])
    first = train["shards"][0]
    sample = next(shard_samples(str(dst / first)))
    assert sample["video"].shape == (4, 16, 16, 3) and sample["video"].dtype == np.uint8
    assert sample["audio"].shape == (16, index["audio_frames"]) == (16, 101)  # 2 s, 20 ms hop
    assert "." not in sample["key"] and sample["text"] and all(line.strip() for line in sample["text"])
    import webdataset as wds  # the library's own pipeline reads the shards prep wrote

    last = len(train["shards"]) - 1
    read = list(wds.WebDataset(f"pipe:cat {dst}/train-{{000000..{last:06d}}}.tar", shardshuffle=False))
    assert len(read) == train["samples"] and set(read[0]) >= {"__key__", "video.npy", "audio.npy", "txt"}

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
        f"data.shards={dst}", f"out_dir={tmp_path / 'runs'}", "data.num_workers=0", "train.epochs=2",
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
    assert main(["train", str(CONFIG), "--quiet", *overrides[:1], "data.shards=/nonexistent"]) == 2
    assert "harmonia prep shards" in capsys.readouterr().err


def test_caption_bags_of_different_sizes_are_padded_with_masked_candidates() -> None:
    from harmonia.models.pretrain import TriModalPretrainModel

    model = TriModalPretrainModel((4, 8), (8, 8), 40, 6, width=8, heads=2, embed_dim=4)
    ids, mask = model.tokenize_captions([["the digit one"], ["a two", "number 3", "digit", "dropped"]], k=3)
    assert ids.shape == mask.shape == (2, 3, 6)
    assert mask.any(-1).tolist() == [[True, False, False], [True, True, True]]
    assert (ids[0, 1:] == 0).all() and mask[0, 0].sum() == 3


# --------------------------------------------------------------------------------------------------
# reading through webdataset, on shards written by write_shard with a stand-in for video decoding

SETTINGS = ShardSettings(frames=2, frame_size=4, seconds=0.1, n_mels=4, shard_size=3)


def _clip_sample(number: int) -> dict:
    """What clip ``number`` holds: arrays filled with its number, and two caption lines."""
    return {
        "video": np.full((2, 4, 4, 3), number, np.uint8),
        "audio": np.full((4, SETTINGS.audio_frames), number / 8, np.float16),
        "text": [f"a clip {number}", f"number {number}"],
    }


def _write(dst: Path, monkeypatch: pytest.MonkeyPatch, train: int = 8, test: int = 1) -> None:
    """``train`` training shards and ``test`` test shards of 3 clips (numbered 0, 1, ... in shard order),
    written by write_shard, and their shards.json."""
    monkeypatch.setattr(shards_module, "encode_clip", lambda clip, _: _clip_sample(int(clip.key[4:])))
    dst.mkdir()
    splits, number = {}, 0
    for split, count in (("train", train), ("test", test)):
        splits[split] = {"shards": [], "sizes": [], "samples": 0}
        for s in range(count):
            clips = [TranscribedVideo(f"clip{number + k:03d}", Path(), Path(), split) for k in range(3)]
            write_shard(dst / f"{split}-{s:06d}.tar", clips, SETTINGS)
            splits[split]["shards"].append(f"{split}-{s:06d}.tar")
            splits[split]["sizes"].append(3)
            splits[split]["samples"] += 3
            number += 3
    index = {
        "format": 1,
        "settings": asdict(SETTINGS),
        "audio_frames": SETTINGS.audio_frames,
        "splits": splits,
        "vocabulary": ["<pad>", "<unk>", "a", "clip", "number"],
    }
    (dst / "shards.json").write_text(json.dumps(index))


def _keys(corpus: ShardCorpus, split: str = "train") -> list[str]:
    return [s["key"] for shard in corpus.shards(split) for s in shard_samples(shard)]


def test_webdataset_reads_our_shards_from_a_folder_brace_patterns_and_pipe_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "shards"
    _write(dst, monkeypatch, train=4)
    expected = [f"clip{n:03d}" for n in range(12)]
    folder = ShardCorpus(dst)
    pattern = ShardCorpus(f"{dst}/train-{{000000..000003}}.tar")  # shards.json found beside them
    piped = ShardCorpus(
        [f"pipe:cat {dst}/train-{{000000..000001}}.tar", f"pipe:cat {dst}/train-00000{{2,3}}.tar"],
        meta=f"pipe:cat {dst}/shards.json",
        test_shards=f"pipe:cat {dst}/test-000000.tar",
    )
    assert piped.shards("train")[3] == f"pipe:cat {dst}/train-000003.tar"
    for corpus in (folder, pattern, piped):
        assert corpus.samples("train") == 12 and _keys(corpus) == expected
        assert (corpus.frames, corpus.frame_size, corpus.n_mels) == (2, 4, 4)
        test = corpus.split("test")
        assert len(test) == 3 and test.captions[0] == ["a clip 12", "number 12"]
        assert test.inputs["text"][0, 0, :2].tolist() == [2, 3]  # "a clip" in the vocabulary; "12" unknown
    sample = list(shard_samples(piped.shards("train")[1]))[2]  # clip 5
    assert sample["key"] == "clip005" and sample["text"] == ["a clip 5", "number 5"]
    assert sample["video"].dtype == np.uint8 and (sample["video"] == 5).all()
    assert sample["audio"].shape == (4, 6) and (sample["audio"] == np.float16(5 / 8)).all()
    # a command still writing after the tar's last member (here 1 MiB of padding) is read to its end: closed
    # early, it would die of SIGPIPE, an error
    padded = tmp_path / "padded.tar"
    padded.write_bytes((dst / "train-000001.tar").read_bytes() + bytes(2**20))
    assert [s["key"] for s in shard_samples(f"pipe:exec cat {padded}")] == expected[3:6]
    subset = ShardCorpus(f"{dst}/train-{{000001..000002}}.tar")  # sample counts by shard name
    assert subset.samples("train") == 6 and _keys(subset) == expected[3:9]


def _stream_keys(stream: ShardStream, workers: int) -> dict[int, list[list[str]]]:
    return {w: [b["keys"] for b in stream.batches(w, workers)] for w in range(workers)}


def test_ranks_and_workers_read_disjoint_keys_and_every_rank_takes_the_same_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "shards"
    _write(dst, monkeypatch, train=8)
    corpus = ShardCorpus(dst)
    world, workers, local_batch = 2, 2, 2
    steps = corpus.samples("train") // (world * local_batch)  # 24 clips, global batch 4: 6 steps
    streams = {}
    for rank in range(world):
        stream = ShardStream(
            corpus, local_batch, steps, seed=3, rank=rank, world_size=world, shuffle_buffer=4
        )
        by_worker = _stream_keys(stream, workers)
        assert sum(len(b) for b in by_worker.values()) == steps  # every rank: the same steps
        for w, batches in by_worker.items():
            streams[rank * workers + w] = [k for batch in batches for k in batch]
        # a real DataLoader with 2 workers takes the workers' batches in turn
        loaded = [b["keys"] for b in ShardLoader(stream, num_workers=workers)]
        assert loaded == [by_worker[i % workers][i // workers] for i in range(steps)]
        batch = next(stream.batches())
        assert batch["indices"].tolist() == [int(k[4:]) for k in batch["keys"]]  # shard x 3 + place
        assert batch["inputs"]["video"].shape == (2, 3, 2, 4, 4)
    # 8 shards of 3 clips for 4 streams: each stream reads 2 whole shards; every clip is read once
    assert sorted(k for keys in streams.values() for k in keys) == [f"clip{n:03d}" for n in range(24)]
    for stream_keys in streams.values():
        assert len({int(k[4:]) // 3 for k in stream_keys}) == 2  # two shards, none shared

    uneven = ShardCorpus(f"{dst}/train-{{000000..000004}}.tar")  # 5 shards, 15 clips: 3 steps
    taken: list[set[str]] = []
    for rank in range(world):
        stream = ShardStream(uneven, local_batch, 3, seed=3, rank=rank, world_size=world)
        by_worker = _stream_keys(stream, workers)
        assert [len(by_worker[w]) for w in range(workers)] == [2, 1]
        taken += [{k for batch in by_worker[w] for k in batch} for w in range(workers)]
    assert all(not a & b for i, a in enumerate(taken) for b in taken[i + 1 :])


def test_the_shuffle_depends_on_seed_and_epoch_only_and_a_resumed_epoch_reads_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "shards"
    _write(dst, monkeypatch, train=4)
    corpus = ShardCorpus(f"pipe:cat {dst}/train-{{000000..000003}}.tar", meta=str(dst / "shards.json"))

    def epoch_keys(epoch: int, buffer: int = 6, seed: int = 0) -> list[str]:
        stream = ShardStream(corpus, 2, 6, seed=seed, shuffle_buffer=buffer)  # one stream: all 12 clips
        stream.set_epoch(epoch)
        return [k for batch in stream.batches() for k in batch["keys"]]

    first = epoch_keys(0)
    assert sorted(first) == [f"clip{n:03d}" for n in range(12)]
    assert epoch_keys(0) == first and epoch_keys(1) != first and epoch_keys(0, seed=1) != first
    running = ShardStream(corpus, 2, 6, shuffle_buffer=6)
    for epoch in (0, 1):  # a run that went through epoch 0, and one resumed at epoch 1
        running.set_epoch(epoch)
        assert [k for b in running.batches() for k in b["keys"]] == epoch_keys(epoch)
    # a buffer of 1 keeps each shard's clips together and in order; a larger one mixes shards

    def in_shard_runs(keys: list[str]) -> bool:
        runs = [[int(k[4:]) for k in keys[i : i + 3]] for i in range(0, len(keys), 3)]
        return all(run[0] % 3 == 0 and run == list(range(run[0], run[0] + 3)) for run in runs)

    assert in_shard_runs(epoch_keys(0, buffer=1)) and not in_shard_runs(first)


def test_damaged_shards_failing_commands_and_missing_metadata_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "shards"
    _write(dst, monkeypatch, train=2)
    whole = (dst / "train-000001.tar").read_bytes()
    (dst / "train-000001.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"train-000001\.tar cannot be read .*rerun harmonia prep shards"):
        list(shard_samples(str(dst / "train-000001.tar")))
    lost = [TranscribedVideo(f"clip{n:03d}", Path(), Path(), "train") for n in (3, 4)]
    write_shard(dst / "train-000001.tar", lost, SETTINGS)  # cut at a sample boundary: a shorter tar
    with pytest.raises(InputError, match=r"^shard .*train-000001\.tar holds 2 samples where .*json lists 3"):
        list(ShardLoader(ShardStream(ShardCorpus(dst), 2, 3), num_workers=1))  # raised in a worker
    failing = r"pipe:cat /nowhere/train-000000\.tar cannot be read \(the command exited with status 1\)"
    with pytest.raises(InputError, match=failing + r"; run `cat /nowhere/train-000000\.tar` in a shell"):
        list(shard_samples("pipe:cat /nowhere/train-000000.tar"))
    piped = f"pipe:cat {dst}/train-000000.tar"
    with pytest.raises(InputError, match=r"set data\.shards_meta to its path or URL"):
        ShardCorpus(piped)
    with pytest.raises(InputError, match=r"set data\.test_shards"):
        ShardCorpus(piped, meta=f"pipe:cat {dst}/shards.json")
    with pytest.raises(InputError, match=r"train-000007\.tar is not a training shard of .*shards\.json"):
        ShardCorpus(f"pipe:cat {dst}/train-000007.tar", meta=str(dst / "shards.json"))
    with pytest.raises(InputError, match=r"train-000000\.tar is named twice"):
        ShardCorpus([f"{dst}/train-000000.tar", piped], meta=str(dst / "shards.json"))
    with pytest.raises(InputError, match=r"shard .*train-000005\.tar not found \(1 of 2 missing\)"):
        ShardCorpus(f"{dst}/train-00000{{0,5}}.tar")
    with pytest.raises(
        InputError, match=r"shards\.json not found: write the shards with harmonia prep shards"
    ):
        ShardCorpus(tmp_path / "elsewhere")
    index = json.loads((dst / "shards.json").read_text())
    del index["splits"]["train"]["sizes"]  # as an older harmonia wrote it: all shards are needed
    (dst / "shards.json").write_text(json.dumps(index))
    assert ShardCorpus(f"{dst}/train-00000{{0,1}}.tar").samples("train") == 6
    with pytest.raises(InputError, match=r"rerun harmonia prep shards with the same --src and --dst"):
        ShardCorpus(f"{dst}/train-000000.tar")


def test_the_config_names_shards_with_data_shards() -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "shards_pretrain.yaml"
    cfg = load_config(config, ["data.shards=pipe:curl -s -L https://host/train-{000000..000009}.tar"])
    assert cfg.data.shards == "pipe:curl -s -L https://host/train-{000000..000009}.tar"
    cfg = load_config(config, ["data.shards=['/x/train-{000000..000003}.tar', /y/train-000009.tar]"])
    assert cfg.data.shards == ["/x/train-{000000..000003}.tar", "/y/train-000009.tar"]
    for override, error in [
        ("data.shards=null", r"data\.shards: data\.name=shards reads the shards .* set data\.shards=DIR"),
        ("data.root=/x", r"data\.root: data\.name=shards reads data\.shards; set data\.shards=/x"),
        ("data.shards=[]", r"data\.shards: expected a string or a non-empty list of strings, got \[\]"),
    ]:
        with pytest.raises(ConfigError, match=error):
            load_config(config, [override])
    with pytest.raises(ConfigError, match=r"data\.test_shards applies to data\.name=shards, not avdigits"):
        load_config(config.parent / "avdigits_concat.yaml", ["data.test_shards=x"])
