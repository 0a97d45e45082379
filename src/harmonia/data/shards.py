"""Pre-training data at scale: WebDataset-style tar shards of (video, audio, text), and a stream reading them.

Writing (``harmonia prep shards --src VIDEOS --dst SHARDS``): every video under ``--src`` (``.mp4``, ``.mkv``,
``.webm``, ``.avi``, ``.flv``, ``.mov``, in sub-folders too) with a transcript beside it (same name, ``.txt``;
each non-empty line is one caption candidate, as HowTo100M's ASR segments) becomes one sample:

* ``<key>.video.npy``: uint8 [T, S, S, 3], T frames evenly spaced over the first ``seconds`` of the clip,
  center-cropped and resized to S × S;
* ``<key>.audio.npy``: float16 [n_mels, frames], the z-normalized log-mel spectrogram of the first
  ``seconds`` at 16 kHz (zero-padded when the clip is shorter);
* ``<key>.txt``: the transcript lines.

A fixed share of the clips (by a hash of the key, so stable across reruns) goes to the ``test`` split. Each
split's clips, sorted by key, fill shards of ``shard_size`` samples (``train-000000.tar``, ...). A shard is
written under a temporary name and renamed when complete, so a rerun writes only missing shards and a killed
run loses at most the shards in flight; a rerun also checks each existing shard against the size and SHA-256
its sidecar ``.json`` recorded, and rewrites one that was truncated or altered since; a clip that cannot
be decoded is skipped and listed in ``prep_report.json``. ``shards.json`` describes the set: shapes, the
shards of each split with their sample counts, and the word vocabulary of the training transcripts (for the
native text encoder).

Reading goes through the `webdataset <https://github.com/webdataset/webdataset>`_ library, which opens each
shard (a local path, or a ``pipe:`` command writing the tar to its standard output: ``pipe:aws s3 cp
s3://bucket/train-000000.tar -``) and groups the tar's members into samples; brace patterns
(``train-{000000..000099}.tar``) are expanded by ``braceexpand``, as webdataset does (:class:`ShardCorpus`).
``shards.json`` is matched to the shards by file name, for the sample counts that fix the steps per epoch.

Training (:class:`ShardStream`): each epoch draws an order of the shards from (seed, epoch); the
``world_size × num_workers`` reading streams take disjoint sets of shards, shuffle samples through a buffer
(seeded by seed, epoch and stream) and each yields its share of the epoch's ``samples // global batch`` steps,
so every rank gets the same number of batches. When there are fewer shards than streams, streams share shards
and samples repeat within an epoch (a warning says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harmonia.data.avdigits import file_sha256
from harmonia.data.media import MediaError, read_audio, read_frames
from harmonia.data.prep import failure_reason, make_output_folder, refuse_other_settings
from harmonia.data.workers import init_bound_worker
from harmonia.errors import InputError
from harmonia.extras import progress_bar, require

SHARD_FORMAT = 1
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov")
PAD, UNKNOWN = "<pad>", "<unk>"


@dataclass
class ShardSettings:
    """What each sample holds and how the samples are grouped (``harmonia prep shards`` flags)."""

    frames: int = 8
    frame_size: int = 32
    seconds: float = 4.0
    sample_rate: int = 16000
    n_mels: int = 32
    hop_seconds: float = 0.02
    shard_size: int = 1000
    test_fraction: float = 0.05
    max_vocabulary: int = 30000

    @property
    def audio_frames(self) -> int:
        """Spectrogram frames of a ``seconds`` clip (centered STFT: one frame per hop, plus one)."""
        hop = int(round(self.hop_seconds * self.sample_rate))
        return 1 + int(round(self.seconds * self.sample_rate)) // hop


@dataclass
class TranscribedVideo:
    key: str
    video: Path
    transcript: Path
    split: str


@dataclass
class ShardReport:
    written: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> what was wrong (it was rewritten)
    samples: dict[str, int] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        total = sum(self.samples.values())
        return (
            f"wrote {len(self.written)} shards, {len(self.already_done)} already done; {total} samples "
            f"({', '.join(f'{s}: {n}' for s, n in sorted(self.samples.items()))}), {len(self.failed)} skipped"
            + (" (see prep_report.json)" if self.failed else "")
            + "".join(f"\n  rewrote {name}: {why}" for name, why in sorted(self.damaged.items()))
        )


# --------------------------------------------------------------------------------------------------
# writing


def _split_of(key: str, test_fraction: float) -> str:
    digest = hashlib.sha1(key.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") / 2**32 < test_fraction else "train"


def scan_transcribed_videos(
    src: str | Path, test_fraction: float
) -> tuple[list[TranscribedVideo], list[dict[str, str]]]:
    """Videos under ``src`` with their ``.txt`` transcripts (a video without one is reported, not used)."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"--src {src} is not a folder")
    clips, problems = [], []
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        relative = path.relative_to(src).with_suffix("")
        key = "_".join(relative.parts).replace(".", "_")
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            problems.append({"id": key, "file": str(path), "reason": f"missing transcript {transcript.name}"})
            continue
        clips.append(TranscribedVideo(key, path, transcript, _split_of(key, test_fraction)))
    if not clips and not problems:
        raise InputError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {src} (see docs/pretraining.md)")
    return clips, problems


