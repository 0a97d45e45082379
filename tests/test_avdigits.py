from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harmonia.data import speech
from harmonia.data.audio_features import add_noise_at_snr, log_mel_spectrogram, mel_filterbank
from harmonia.data.avdigits import SPLITS, AVDigitsRecipe, build_arrays, cache_root, load_avdigits, recipe_key
from harmonia.data.loader import BatchLoader
from harmonia.errors import ConfigError, DataError


def test_speech_is_real_speech_of_the_right_length() -> None:
    a = speech.synthesize("seven", "en-us+f2", 150, 40)
    slow = speech.synthesize("seven", "en-us+f2", 90, 40)
    assert a.dtype == np.int16 and 0.2 * speech.SAMPLE_RATE < len(a) < 1.5 * speech.SAMPLE_RATE
    assert np.abs(a).max() > 1000
    assert len(slow) > 1.2 * len(a)


def test_speech_errors() -> None:
    with pytest.raises(DataError, match="no voice 'xx-nowhere'"):
        speech.synthesize("one", "xx-nowhere")
    with pytest.raises(DataError, match="rate"):
        speech.synthesize("one", rate=10)


@pytest.mark.integration
def test_dataset_is_deterministic_for_a_seed(tiny_recipe: AVDigitsRecipe) -> None:
    a, voices_a = build_arrays(tiny_recipe, progress=False)
    b, voices_b = build_arrays(tiny_recipe, progress=False)
    assert voices_a == voices_b
    for key in ("image", "label", "split", "voice", "rate", "pitch"):
        np.testing.assert_array_equal(a[key], b[key])
    # eSpeak NG 1.52 does not reproduce its waveform bit for bit between calls (not even with
    # espeak_ng_SetRandSeed), so the audio features of two builds are close, not equal.
    diff = np.abs(a["audio"].astype(np.float32) - b["audio"].astype(np.float32))
    assert diff.mean() < 0.1
    np.testing.assert_allclose(a["duration"], b["duration"], rtol=0.05)
    other, _ = build_arrays(AVDigitsRecipe(**{**tiny_recipe.__dict__, "seed": 1}), progress=False)
    assert not np.array_equal(a["audio"], other["audio"])


@pytest.mark.integration
def test_splits_are_disjoint_by_voice_and_image(tiny_recipe: AVDigitsRecipe) -> None:
    ds = load_avdigits(tiny_recipe, progress=False)
    voices = {s: set(ds.splits[s].voices) for s in SPLITS}
    assert all(voices[s] for s in SPLITS)
    assert not voices["train"] & voices["test"]
    assert not voices["train"] & voices["val"]
    assert not voices["val"] & voices["test"]
    assert sum(len(ds.splits[s]) for s in SPLITS) == tiny_recipe.limit
    images = {s: {tuple(x.flatten().tolist()) for x in ds.splits[s].inputs["image"]} for s in SPLITS}
    assert not images["train"] & images["test"]


@pytest.mark.integration
def test_feature_shapes_and_dtypes(tiny_recipe: AVDigitsRecipe) -> None:
    ds = load_avdigits(tiny_recipe, progress=False)
    train = ds.splits["train"]
    frames = int(round(tiny_recipe.clip_seconds / tiny_recipe.hop_seconds)) + 1
    assert train.inputs["audio"].shape[1:] == (1, tiny_recipe.n_mels, frames)
    assert train.inputs["image"].shape[1:] == (1, tiny_recipe.image_size, tiny_recipe.image_size)
    assert train.inputs["audio"].dtype == torch.float32 and train.labels.dtype == torch.int64
    assert set(train.labels.tolist()) <= set(range(10))


@pytest.mark.integration
def test_cache_reloads_fast_and_rebuilds_when_corrupt(
    tiny_recipe: AVDigitsRecipe, capsys: pytest.CaptureFixture
) -> None:
    ds = load_avdigits(tiny_recipe, progress=False)
    folder = cache_root() / "avdigits" / recipe_key(tiny_recipe)
    assert ds.path == folder
    data = folder / "data.npz"
    data.write_bytes(data.read_bytes()[:1000])  # truncated
    again = load_avdigits(tiny_recipe, progress=False)
    assert "checksum mismatch" in capsys.readouterr().err
    torch.testing.assert_close(again.splits["test"].inputs["image"], ds.splits["test"].inputs["image"])
    assert again.splits["test"].voices == ds.splits["test"].voices
    (folder / "meta.json").write_text("{not json")
    load_avdigits(tiny_recipe, progress=False)
    assert "meta.json is corrupt" in capsys.readouterr().err
    meta = json.loads((folder / "meta.json").read_text())
    meta["recipe_version"] = 0
    (folder / "meta.json").write_text(json.dumps(meta))
    load_avdigits(tiny_recipe, progress=False)
    assert "stale recipe" in capsys.readouterr().err


def test_recipe_changes_change_the_cache_key(tiny_recipe: AVDigitsRecipe) -> None:
    changed = AVDigitsRecipe(**{**tiny_recipe.__dict__, "audio_snr_db": 0.0})
    assert recipe_key(changed) != recipe_key(tiny_recipe)


