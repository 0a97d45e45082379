"""AV-Digits: the embedded default dataset.

Each sample pairs a real handwritten digit (scikit-learn's bundled ``load_digits``, 1,797 8x8 images) with
the digit's name spoken by eSpeak NG. Voices (accent x variant), speaking rate and pitch vary per sample;
the voices are split three ways so that the test speakers are never heard in training. Knobs degrade either
modality (audio SNR; image blur, occlusion, down-sampling, pixel noise), so either can be made the weak one.

The dataset is built once into ``$HARMONIA_CACHE/avdigits/<recipe-hash>/`` (default cache root
``~/.cache/harmonia``): ``data.npz`` holds the arrays and ``meta.json`` the recipe, its version and the
SHA-256 of ``data.npz``. A cache whose meta is missing, whose checksum does not match or whose recipe is
stale is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from harmonia.data import speech
from harmonia.data.audio_features import add_noise_at_snr, log_mel_spectrogram, resample
from harmonia.data.image_ops import add_pixel_noise, blur, downsample, occlude, resize
from harmonia.errors import ConfigError, DataError
from harmonia.extras import progress_bar
from harmonia.settings import setting, to_plain


@dataclass
class AVDigitsRecipe:
    """Recipe of the embedded AV-Digits dataset. Any change here rebuilds the cache."""

    seed: int = setting(0, help="seed of every random choice in the recipe (voices, pairing, noise)")
    val_fraction: float = setting(
        0.2, help="fraction of images and voices in the validation split", gt=0, lt=0.5
    )
    test_fraction: float = setting(0.2, help="fraction of images and voices in the test split", gt=0, lt=0.5)
    limit: int | None = setting(None, help="use only the first N images (quick tests)", ge=30)
    voice_accents: list[str] = setting(
        default_factory=lambda: ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc"],
        help="eSpeak NG English voices; every accent is combined with every variant",
    )
    voice_variants: list[str] = setting(
        default_factory=lambda: ["f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7"],
        help="eSpeak NG voice variants (voices/!v in its data)",
    )
    rate_range: list[int] = setting(
        default_factory=lambda: [130, 210], help="speaking rate range, words per minute [low, high]"
    )
    pitch_range: list[int] = setting(default_factory=lambda: [25, 75], help="pitch range, 0-100 [low, high]")
    clip_seconds: float = setting(1.0, help="audio clip length; speech is placed at a random offset", gt=0.2)
    sample_rate: int = setting(
        16000, help="audio sample rate after resampling from eSpeak's 22050 Hz", ge=8000
    )
    n_mels: int = setting(32, help="number of log-mel bands", ge=8)
    hop_seconds: float = setting(0.02, help="hop of the log-mel frames (window 25 ms)", gt=0.001)
    audio_snr_db: float | None = setting(
        -5.0,
        help="SNR of additive white noise in dB (null: clean); the default makes audio the weak modality",
    )
    image_size: int = setting(16, help="side of the square image after resizing the 8x8 digit", ge=8)
    image_downsample: int = setting(1, help="average-pool by this factor and upsample back (1: off)", ge=1)
    image_blur_sigma: float = setting(0.0, help="Gaussian blur sigma in pixels of the resized image", ge=0)
    image_occlusion: float = setting(
        0.5,
        help="side of a randomly placed black square (fixed per sample), as a fraction of the image side",
        ge=0,
        lt=1,
    )
    image_noise_fresh: bool = setting(
        True,
        help="draw new pixel noise for every training batch (the encoder cannot memorize it); "
        "val/test noise is always fixed per sample",
    )
    image_noise_std: float = setting(
        0.0,
        help="std of additive Gaussian pixel noise (pixels are in [0, 1])",
        ge=0,
    )


RECIPE_VERSION = 3  # 3: stores the speech onset (tri-modal AV-Digits syncs video to it)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")
MODALITIES = ("audio", "image")
NUM_CLASSES = 10


def cache_root() -> Path:
    """``$HARMONIA_CACHE``, else ``$XDG_CACHE_HOME/harmonia``, else ``~/.cache/harmonia``."""
    if os.environ.get("HARMONIA_CACHE"):
        return Path(os.environ["HARMONIA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "harmonia"


def recipe_key(cfg: AVDigitsRecipe) -> str:
    recipe = {"version": RECIPE_VERSION, **to_plain(cfg)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SplitData:
    """One split held in memory: modality tensors, labels and per-sample metadata.

    ``inputs`` are what evaluation and probes see. ``train_inputs`` and ``train_transforms`` are what a
    training loader should use: for a modality with a transform (fresh pixel noise each batch), the clean
    tensor to which the transform is applied.
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    voices: list[str]
    train_inputs: dict[str, Tensor] = field(default_factory=dict)
    train_transforms: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = field(default_factory=dict)
    speech_span: Tensor | None = None  # [N, 2] start and end of the word in the audio clip, seconds

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class AVDigits:
    config: AVDigitsRecipe
    splits: dict[str, SplitData]
    path: Path
    modalities: tuple[str, ...] = MODALITIES
    num_classes: int = NUM_CLASSES

    def split(self, name: str, modalities: list[str] | tuple[str, ...] | None = None) -> SplitData:
        if name not in self.splits:
            raise DataError(f"AV-Digits has no split {name!r}; splits: {', '.join(SPLITS)}")
        data = self.splits[name]
        if modalities is None:
            return data
        check_modalities(modalities, self.modalities)
        return SplitData(
            {m: data.inputs[m] for m in modalities},
            data.labels,
            data.voices,
            {m: t for m, t in data.train_inputs.items() if m in modalities},
            {m: f for m, f in data.train_transforms.items() if m in modalities},
            data.speech_span,
        )