def encode_clip(clip: TranscribedVideo, settings: ShardSettings) -> dict[str, Any]:
    """One sample's arrays and transcript lines. Raises :class:`MediaError` for undecodable media."""
    from PIL import Image

    from harmonia.data.audio_features import log_mel_spectrogram

    lines = [line.strip() for line in clip.transcript.read_text(errors="replace").splitlines()]
    if not any(lines):
        raise MediaError(f"transcript {clip.transcript.name} is empty")
    decoded = read_frames(clip.video, fps=settings.frames / settings.seconds, max_frames=settings.frames)
    picks = np.linspace(0, len(decoded) - 1, settings.frames).round().astype(int)  # repeat a short clip's
    size = settings.frame_size
    frames = []
    for frame in decoded[picks]:
        image = Image.fromarray(frame)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
        frames.append(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box)))
    wave = read_audio(clip.video, settings.sample_rate)[: int(round(settings.seconds * settings.sample_rate))]
    padded = np.zeros(int(round(settings.seconds * settings.sample_rate)), np.float32)
    padded[: len(wave)] = wave
    spectrogram = log_mel_spectrogram(
        torch.from_numpy(padded)[None],
        settings.sample_rate,
        n_mels=settings.n_mels,
        hop_seconds=settings.hop_seconds,
    )[0]
    return {
        "video": np.stack(frames).astype(np.uint8),
        "audio": spectrogram.numpy().astype(np.float16),
        "text": [line for line in lines if line],
    }


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_shard(
    path: Path, clips: Sequence[TranscribedVideo], settings: ShardSettings
) -> tuple[int, list[dict[str, str]], dict[str, int]]:
    """Write one shard atomically; returns (samples written, clips skipped, word counts)."""
    failed, words, samples = [], Counter[str](), 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for clip in clips:
            try:
                sample = encode_clip(clip, settings)
            except Exception as exc:
                failed.append({"id": clip.key, "file": str(clip.video), "reason": failure_reason(exc)})
                continue
            _add(tar, f"{clip.key}.video.npy", _npy(sample["video"]))
            _add(tar, f"{clip.key}.audio.npy", _npy(sample["audio"]))
            _add(tar, f"{clip.key}.txt", "\n".join(sample["text"]).encode())
            words.update(w for line in sample["text"] for w in line.lower().split())
            samples += 1
    sidecar = {
        "samples": samples,
        "failed": failed,
        "words": dict(words),
        "bytes": tmp.stat().st_size,
        "sha256": file_sha256(tmp),
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    os.replace(tmp, path)  # the completion marker: written last
    return samples, failed, dict(words)


def shard_problem(path: Path) -> str | None:
    """Why the shard at ``path`` cannot be trusted (missing, no sidecar, other size or checksum), or None."""
    if not path.is_file():
        return "missing"
    try:
        sidecar = json.loads(path.with_suffix(".json").read_text())
        expected = (int(sidecar["bytes"]), str(sidecar["sha256"]))
    except (OSError, ValueError, TypeError, KeyError):
        return "its sidecar .json with size and checksum is missing or damaged"
    size = path.stat().st_size
    if size != expected[0]:
        return f"{size} bytes where {expected[0]} were written (truncated or appended to)"
    if file_sha256(path) != expected[1]:
        return "its SHA-256 differs from the one recorded when it was written"
    return None


def _write_shard_job(path: str, clips: list[TranscribedVideo], settings: ShardSettings) -> str:
    write_shard(Path(path), clips, settings)
    return path


def write_shards(
    src: str | Path,
    dst: str | Path,
    settings: ShardSettings | None = None,
    workers: int = 1,
    progress: bool = True,
) -> ShardReport:
    """Write the shards of every transcribed video under ``src`` that are not yet written, then
    ``shards.json`` and ``prep_report.json`` (see the module docstring)."""
    settings = settings or ShardSettings()
    dst = make_output_folder(dst)
    refuse_other_settings(
        dst / "shards.json", asdict(settings), "harmonia prep shards", any(dst.glob("*.tar"))
    )
    clips, problems = scan_transcribed_videos(src, settings.test_fraction)
    report = ShardReport(failed=list(problems))
    jobs: dict[str, list[TranscribedVideo]] = {}
    for split in ("train", "test"):
        members = sorted((c for c in clips if c.split == split), key=lambda c: c.key)
        for n, start in enumerate(range(0, len(members), settings.shard_size)):
            jobs[f"{split}-{n:06d}.tar"] = members[start : start + settings.shard_size]
    todo = {}
    for name, group in jobs.items():
        problem = shard_problem(dst / name)
        if problem is None:
            report.already_done.append(name)
            continue
        todo[name] = group
        if problem != "missing":
            report.damaged[name] = problem
    report.already_done.sort()
    bar = progress_bar(total=len(todo), desc="prep shards", disable=not progress, unit="shard")
    parallel = workers > 1 and len(todo) > 1
    pool_context = (
        ProcessPoolExecutor(workers, initializer=init_bound_worker, initargs=(os.getpid(),))
        if parallel
        else None
    )
    with pool_context or contextlib.nullcontext() as pool:
        if pool is None:
            done: Any = (_write_shard_job(str(dst / n), g, settings) for n, g in todo.items())
        else:
            futures = [pool.submit(_write_shard_job, str(dst / n), g, settings) for n, g in todo.items()]
            done = (f.result() for f in as_completed(futures))
        for path in done:
            report.written.append(Path(path).name)
            bar.update()
    bar.close()
    report.written.sort()
    splits: dict[str, dict[str, Any]] = {}
    words: Counter[str] = Counter()
    for name in sorted(jobs):
        sidecar = json.loads((dst / name).with_suffix(".json").read_text())
        split = name.split("-")[0]
        entry = splits.setdefault(split, {"shards": [], "sizes": [], "samples": 0})
        if sidecar["samples"]:
            entry["shards"].append(name)
            entry["sizes"].append(sidecar["samples"])
            entry["samples"] += sidecar["samples"]
        report.failed += sidecar["failed"]
        if split == "train":
            words.update(sidecar["words"])
    report.samples = {s: e["samples"] for s, e in splits.items()}
    vocabulary = [PAD, UNKNOWN, *sorted(w for w, _ in words.most_common(settings.max_vocabulary))]
    index = {
        "format": SHARD_FORMAT,
        "settings": asdict(settings),
        "audio_frames": settings.audio_frames,
        "splits": splits,
        "vocabulary": vocabulary,
    }
    tmp = dst / ".shards.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, dst / "shards.json")
    (dst / "prep_report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


# --------------------------------------------------------------------------------------------------
# reading: URLs are opened and tars read by the webdataset library

_TAR_NAME = re.compile(r"([^/\s'\"]+\.tar)(?=$|[\s'\"?#])")
_SHARD_NUMBER = re.compile(r"-(\d+)\.tar$")
_MEMBERS = ("video.npy", "audio.npy", "txt")


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """The shards a path, URL or brace pattern (or a list of them) names, in order, each pattern expanded
    by ``braceexpand`` as webdataset does: ``/x/train-{000000..000002}.tar`` names three tars, and
    ``pipe:cat /x/train-{0..1}.tar`` two ``pipe:`` URLs."""
    braceexpand = require("braceexpand", "reading shards").braceexpand
    entries = [shards] if isinstance(shards, str) else list(shards)
    return [str(url) for entry in entries for url in braceexpand(str(entry))]


def is_local(url: str) -> bool:
    """Whether ``url`` is a plain local path (webdataset opens any other through its scheme)."""
    return urlparse(url).scheme == ""


def shard_name(url: str) -> str | None:
    """The file name of the tar a path or URL reads, or None: ``pipe:aws s3 cp s3://b/train-000001.tar -``
    → ``train-000001.tar``."""
    names = _TAR_NAME.findall(url)
    return str(names[-1]) if names else None


def _open(url: str, what: str) -> Any:
    try:
        return require("webdataset.gopen", "reading shards").gopen(url, "rb")
    except Exception as exc:
        raise _unreadable(url, exc, None, what) from exc


def _unreadable(url: str, exc: BaseException, stream: Any, what: str) -> InputError:
    """The error of a ``what`` ("shard", or a file's name) that could not be read; closes its stream (and
    waits for a pipe's command, whose exit status tells more than the empty tar it wrote)."""
    with contextlib.suppress(Exception):
        if stream is not None:
            stream.close()
    status = getattr(getattr(stream, "proc", None), "returncode", None)
    if status not in (None, 0):
        reason = f"the command exited with status {status}"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:  # webdataset appends the stream and URL to the arguments of the errors it passes on
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
    if url.startswith("pipe:"):
        fix = f"run `{url.removeprefix('pipe:')}` in a shell to see why"
    elif what == "shard":
        fix = "rerun harmonia prep shards with the same --src and --dst: it rewrites a damaged shard"
    else:
        fix = "check the path"
    return InputError(f"{what} {url} cannot be read ({reason}); {fix}")


def _decoded(raw: dict[str, Any]) -> dict[str, Any]:
    missing = [member for member in _MEMBERS if member not in raw]
    if missing:
        raise ValueError(f"sample {raw['__key__']} has no {', '.join(missing)}")
    return {
        "key": raw["__key__"],
        "video": np.load(io.BytesIO(raw["video.npy"]), allow_pickle=False),
        "audio": np.load(io.BytesIO(raw["audio.npy"]), allow_pickle=False),
        "text": [line for line in raw["txt"].decode().splitlines() if line.strip()],
    }


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order: ``{"key", "video", "audio", "text"}``.

    ``url`` is whatever webdataset opens (``webdataset.gopen``): a local path, or a ``pipe:`` command that
    writes the tar to its standard output; webdataset reads the tar and groups its members into samples by
    key. A shard that cannot be opened or read, or a ``pipe:`` command that fails, raises
    :class:`~harmonia.errors.InputError` naming the shard.
    """
    tariterators = require("webdataset.tariterators", "reading shards")
    stream = _open(url, "shard")
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for raw in tariterators.group_by_keys(files):
            yield _decoded(raw)
        while stream.read(1 << 16):  # the end-of-archive padding, so that a pipe's command ends normally
            pass
        stream.close()  # a pipe's exit status is checked here
    except GeneratorExit:  # the reader stopped early
        with contextlib.suppress(Exception):
            stream.close()
        raise
    except Exception as exc:
        raise _unreadable(url, exc, stream, "shard") from exc


def read_url(url: str, what: str = "file") -> bytes:
    """The bytes of a small file (``shards.json``) at a local path or a ``pipe:`` URL, through webdataset;
    ``what`` names it in errors."""
    stream = _open(url, what)
    try:
        data = stream.read()
        stream.close()
    except Exception as exc:
        raise _unreadable(url, exc, stream, what) from exc
    return bytes(data)


class WordTokenizer:
    """Caption bags → word ids [N, K, L] (0: padding, 1: unknown word) and the mask of real words."""

    def __init__(self, vocabulary: Sequence[str], captions: int, length: int) -> None:
        self.ids = {w: i for i, w in enumerate(vocabulary)}
        self.captions, self.length = captions, length

    def __call__(self, bags: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        ids = torch.zeros(len(bags), self.captions, self.length, dtype=torch.long)
        unknown = self.ids[UNKNOWN]
        for i, bag in enumerate(bags):
            for k, caption in enumerate(list(bag)[: self.captions]):
                words = caption.lower().split()[: self.length]
                if words:
                    ids[i, k, : len(words)] = torch.tensor([self.ids.get(w, unknown) for w in words])
        return ids, ids != 0


def sample_inputs(samples: Sequence[dict[str, Any]], tokenize: WordTokenizer) -> dict[str, Tensor]:
    """Model inputs of a list of samples: video [N, 3, T, S, S] scaled to about zero mean and unit
    variance, audio [N, 1, n_mels, frames], text ids and mask [N, K, L]."""
    video = torch.from_numpy(np.stack([s["video"] for s in samples])).permute(0, 4, 1, 2, 3)
    audio = torch.from_numpy(np.stack([s["audio"] for s in samples]).astype(np.float32))[:, None]
    text, mask = tokenize([s["text"] for s in samples])
    return {"video": (video.float() / 255 - 0.45) / 0.225, "audio": audio, "text": text, "text_mask": mask}


@dataclass
class ShardSplit:
    """A split of shards held in memory (evaluation): model inputs and the caption bags."""

    inputs: dict[str, Tensor]
    captions: list[list[str]]

    def __len__(self) -> int:
        return int(self.inputs["video"].shape[0])


class ShardCorpus:
    """Shards written by ``harmonia prep shards`` and their ``shards.json`` (shapes, each shard's sample
    count, vocabulary).

    Args:
        shards: the training shards: the folder ``harmonia prep shards`` wrote (its ``shards.json`` lists
            them), or .tar paths, brace patterns and ``pipe:`` URLs, one string or a list
            (:func:`expand_shards`). Shards are matched to ``shards.json`` by file name.
        captions: caption candidates kept per clip (the MIL-NCE bag).
        words: words kept per caption.
        meta: the ``shards.json`` (path or ``pipe:`` URL); by default the folder's, or the one beside local
            .tar shards. ``pipe:`` URLs need it.
        test_shards: the test split (same forms as ``shards``); by default the test shards ``shards.json``
            lists, beside it.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str],
        captions: int = 4,
        words: int = 16,
        meta: str | None = None,
        test_shards: str | Sequence[str] | None = None,
    ) -> None:
        entries = [str(shards)] if isinstance(shards, (str, Path)) else [str(s) for s in shards]
        if not entries:
            raise InputError("no shards given: name the folder harmonia prep shards wrote, or its shards")
        folder = Path(entries[0]) if len(entries) == 1 and _names_a_folder(entries[0]) else None
        urls: list[str] | None = None
        if folder is not None:
            if not (folder / "shards.json").is_file():
                raise InputError(
                    f"{folder / 'shards.json'} not found: write the shards with harmonia prep shards --dst "
                    f"{folder}"
                )
            meta = meta or str(folder / "shards.json")
        else:
            urls = expand_shards(entries)
            absent = [url for url in urls if is_local(url) and not Path(url).is_file()]
            if absent:
                raise InputError(
                    f"shard {absent[0]} not found ({len(absent)} of {len(urls)} missing); check the paths, "
                    f"or write the shards with harmonia prep shards"
                )
            meta = meta or _meta_beside(urls)
        self.meta, self.source = meta, str(folder or meta)
        self.index = self._read_index(meta)
        settings = self.index["settings"]
        self.frames, self.frame_size = int(settings["frames"]), int(settings["frame_size"])
        self.n_mels, self.audio_frames = int(settings["n_mels"]), int(self.index["audio_frames"])
        self.vocabulary: list[str] = list(self.index["vocabulary"])
        self.tokenize = WordTokenizer(self.vocabulary, captions, words)
        self.captions, self.words = captions, words
        self.modalities = ("video", "audio", "text")
        self.shard_size = int(settings["shard_size"])
        self._loaded: dict[str, ShardSplit] = {}
        beside = Path(meta).parent if is_local(meta) else None
        listed = {split: self.index["splits"].get(split, {}) for split in ("train", "test")}
        for split in ("train", "test") if test_shards is None else ("train",):
            if not listed[split].get("samples"):
                raise InputError(
                    f"{self.source} has no {split} samples; write more clips (or raise --test-fraction) with "
                    f"harmonia prep shards"
                )
        if urls is None:
            assert beside is not None
            urls = [str(beside / name) for name in listed["train"]["shards"]]
        self._sizes = self._sizes_of(urls, listed["train"])
        sizes = list(self._sizes.values())
        self._samples = int(listed["train"]["samples"]) if None in sizes else sum(s or 0 for s in sizes)
        self._shards = {"train": urls, "test": self._test_shards(test_shards, beside, listed["test"])}
        self._first = {url: self._first_index(url) for url in urls}

    @staticmethod
    def _read_index(meta: str) -> dict[str, Any]:
        if is_local(meta) and not Path(meta).is_file():
            raise InputError(
                f"{meta} not found: it is the shards.json harmonia prep shards wrote beside the shards; "
                f"set data.shards_meta to its path or URL"
            )
        try:
            index = json.loads(read_url(meta, "shards.json"))
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{meta} is damaged ({exc}); run harmonia prep shards again to rewrite it"
            ) from exc
        if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise InputError(f"{meta} has format {found}; this harmonia reads {SHARD_FORMAT}")
        return index

    def _sizes_of(self, urls: list[str], listed: dict[str, Any]) -> dict[str, int | None]:
        """The samples of each training shard in ``urls``, as ``shards.json`` lists them by file name
        (None: it lists only the total of all its shards, which ``urls`` are)."""
        names = [shard_name(url) for url in urls]
        known = list(listed.get("shards", []))
        for url, name in zip(urls, names, strict=True):
            if name not in known:
                raise InputError(
                    f"shard {url} is not a training shard of {self.meta} (it lists "
                    f"{', '.join(known[:3])}{', ...' if len(known) > 3 else ''}): each shard's sample count "
                    f"is found there by file name; keep the names harmonia prep shards wrote, or point "
                    f"data.shards_meta at the shards' own shards.json"
                )
        if len(set(names)) < len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise InputError(f"shard {twice} is named twice in the shards given; name each shard once")
        if "sizes" in listed:
            size = dict(zip(known, listed["sizes"], strict=True))
            return {url: int(size[name]) for url, name in zip(urls, names, strict=True)}
        if set(names) == set(known):
            return dict.fromkeys(urls)
        raise InputError(
            f"{self.meta} gives the sample count of all its training shards, not of each (an older "
            f"harmonia wrote it): rerun harmonia prep shards with the same --src and --dst to rewrite it, or "
            f"read all the training shards"
        )

    def _test_shards(
        self, test_shards: str | Sequence[str] | None, beside: Path | None, listed: dict[str, Any]
    ) -> list[str]:
        if test_shards is not None:
            urls = expand_shards(test_shards)
            if not urls:
                raise InputError("no test shards given: name the test-*.tar shards of harmonia prep shards")
            return urls
        if beside is None:
            raise InputError(
                f"the test shards cannot be found beside {self.meta} (a URL): set data.test_shards to them, "
                f"e.g. 'pipe:aws s3 cp s3://bucket/test-{{000000..000001}}.tar -'"
            )
        return [str(beside / name) for name in listed["shards"]]

    def _first_index(self, url: str) -> int:
        """The ``index`` of a shard's first sample: shard number × shard size (its place in the list
        when its name carries no number)."""
        found = _SHARD_NUMBER.search(shard_name(url) or "")
        number = int(found.group(1)) if found else self._shards["train"].index(url)
        return number * self.shard_size

    def samples(self, split: str) -> int:
        """Samples in ``split``: the training ones from ``shards.json``, the test ones as read."""
        return self._samples if split == "train" else len(self.split(split))

    def shards(self, split: str) -> list[str]:
        """The paths or URLs of the shards of ``split``."""
        return list(self._shards[split])

    def first_index(self, url: str) -> int:
        """The ``index`` of the first sample of training shard ``url`` (shard number × shard size)."""
        return self._first[url]

    def listed_samples(self, url: str) -> int | None:
        """The samples ``shards.json`` lists for training shard ``url`` (None: not listed per shard)."""
        return self._sizes[url]

    def split(self, name: str) -> ShardSplit:
        """A whole split in memory (read once, then kept): for evaluation."""
        if name not in self._loaded:
            samples = [s for shard in self.shards(name) for s in shard_samples(shard)]
            if not samples:
                raise InputError(f"the {name} shards of {self.source} hold no samples; give other shards")
            self._loaded[name] = ShardSplit(
                sample_inputs(samples, self.tokenize), [s["text"][: self.captions] for s in samples]
            )
        return self._loaded[name]


