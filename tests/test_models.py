"""Tests for harmonia.models: encoders, fusion heads and the multimodal classifier."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from harmonia.errors import ConfigError, InputError
from harmonia.models import (
    ConcatFusion,
    ConvEncoder,
    FiLMFusion,
    FusionKind,
    GatedFusion,
    MultimodalClassifier,
    MultimodalOutput,
    ResNet18Encoder,
    SumFusion,
    build_encoder,
    build_fusion,
)

NAMES = ("audio", "image", "text")


def _setup(num_modalities: int, seed: int = 0) -> tuple[tuple[str, ...], dict[str, int], dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    names = NAMES[:num_modalities]
    dims = {m: int(torch.randint(2, 9, (1,), generator=gen)) for m in names}
    feats = {m: torch.randn(5, d, generator=gen) for m, d in dims.items()}
    return names, dims, feats


def _tiny_model() -> MultimodalClassifier:
    encoders = {
        "audio": ConvEncoder(in_channels=1, widths=(4, 8), feature_dim=6),
        "image": ConvEncoder(in_channels=3, widths=(4,), feature_dim=5),
    }
    return MultimodalClassifier(encoders, ConcatFusion(("audio", "image"), {"audio": 6, "image": 5}, 3))


def _tiny_batch(b: int = 2) -> dict[str, Tensor]:
    return {"audio": torch.randn(b, 1, 12, 20), "image": torch.randn(b, 3, 8, 8)}


# --- fusion heads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head_cls", [ConcatFusion, SumFusion])
@pytest.mark.parametrize("num_modalities", [1, 2, 3])
def test_linear_heads_unimodal_logits_sum_to_fused(head_cls: type, num_modalities: int) -> None:
    torch.manual_seed(num_modalities)
    names, dims, feats = _setup(num_modalities, seed=num_modalities)
    head = head_cls(names, dims, num_classes=4)
    fused = head(feats)
    uni = head.unimodal_logits(feats)
    assert fused.shape == (5, 4)
    assert list(uni) == list(names)
    assert all(o.shape == (5, 4) for o in uni.values())
    torch.testing.assert_close(torch.stack(list(uni.values())).sum(0), fused, rtol=1e-5, atol=1e-5)


def test_concat_unimodal_logits_match_weight_blocks() -> None:
    torch.manual_seed(0)
    names, dims, feats = _setup(3, seed=3)
    head = ConcatFusion(names, dims, num_classes=4)
    w, b = head.fc.weight.detach(), head.fc.bias.detach()
    uni = head.unimodal_logits(feats)
    col = 0
    for m in names:
        block = w[:, col : col + dims[m]]
        col += dims[m]
        expected = feats[m] @ block.T + b / 3
        torch.testing.assert_close(uni[m].detach(), expected)


def test_sum_unimodal_logits_are_each_modality_head() -> None:
    names, dims, feats = _setup(2)
    head = SumFusion(names, dims, num_classes=3)
    uni = head.unimodal_logits(feats)
    for m in names:
        lin = head.heads[m]
        assert isinstance(lin, torch.nn.Linear)
        torch.testing.assert_close(uni[m], feats[m] @ lin.weight.T + lin.bias)


@pytest.mark.parametrize("head_cls", [FiLMFusion, GatedFusion])
@pytest.mark.parametrize("num_modalities", [1, 2, 3])
def test_zero_out_estimator_matches_forward_on_zeroed_features(head_cls: type, num_modalities: int) -> None:
    torch.manual_seed(0)
    names, dims, feats = _setup(num_modalities, seed=7)
    head = head_cls(names, dims, num_classes=4, hidden_dim=6)
    uni = head.unimodal_logits(feats)
    assert list(uni) == list(names)
    for m in names:
        zeroed = {c: (v if c == m else torch.zeros(v.shape)) for c, v in feats.items()}
        torch.testing.assert_close(uni[m], head(zeroed))
    assert head(feats).shape == (5, 4)


def test_film_modulates_target_with_other_modalities() -> None:
    torch.manual_seed(0)
    names, dims, feats = _setup(2)
    head = FiLMFusion(names, dims, num_classes=3, hidden_dim=4, target="image")
    gamma, beta = head.film["audio"](feats["audio"]).chunk(2, dim=1)
    expected = head.out(gamma * head.project(feats["image"]) + beta)
    torch.testing.assert_close(head(feats), expected)


def test_gated_two_modality_gates_sum_to_one() -> None:
    torch.manual_seed(0)
    names, dims, feats = _setup(2)
    head = GatedFusion(names, dims, num_classes=3, hidden_dim=4)
    z = head.gates(feats)
    assert z.shape == (5, 2, 4)
    assert bool((z > 0).all() and (z < 1).all())
    torch.testing.assert_close(z.sum(dim=1), torch.ones(5, 4))


def test_fusion_feature_validation() -> None:
    names, dims, feats = _setup(2)
    head = ConcatFusion(names, dims, num_classes=3)
    with pytest.raises(InputError, match=r"lack modality.*image.*expects audio, image"):
        head({"audio": feats["audio"]})
    with pytest.raises(InputError, match=r"unexpected modality.*video"):
        head({**feats, "video": feats["audio"]})
    with pytest.raises(InputError, match=r"batch sizes differ.*audio: 5, image: 2"):
        head({"audio": feats["audio"], "image": feats["image"][:2]})
    with pytest.raises(InputError, match=r"modality 'image': expected features of shape \[B, "):
        head({"audio": feats["audio"], "image": torch.randn(5, dims["image"] + 1)})


@pytest.mark.parametrize("kind", ["concat", "SUM", FusionKind.FILM, FusionKind.GATED])
def test_build_fusion_kinds(kind: FusionKind | str) -> None:
    names, dims, feats = _setup(2)
    head = build_fusion(kind, names, dims, num_classes=3, hidden_dim=4)
    assert head(feats).shape == (5, 3)


def test_build_fusion_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"unknown fusion kind 'attention'.*concat, sum, film, gated"):
        build_fusion("attention", ("a",), {"a": 2}, 3)


def test_film_unknown_target() -> None:
    with pytest.raises(ConfigError, match="target modality 'video'"):
        FiLMFusion(("a", "b"), {"a": 2, "b": 2}, 3, target="video")


# --- encoders -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_channels", "shape"),
    [(3, (2, 3, 16, 16)), (1, (2, 1, 40, 101)), (3, (2, 4, 3, 16, 16)), (1, (2, 1, 1, 1))],
)
def test_conv_encoder_output_shape(in_channels: int, shape: tuple[int, ...]) -> None:
    enc = ConvEncoder(in_channels=in_channels, widths=(4, 8, 8), feature_dim=7)
    assert enc.feature_dim == 7
    assert enc(torch.randn(shape)).shape == (2, 7)


def test_conv_encoder_default_widths_on_spectrogram() -> None:
    enc = ConvEncoder()
    assert enc(torch.randn(2, 1, 40, 101)).shape == (2, 128)


@pytest.mark.parametrize(
    "enc",
    [ConvEncoder(in_channels=3, widths=(4, 8), feature_dim=5), ResNet18Encoder(in_channels=3, feature_dim=5)],
    ids=["conv", "resnet18"],
)
def test_sequence_output_is_mean_of_frame_outputs(enc: torch.nn.Module) -> None:
    torch.manual_seed(0)
    enc.eval()
    x = torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        seq = enc(x)
        frames = torch.stack([enc(x[:, t]) for t in range(x.shape[1])]).mean(dim=0)
    assert seq.shape == (2, 5)
    torch.testing.assert_close(seq, frames, rtol=1e-4, atol=1e-5)


def test_resnet18_shapes() -> None:
    enc = ResNet18Encoder(in_channels=1)
    assert enc.feature_dim == 512
    assert enc(torch.randn(2, 1, 64, 64)).shape == (2, 512)
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_build_encoder() -> None:
    assert isinstance(build_encoder("conv", 1, 16), ConvEncoder)
    enc = build_encoder("resnet18", 3, 64)
    assert isinstance(enc, ResNet18Encoder)
    assert enc.feature_dim == 64
    with pytest.raises(ConfigError, match=r"unknown encoder kind 'vit'.*conv, resnet18"):
        build_encoder("vit", 1, 16)


# --- classifier -----------------------------------------------------------------------------------


def test_classifier_forward() -> None:
    torch.manual_seed(0)
    model = _tiny_model()
    assert model.modalities == ("audio", "image")
    out = model(_tiny_batch(4))
    assert isinstance(out, MultimodalOutput)
    assert out.logits.shape == (4, 3)
    assert out.features["audio"].shape == (4, 6)
    assert out.features["image"].shape == (4, 5)
    assert set(out.unimodal_logits) == {"audio", "image"}
    torch.testing.assert_close(sum(out.unimodal_logits.values()), out.logits)


def test_classifier_encode_then_fuse_equals_forward() -> None:
    torch.manual_seed(0)
    model = _tiny_model().eval()
    batch = _tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.fuse(model.encode(batch)).logits, model(batch).logits)


def test_classifier_parameter_groups_partition_the_model() -> None:
    model = _tiny_model()
    groups = model.encoder_parameters()
    assert list(groups) == ["audio", "image"]
    ids = [id(p) for ps in groups.values() for p in ps] + [id(p) for p in model.head_parameters()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_classifier_rejects_mismatched_construction() -> None:
    enc = {"audio": ConvEncoder(widths=(4,), feature_dim=6)}
    with pytest.raises(ConfigError, match="fusion head expects audio, image"):
        MultimodalClassifier(enc, ConcatFusion(("audio", "image"), {"audio": 6, "image": 5}, 3))
    with pytest.raises(ConfigError, match=re.escape("feature_dims['audio']=6")):
        MultimodalClassifier(enc, ConcatFusion(("audio",), {"audio": 7}, 3))


def test_error_missing_modality() -> None:
    batch = _tiny_batch()
    del batch["image"]
    msg = "batch lacks modality 'image'; the model has encoders for audio, image: add it to the batch"
    with pytest.raises(InputError, match=re.escape(msg)):
        _tiny_model()(batch)


def test_error_extra_modality() -> None:
    batch = {**_tiny_batch(), "video": torch.randn(2, 3, 8, 8)}
    with pytest.raises(InputError, match=r"modality 'video'.*drop it from the batch or add an encoder"):
        _tiny_model()(batch)


def test_error_wrong_channel_count() -> None:
    batch = {**_tiny_batch(), "image": torch.randn(2, 1, 8, 8)}
    with pytest.raises(InputError, match=r"modality 'image'.*\[B, 3, H, W\].*in_channels=1"):
        _tiny_model()(batch)


def test_error_channels_last() -> None:
    batch = {**_tiny_batch(), "image": torch.randn(2, 8, 8, 3)}
    with pytest.raises(InputError, match=re.escape("modality 'image'") + ".*x.permute\\(0, 3, 1, 2\\)"):
        _tiny_model()(batch)


def test_error_integer_dtype() -> None:
    batch = {**_tiny_batch(), "image": torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)}
    with pytest.raises(InputError, match=r"modality 'image'.*torch\.uint8.*x\.float\(\)"):
        _tiny_model()(batch)


def test_error_three_dim_tensor() -> None:
    batch = {**_tiny_batch(), "audio": torch.randn(2, 12, 20)}
    msg = "modality 'audio': expected a float tensor of shape [B, 1, H, W] or [B, T, 1, H, W], "
    with pytest.raises(InputError, match=re.escape(msg + "got shape [2, 12, 20]") + r".*x\.unsqueeze\(1\)"):
        _tiny_model()(batch)


def test_error_not_a_tensor() -> None:
    batch = {**_tiny_batch(), "audio": [[0.0]]}
    with pytest.raises(InputError, match=r"modality 'audio'.*got list.*torch\.as_tensor"):
        _tiny_model()(batch)  # type: ignore[arg-type]


def test_error_batch_size_mismatch() -> None:
    batch = {**_tiny_batch(2), "image": torch.randn(3, 3, 8, 8)}
    with pytest.raises(InputError, match=r"batch sizes differ.*audio: 2, image: 3.*same examples"):
        _tiny_model()(batch)