class PixelNoise:
    """Training-time augmentation: add N(0, std²) pixel noise drawn from the loader's generator."""

    def __init__(self, std: float) -> None:
        self.std = std

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return x + self.std * torch.randn(x.shape, generator=generator, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"PixelNoise(std={self.std})"


def check_modalities(requested: list[str] | tuple[str, ...], available: tuple[str, ...]) -> None:
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise ConfigError(
            f"data.modalities: AV-Digits has no modality {', '.join(map(repr, unknown))}; "
            f"it has {', '.join(available)}"
        )


def load_avdigits(
    cfg: AVDigitsRecipe | None = None, *, rebuild: bool = False, progress: bool = True
) -> AVDigits:
    """Load AV-Digits for recipe ``cfg`` from the cache, building it first when needed."""
    cfg = cfg or AVDigitsRecipe()
    folder = cache_root() / "avdigits" / recipe_key(cfg)
    if not rebuild and _cache_problem(folder, cfg) is None:
        return _read(folder, cfg)
    with build_lock(folder):  # one builder at a time; the others then find it built
        problem = _cache_problem(folder, cfg)
        if problem is None and not rebuild:
            return _read(folder, cfg)
        if problem not in (None, "not built"):
            print(
                f"harmonia: AV-Digits cache at {folder} is unusable ({problem}); rebuilding", file=sys.stderr
            )
        _build_into(folder, cfg, progress=progress)
    return _read(folder, cfg)


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    lock = folder.parent / f"{folder.name}.lock"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "w")  # noqa: SIM115 - closed below, after the lock is released
    except OSError as exc:
        raise DataError(
            f"a dataset must be built into the cache, but the cache folder {folder.parent} is not "
            f"writable ({exc.strerror or exc}); set HARMONIA_CACHE to a writable folder (or build it once "
            "as a user who can write there)"
        ) from exc
    with handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, builds are still atomic
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# cache


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_problem(folder: Path, cfg: AVDigitsRecipe) -> str | None:
    meta_path, data_path = folder / "meta.json", folder / "data.npz"
    if not meta_path.exists() or not data_path.exists():
        return "not built"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "meta.json is corrupt"
    if not isinstance(meta, dict):
        return f"meta.json holds a {type(meta).__name__}, not an object"
    if meta.get("recipe_version") != RECIPE_VERSION or meta.get("recipe") != to_plain(cfg):
        return "stale recipe"
    if meta.get("sha256") != file_sha256(data_path):
        return "data.npz checksum mismatch"
    return None