def _names_a_folder(entry: str) -> bool:
    """Whether one ``shards`` entry is the folder harmonia prep shards wrote (a local path that is no .tar
    and no pattern)."""
    return is_local(entry) and not entry.endswith(".tar") and "{" not in entry


def _meta_beside(urls: list[str]) -> str:
    """The ``shards.json`` beside local shards."""
    if not is_local(urls[0]):
        raise InputError(
            f"shards given as URLs ({urls[0]}) need their shards.json (shapes, sample counts, vocabulary): "
            f"set data.shards_meta to its path or URL, e.g. 'pipe:aws s3 cp s3://bucket/shards.json -'"
        )
    return str(Path(urls[0]).parent / "shards.json")


class ShardStream(IterableDataset):
    """Training batches streamed from the shards of a :class:`ShardCorpus` (see the module docstring).

    Args:
        corpus: the shards.
        batch_size: this rank's batch (the global batch / world size).
        steps: batches per epoch, the same on every rank.
        seed: seed of the shard order and the shuffle buffer.
        rank, world_size: this rank and the number of ranks.
        shuffle_buffer: samples held for shuffling within each stream.
    """

    def __init__(
        self,
        corpus: ShardCorpus,
        batch_size: int,
        steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.corpus, self.batch_size, self.steps = corpus, batch_size, steps
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stream_shards(self, stream: int, streams: int) -> list[str]:
        """The shards reading stream ``stream`` of ``streams`` takes this epoch (disjoint when there are
        enough shards; shared, round-robin, when there are fewer shards than streams)."""
        shards = self.corpus.shards("train")
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(len(shards), generator=generator).tolist()
        return [shards[order[i % len(shards)]] for i in range(stream, max(len(shards), streams), streams)]

    def _samples(self, shards: list[str], rng: random.Random) -> Generator[dict[str, Any], None, None]:
        """Endless samples of ``shards`` (reshuffled each pass), through a shuffle buffer."""
        buffer: list[dict[str, Any]] = []
        while True:
            for shard in rng.sample(shards, len(shards)):
                first, read = self.corpus.first_index(shard), 0
                for read, sample in enumerate(shard_samples(shard), 1):
                    sample["index"] = first + read - 1  # shard number x shard size + place in the shard
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], sample = sample, buffer[i]
                    yield sample
                listed = self.corpus.listed_samples(shard)
                if listed is not None and read != listed:  # a tar cut at a member boundary reads as shorter
                    raise InputError(
                        f"shard {shard} holds {read} samples where {self.corpus.meta} lists {listed}; "
                        f"rerun harmonia prep shards with the same --src and --dst to rewrite a damaged shard"
                    )
            while buffer:  # end of a pass over the shards
                yield buffer.pop(rng.randrange(len(buffer)))

    def batches(self, worker: int = 0, workers: int = 1) -> Iterator[dict[str, Any]]:
        """The batches DataLoader worker ``worker`` of ``workers`` yields on this rank this epoch: steps
        ``worker``, ``worker + workers``, ... (the DataLoader takes the workers' batches in turn), read by
        stream ``rank × workers + worker`` of ``world_size × workers``."""
        stream, streams = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}:{self.epoch}:{stream}")
        samples = self._samples(self.stream_shards(stream, streams), rng)
        for _ in range(worker, self.steps, workers):
            batch = [next(samples) for _ in range(self.batch_size)]
            yield {
                "inputs": sample_inputs(batch, self.corpus.tokenize),
                "captions": [s["text"][: self.corpus.captions] for s in batch],
                "keys": [s["key"] for s in batch],
                "indices": torch.tensor([s["index"] for s in batch]),
            }
        samples.close()  # closes the shard being read

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.batches(*((info.id, info.num_workers) if info is not None else (0, 1)))