@pytest.mark.integration
def test_degradation_knobs_act_on_their_modality(tiny_recipe: AVDigitsRecipe) -> None:
    base, _ = build_arrays(tiny_recipe, progress=False)
    blurred, _ = build_arrays(
        AVDigitsRecipe(**{**tiny_recipe.__dict__, "image_blur_sigma": 1.0}), progress=False
    )
    assert np.abs(base["audio"].astype(np.float32) - blurred["audio"].astype(np.float32)).mean() < 0.1
    assert not np.array_equal(base["image"], blurred["image"])
    # blur removes high frequencies: smaller total variation
    tv = lambda x: np.abs(np.diff(x, axis=-1)).sum()  # noqa: E731
    assert tv(blurred["image"]) < tv(base["image"])


def test_bad_recipes_are_rejected() -> None:
    with pytest.raises(ConfigError, match="no variant 'zz9'"):
        build_arrays(AVDigitsRecipe(limit=30, voice_variants=["f1", "zz9"]), progress=False)
    with pytest.raises(ConfigError, match="rate_range"):
        build_arrays(AVDigitsRecipe(limit=30, rate_range=[300, 100]), progress=False)


def test_noise_has_the_requested_snr() -> None:
    rng = np.random.default_rng(0)
    clean = np.sin(np.linspace(0, 2000, 200_000)).astype(np.float32)
    noisy = add_noise_at_snr(clean, 5.0, rng, float(np.mean(clean**2)))
    snr = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
    assert snr == pytest.approx(5.0, abs=0.05)


def test_mel_filterbank_and_log_mel() -> None:
    fb = mel_filterbank(20, 512, 16000)
    assert fb.shape == (20, 257) and fb.min() >= 0 and fb.max() <= 1.0 + 1e-6
    peaks = fb.argmax(dim=1)
    assert torch.all(peaks[1:] > peaks[:-1])  # centres increase
    # a 1 kHz tone puts its energy in the band whose centre is closest to 1 kHz
    t = torch.arange(16000) / 16000
    spec = log_mel_spectrogram(torch.sin(2 * torch.pi * 1000 * t)[None], 16000, n_mels=20, normalize=False)
    assert spec.shape == (1, 20, 101)
    centre_hz = peaks.float() * 8000 / 256
    assert spec[0, :, 50].argmax() == (centre_hz - 1000).abs().argmin()


def test_batch_loader_order_depends_only_on_seed_and_epoch() -> None:
    x = {"a": torch.arange(10).float()[:, None]}
    y = torch.arange(10)
    loader = BatchLoader(x, y, 4, shuffle=True, seed=3)
    loader.set_epoch(2)
    first = [b["indices"].tolist() for b in loader]
    other = BatchLoader(x, y, 4, shuffle=True, seed=3)
    other.set_epoch(2)
    assert first == [b["indices"].tolist() for b in other]
    assert sorted(i for b in first for i in b) == list(range(10)) and len(first) == 3
    other.set_epoch(3)
    assert first != [b["indices"].tolist() for b in other]


def test_too_few_voices_for_three_splits() -> None:
    with pytest.raises(ConfigError, match="cannot give train, val"):
        build_arrays(
            AVDigitsRecipe(
                limit=30,
                voice_accents=["en-us"],
                voice_variants=["f1", "m1", "m2", "f2"],
                val_fraction=0.45,
                test_fraction=0.45,
            ),
            progress=False,
        )


@pytest.mark.integration
def test_fresh_training_noise_is_an_augmentation(tiny_recipe: AVDigitsRecipe) -> None:
    recipe = AVDigitsRecipe(**{**tiny_recipe.__dict__, "image_noise_std": 0.5})
    ds = load_avdigits(recipe, progress=False)
    train, test = ds.splits["train"], ds.splits["test"]
    assert set(train.train_transforms) == {"image"} and not test.train_transforms
    clean, fixed = train.train_inputs["image"], train.inputs["image"]
    assert (fixed - clean).std().item() == pytest.approx(0.5, rel=0.05)  # eval/probe view: fixed noise
    loader = BatchLoader(
        train.train_inputs, train.labels, 16, shuffle=True, seed=0, transforms=train.train_transforms
    )
    loader.set_epoch(0)
    first = [b["inputs"]["image"] for b in loader]
    again = [b["inputs"]["image"] for b in loader]
    loader.set_epoch(1)
    other = [b["inputs"]["image"] for b in loader]
    torch.testing.assert_close(first, again)  # reproducible for (seed, epoch): resume-safe
    assert not torch.equal(first[0], other[0])
    batch = next(iter(loader))
    noise = batch["inputs"]["image"] - clean[batch["indices"]]
    assert noise.std().item() == pytest.approx(0.5, rel=0.1)
    fixed_off = load_avdigits(
        AVDigitsRecipe(**{**recipe.__dict__, "image_noise_fresh": False}), progress=False
    )
    assert not fixed_off.splits["train"].train_transforms