def _read(folder: Path, cfg: AVDigitsRecipe) -> AVDigits:
    meta = json.loads((folder / "meta.json").read_text())
    try:
        with np.load(folder / "data.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # a corrupt archive that passed the checksum: should not happen
        raise DataError(
            f"cannot read {folder / 'data.npz'} ({exc}); delete {folder} and it is rebuilt on the next load"
        ) from exc
    voices = meta["voices"]
    splits = {}
    for code, name in enumerate(SPLITS):
        sel = arrays["split"] == code
        fresh = name == "train" and cfg.image_noise_fresh and cfg.image_noise_std > 0
        splits[name] = SplitData(
            inputs={
                "audio": torch.from_numpy(arrays["audio"][sel].astype(np.float32)),
                "image": torch.from_numpy(arrays["image"][sel]),
            },
            labels=torch.from_numpy(arrays["label"][sel].astype(np.int64)),
            voices=[voices[i] for i in arrays["voice"][sel]],
            train_inputs={"image": torch.from_numpy(arrays["image_clean"][sel])} if fresh else {},
            train_transforms={"image": PixelNoise(cfg.image_noise_std)} if fresh else {},
            speech_span=torch.from_numpy(
                np.stack(
                    [
                        arrays["onset"][sel],
                        np.minimum(arrays["onset"][sel] + arrays["duration"][sel], cfg.clip_seconds),
                    ],
                    axis=1,
                )
            ),
        )
    return AVDigits(config=cfg, splits=splits, path=folder)


def _build_into(folder: Path, cfg: AVDigitsRecipe, progress: bool) -> None:
    arrays, voices = build_arrays(cfg, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        np.savez(tmp / "data.npz", **arrays)  # type: ignore[arg-type]
        meta = {
            "recipe_version": RECIPE_VERSION,
            "recipe": to_plain(cfg),
            "voices": voices,
            "sha256": file_sha256(tmp / "data.npz"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# recipe


def split_voices(cfg: AVDigitsRecipe, rng: np.random.Generator) -> dict[str, list[str]]:
    """All accent+variant voices, shuffled and split three ways; each split gets at least one voice."""
    available = set(speech.available_variants())
    unknown = [v for v in cfg.voice_variants if v not in available]
    if unknown:
        raise ConfigError(
            f"data.avdigits.voice_variants: eSpeak NG has no variant {', '.join(map(repr, unknown))}; "
            f"some that exist: f1-f5, m1-m7, croak, klatt"
        )
    voices = [f"{a}+{v}" for a in cfg.voice_accents for v in cfg.voice_variants]
    if len(voices) < 3:
        raise ConfigError("data.avdigits: need at least 3 voices (accents x variants) to split by voice")
    order = rng.permutation(len(voices))
    n_test = max(1, round(cfg.test_fraction * len(voices)))
    n_val = max(1, round(cfg.val_fraction * len(voices)))
    if n_test + n_val >= len(voices):
        raise ConfigError(
            f"data.avdigits: {len(voices)} voices cannot give train, val ({cfg.val_fraction}) and test "
            f"({cfg.test_fraction}) voices of their own; add accents or variants, or lower the fractions"
        )
    shuffled = [voices[i] for i in order]
    return {
        "test": sorted(shuffled[:n_test]),
        "val": sorted(shuffled[n_test : n_test + n_val]),
        "train": sorted(shuffled[n_test + n_val :]),
    }


def split_images(labels: np.ndarray, cfg: AVDigitsRecipe, rng: np.random.Generator) -> np.ndarray:
    """Stratified assignment of each image to train (0), val (1) or test (2)."""
    split = np.zeros(len(labels), dtype=np.int8)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(cfg.test_fraction * len(idx))
        n_val = round(cfg.val_fraction * len(idx))
        split[idx[:n_test]] = 2
        split[idx[n_test : n_test + n_val]] = 1
    return split


def _check_ranges(cfg: AVDigitsRecipe) -> None:
    for key, rng_, lo, hi in (
        ("rate_range", cfg.rate_range, 80, 450),
        ("pitch_range", cfg.pitch_range, 0, 100),
    ):
        if len(rng_) != 2 or not lo <= rng_[0] <= rng_[1] <= hi:
            raise ConfigError(
                f"data.avdigits.{key}: expected [low, high] with {lo} <= low <= high <= {hi}, got {rng_}"
            )


def build_arrays(cfg: AVDigitsRecipe, progress: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Synthesize and featurize the whole dataset. Deterministic for ``cfg`` (incl. ``cfg.seed``)."""
    from sklearn.datasets import load_digits

    _check_ranges(cfg)
    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    if cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    n = len(labels)
    rng = np.random.default_rng(cfg.seed)
    voices_by_split = split_voices(cfg, rng)
    split = split_images(labels, cfg, rng)
    all_voices = sorted({v for vs in voices_by_split.values() for v in vs})
    voice_index = {v: i for i, v in enumerate(all_voices)}

    voice = np.empty(n, dtype=np.int16)
    for code, name in enumerate(SPLITS):
        members = np.flatnonzero(split == code)
        choices = rng.integers(0, len(voices_by_split[name]), size=len(members))
        voice[members] = [voice_index[voices_by_split[name][c]] for c in choices]
    rate = rng.integers(cfg.rate_range[0], cfg.rate_range[1] + 1, size=n)
    pitch = rng.integers(cfg.pitch_range[0], cfg.pitch_range[1] + 1, size=n)

    clip_len = int(round(cfg.clip_seconds * cfg.sample_rate))
    waves = np.zeros((n, clip_len), dtype=np.float32)
    durations = np.zeros(n, dtype=np.float32)
    onsets = np.zeros(n, dtype=np.float32)
    audio_rng = np.random.default_rng([cfg.seed, 1])
    for i in progress_bar(range(n), desc="AV-Digits: synthesizing speech", disable=not progress, unit="clip"):
        raw = speech.synthesize(DIGIT_WORDS[labels[i]], all_voices[voice[i]], int(rate[i]), int(pitch[i]))
        wave = resample(raw.astype(np.float32) / 32768.0, speech.SAMPLE_RATE, cfg.sample_rate)
        durations[i] = len(wave) / cfg.sample_rate
        power = float(np.mean(wave**2)) if len(wave) else 0.0
        if len(wave) > clip_len:
            start = (len(wave) - clip_len) // 2
            wave = wave[start : start + clip_len]
        offset = int(audio_rng.integers(0, clip_len - len(wave) + 1))
        onsets[i] = offset / cfg.sample_rate
        clip = np.zeros(clip_len, dtype=np.float32)
        clip[offset : offset + len(wave)] = wave
        if cfg.audio_snr_db is not None and power > 0:
            clip = add_noise_at_snr(clip, cfg.audio_snr_db, audio_rng, power)
        waves[i] = clip
    audio = log_mel_spectrogram(
        torch.from_numpy(waves), cfg.sample_rate, cfg.n_mels, hop_seconds=cfg.hop_seconds
    )[:, None]

    image_rng = np.random.default_rng([cfg.seed, 2])
    img = resize(images, cfg.image_size)
    img = downsample(img, cfg.image_downsample)
    img = blur(img, cfg.image_blur_sigma)
    img = occlude(img, cfg.image_occlusion, image_rng)
    clean = img
    img = add_pixel_noise(img, cfg.image_noise_std, image_rng)

    arrays = {
        "audio": audio.numpy().astype(np.float16),
        "image": img[:, None].astype(np.float32),
        "image_clean": clean[:, None].astype(np.float32),
        "label": labels,
        "split": split,
        "voice": voice,
        "rate": rate.astype(np.int16),
        "pitch": pitch.astype(np.int16),
        "duration": durations,
        "onset": onsets,
    }
    return arrays, all_voices


def dataset_summary(ds: AVDigits) -> dict:
    """Sizes, class balance, voices per split and each modality's unimodal difficulty.

    Difficulty is the test accuracy of a logistic regression on the raw inputs (pixels; log-mel frames
    averaged in groups of 4), trained on the train split: a model-free gauge of which modality is weaker.
    """
    from harmonia.metrics.probe import linear_probe

    summary: dict = {"path": str(ds.path), "recipe": to_plain(ds.config), "splits": {}}
    for name in SPLITS:
        data = ds.splits[name]
        summary["splits"][name] = {
            "size": len(data),
            "class_counts": torch.bincount(data.labels, minlength=NUM_CLASSES).tolist(),
            "voices": len(set(data.voices)),
            "shapes": {m: list(t.shape[1:]) for m, t in data.inputs.items()},
        }
    raw = {
        "image": lambda t: t.flatten(1),
        "audio": lambda t: torch.nn.functional.avg_pool2d(t, (1, 4), ceil_mode=True).flatten(1),
    }
    difficulty = {}
    for m in MODALITIES:
        train, test = ds.splits["train"], ds.splits["test"]
        result = linear_probe(
            raw[m](train.inputs[m]),
            train.labels,
            raw[m](test.inputs[m]),
            test.labels,
            NUM_CLASSES,
            max_iter=300,
        )
        difficulty[m] = result.accuracy
    summary["raw_input_linear_accuracy"] = difficulty
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"AV-Digits at {summary['path']}", ""]
    lines.append(f"{'split':<6} {'size':>5} {'voices':>6}  class counts (0-9)")
    for name, s in summary["splits"].items():
        lines.append(f"{name:<6} {s['size']:>5} {s['voices']:>6}  {' '.join(map(str, s['class_counts']))}")
    shapes = summary["splits"]["train"]["shapes"]
    lines.append("")
    lines.append("input shapes: " + ", ".join(f"{m} {tuple(s)}" for m, s in shapes.items()))
    lines.append("unimodal difficulty (logistic regression on raw inputs, test accuracy):")
    for m, acc in summary["raw_input_linear_accuracy"].items():
        lines.append(f"  {m:<6} {acc:.3f}")
    recipe = summary["recipe"]
    lines.append(
        f"audio SNR {recipe['audio_snr_db']} dB; image downsample x{recipe['image_downsample']}, "
        f"blur {recipe['image_blur_sigma']}, occlusion {recipe['image_occlusion']}, "
        f"noise {recipe['image_noise_std']}"
    )
    return "\n".join(lines)