class ShardLoader:
    """The pre-training trainer's loader over a :class:`ShardStream`: ``len`` is the steps per epoch.

    ``retokenize`` (caption bags → ids, mask) replaces the native word ids, for another text encoder.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        retokenize: Callable[[list[list[str]]], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.stream, self.num_workers, self.retokenize = stream, num_workers, retokenize
        shards, streams = len(stream.corpus.shards("train")), stream.world_size * max(1, num_workers)
        if shards < streams:
            warnings.warn(
                f"{shards} training shards for {streams} reading streams (ranks x data.num_workers): streams "
                f"share shards and samples repeat within an epoch; write smaller shards (--shard-size) or "
                f"lower data.num_workers",
                stacklevel=2,
            )

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.stream.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers))
        try:
            for batch in batches:
                if self.retokenize is not None:
                    batch["inputs"]["text"], batch["inputs"]["text_mask"] = self.retokenize(batch["captions"])
                yield batch
        except InputError as exc:
            lines = str(exc).strip().splitlines()
            if len(lines) == 1:  # raised in this process
                raise
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:  # now: torch leaves it to a garbage collection, which waits on them
                shutdown()
            # from a worker: its message holds the worker's traceback, then the error
            raise InputError(lines[-1].split("InputError: ", 1)[-1]) from None


__all__ = [
    "SHARD_FORMAT",
    "ShardCorpus",
    "ShardLoader",
    "ShardReport",
    "ShardSettings",
    "ShardSplit",
    "ShardStream",
    "TranscribedVideo",
    "WordTokenizer",
    "expand_shards",
    "read_url",
    "scan_transcribed_videos",
    "shard_name",
    "shard_samples",
    "write_shard",
    "write_shards",
]
