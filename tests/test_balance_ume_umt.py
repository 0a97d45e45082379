"""UME and UMT (Du et al., ICML 2023): the losses against hand computations, the refusal of non-additive
fusion heads, teacher loading from a real unimodal checkpoint and its errors, training with logs and exact
resume, and config validation."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.app.train import Trainer
from harmonia.balance import UME, UMT, BalanceStep, UMESettings, UMTSettings, load_teacher, ume_loss
from harmonia.errors import CheckpointError, ConfigError
from harmonia.models import MultimodalClassifier, build_classifier
from harmonia.models.fusion import ConcatFusion, SumFusion
from helpers import tiny_experiment, train_interrupted_and_resumed


def linear_model(fusion: str = "sum") -> MultimodalClassifier:
    """Two Linear encoders (audio: 3 -> 2, image: 4 -> 2) and a 3-class head."""
    torch.manual_seed(0)
    encoders = {"audio": nn.Linear(3, 2), "image": nn.Linear(4, 2)}
    dims = {"audio": 2, "image": 2}
    head = (
        SumFusion(("audio", "image"), dims, 3)
        if fusion == "sum"
        else ConcatFusion(("audio", "image"), dims, 3)
    )
    return MultimodalClassifier(encoders, head)


def hand_ce(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


# --------------------------------------------------------------------------------------------------
# UME


def test_ume_loss_is_the_sum_or_mean_of_the_unimodal_cross_entropies_by_hand() -> None:
    a = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    v = [[0.0, 2.0, 0.0], [-1.0, 0.0, 3.0]]
    labels = torch.tensor([0, 2])
    ce_a = (hand_ce(a[0], 0) + hand_ce(a[1], 2)) / 2
    ce_v = (hand_ce(v[0], 0) + hand_ce(v[1], 2)) / 2
    logits = {"audio": torch.tensor(a), "image": torch.tensor(v)}
    total, each = ume_loss(logits, labels, ("audio", "image"))
    assert float(total) == pytest.approx(ce_a + ce_v, rel=1e-6)
    assert (float(each["audio"]), float(each["image"])) == pytest.approx((ce_a, ce_v), rel=1e-6)
    mean, _ = ume_loss(logits, labels, ("audio", "image"), "mean")
    assert float(mean) == pytest.approx((ce_a + ce_v) / 2, rel=1e-6)


def test_ume_replaces_the_fused_loss_and_trains_each_branch_on_its_own_loss() -> None:
    model = linear_model("sum")
    g = torch.Generator().manual_seed(1)
    inputs = {"audio": torch.randn(5, 3, generator=g), "image": torch.randn(5, 4, generator=g)}
    labels = torch.tensor([0, 1, 2, 1, 0])
    ume = UME.build(model, UMESettings())
    output = model(inputs)
    assert torch.allclose(output.logits, output.unimodal_logits["audio"] + output.unimodal_logits["image"])
    step = BalanceStep(labels, epoch=0, inputs=inputs)
    loss = ume.adjust_loss(step, output, F.cross_entropy(output.logits, labels))
    assert set(step.metrics) == {"balance/ume/loss/audio", "balance/ume/loss/image"}
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    # each branch alone: its encoder and its head trained on its own cross-entropy only
    for m in ("audio", "image"):
        model.zero_grad()
        own = F.cross_entropy(model.fusion.heads[m](model.encoders[m](inputs[m])), labels)
        assert step.metrics[f"balance/ume/loss/{m}"] == pytest.approx(float(own.detach()), rel=1e-6)
        own.backward()
        for name, p in model.named_parameters():
            if f".{m}." in name:
                assert torch.allclose(got[name], p.grad, atol=1e-7), name


def test_ume_is_an_ensemble_only_of_additive_heads() -> None:
    for fusion in ("film", "gated"):
        model = build_classifier(
            ("audio", "image"), {"audio": 1, "image": 1}, 3, fusion=fusion, feature_dim=8
        )
        with pytest.raises(ConfigError, match=r"model.fusion=concat or model.fusion=sum"):
            UME.build(model)
    concat = build_classifier(("audio", "image"), {"audio": 1, "image": 1}, 3, fusion="concat", feature_dim=8)
    assert UME.build(concat, UMESettings(reduction="mean")).reduction.value == "mean"
    with pytest.raises(ConfigError, match="balances modalities"):
        UME(("audio",))


def test_concat_unimodal_logits_add_up_to_the_fused_logits() -> None:
    model = linear_model("concat")
    inputs = {"audio": torch.randn(4, 3), "image": torch.randn(4, 4)}
    out = model(inputs)
    assert torch.allclose(out.logits, out.unimodal_logits["audio"] + out.unimodal_logits["image"], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# UMT: the distillation loss


def hand_teacher() -> nn.Linear:
    """A Linear teacher for 'audio' (3 -> 2) with weights one can multiply by hand."""
    t = nn.Linear(3, 2)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        t.bias.copy_(torch.tensor([0.5, 0.0]))
    return t


def test_umt_adds_lambda_times_the_feature_mse_by_hand() -> None:
    umt = UMT({"audio": hand_teacher()}, weight=2.0, start_epoch=1, end_epoch=3)
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    # teacher features: [1 + 0 + 0 + .5, 0 - 2 + 0] = [1.5, -2]; [0 + 0 + 2 + .5, 0 - 1 + 1] = [2.5, 0]
    phi = torch.tensor([[1.0, -1.0], [2.0, 1.0]], requires_grad=True)
    mse = ((1.0 - 1.5) ** 2 + (-1.0 + 2.0) ** 2 + (2.0 - 2.5) ** 2 + (1.0 - 0.0) ** 2) / 4
    output = SimpleNamespace(features={"audio": phi, "image": torch.zeros(2, 2)})
    base = torch.tensor(0.7, requires_grad=True)
    step = BalanceStep(torch.tensor([0, 1]), epoch=2, inputs={"audio": x, "image": torch.zeros(2, 4)})
    umt.before_forward(step)
    out = umt.adjust_loss(step, output, base)
    assert float(out.detach()) == pytest.approx(0.7 + 2.0 * mse)
    assert step.metrics == {"balance/umt/weight": 2.0, "balance/umt/distill/audio": pytest.approx(mse)}
    out.backward()
    # d/dphi of λ·mean((phi - t)^2) = λ·2(phi - t)/(B·d)
    expected = 2.0 * 2 * (phi.detach() - torch.tensor([[1.5, -2.0], [2.5, 0.0]])) / 4
    assert torch.allclose(phi.grad, expected)
    assert all(p.grad is None for p in umt.teachers["audio"].parameters())

    for epoch in (0, 4):  # outside [start_epoch, end_epoch]: the loss as given
        step = BalanceStep(torch.tensor([0, 1]), epoch=epoch, inputs={"audio": x})
        assert umt.adjust_loss(step, output, base) is base
        assert step.metrics == {"balance/umt/weight": 0.0}


def test_umt_distils_the_features_it_sees_before_later_transforms() -> None:
    umt = UMT({"audio": hand_teacher()}, weight=1.0, end_epoch=None)
    x = torch.tensor([[1.0, 2.0, 0.0]])
    step = BalanceStep(torch.tensor([0]), epoch=100, inputs={"audio": x})
    umt.before_forward(step)
    seen = {"audio": torch.tensor([[1.5, -2.0]])}  # equal to the teacher's: no distillation loss
    umt.transform_features(step, seen)
    later = SimpleNamespace(features={"audio": torch.zeros(1, 2)})  # e.g. dropped by a later method
    assert float(umt.adjust_loss(step, later, torch.tensor(0.0))) == pytest.approx(0.0)


def test_umt_teachers_are_frozen_and_not_saved_in_its_state() -> None:
    teacher = hand_teacher()
    umt = UMT({"audio": teacher})
    umt.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert list(umt.state_dict()) == ["_extra_state"]
    state = umt.state_dict()
    UMT({"audio": hand_teacher()}).load_state_dict(state)  # same weights: accepted
    other = hand_teacher()
    with torch.no_grad():
        other.bias.add_(1.0)
    with pytest.raises(CheckpointError, match=r"teacher.*audio.*differ"):
        UMT({"audio": other}).load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# UMT: loading teachers


def test_umt_loading_errors_name_the_problem(tmp_path: Path) -> None:
    model = linear_model("sum")
    with pytest.raises(ConfigError, match=r"teachers.audio: no teacher checkpoint at .*missing.pt"):
        UMT.build(model, UMTSettings(teachers={"audio": str(tmp_path / "missing.pt")}))
    ckpt = tmp_path / "audio.pt"
    torch.save(
        {"model": {"encoders.audio.weight": torch.zeros(2, 3), "encoders.audio.bias": torch.ones(2)}}, ckpt
    )
    with pytest.raises(
        ConfigError, match=r"has no encoder for modality 'image' \(it has encoders for audio\)"
    ):
        UMT.build(model, UMTSettings(teachers={"image": str(ckpt)}))
    with pytest.raises(ConfigError, match=r"video is not a modality of the model \(audio, image\)"):
        UMT.build(model, UMTSettings(teachers={"video": str(ckpt)}))
    wide = tmp_path / "wide.pt"
    torch.save(
        {"model": {"encoders.audio.weight": torch.zeros(5, 3), "encoders.audio.bias": torch.ones(5)}}, wide
    )
    with pytest.raises(
        ConfigError, match=r"does not fit .* has shapes weight \[5, 3\] \(expected \[2, 3\]\)"
    ):
        UMT.build(model, UMTSettings(teachers={"audio": str(wide)}))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        UMT.build(model, UMTSettings(teachers={"audio": str(other)}))
    with pytest.raises(ConfigError, match="balances modalities"):
        UMT.build(
            MultimodalClassifier({"audio": nn.Linear(3, 2)}, SumFusion(("audio",), {"audio": 2}, 3)),
            UMTSettings(teachers={"audio": str(ckpt)}),
        )
    umt = UMT.build(model, UMTSettings(teachers={"audio": str(ckpt)}))
    assert torch.equal(umt.teachers["audio"].bias, torch.ones(2))
    assert umt.teachers["audio"] is not model.encoders["audio"]


@pytest.fixture(scope="module")
def audio_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.pt`` of a tiny audio-only run (the teacher of the audio encoder)."""
    root = tmp_path_factory.mktemp("teacher")
    Trainer(
        tiny_experiment(root, "data.modalities=[audio]", "train.epochs=1", "train.probe=false"),
        progress=False,
    ).fit()
    path = root / "tiny" / "checkpoints" / "last.pt"
    assert path.is_file()
    return path


@pytest.mark.integration
def test_umt_loads_the_encoder_of_a_real_unimodal_checkpoint(tmp_path: Path, audio_teacher: Path) -> None:
    cfg = tiny_experiment(tmp_path, f"balance=[{{name: umt, teachers: {{audio: {audio_teacher}}}}}]")
    trainer = Trainer(cfg, progress=False)
    umt = next(m for m in trainer.callbacks[0].methods if isinstance(m, UMT))
    saved = torch.load(audio_teacher, weights_only=True)["model"]
    teacher = umt.teachers["audio"].state_dict()
    assert teacher and set(teacher) == {
        k[len("encoders.audio.") :] for k in saved if k.startswith("encoders.audio.")
    }
    assert all(torch.equal(v.cpu(), saved[f"encoders.audio.{k}"]) for k, v in teacher.items())
    assert not umt.teachers["audio"].training
    # the multimodal model's own encoder is untouched (the teacher is a copy)
    assert not torch.equal(
        trainer.model.encoders["audio"].state_dict()[next(iter(teacher))].cpu(),
        next(iter(teacher.values())).cpu(),
    )
    again = load_teacher(trainer.model.encoders["audio"], audio_teacher, "audio")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), teacher.values(), strict=True))


# --------------------------------------------------------------------------------------------------
# config


def test_config_names_the_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balance\[0\]\.teachers: missing"):
        tiny_experiment(tmp_path, "balance=[umt]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.teachers: expected"):
        tiny_experiment(tmp_path, "balance=[{name: umt, teachers: [audio]}]")
    with pytest.raises(ConfigError, match=r"balance\[1\]\.weight: must be >= 0"):
        tiny_experiment(tmp_path, "balance=[ume, {name: umt, teachers: {audio: a.pt}, weight: -1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.weigth'; did you mean 'balance\[0\]\.weight'"):
        tiny_experiment(tmp_path, "balance=[{name: umt, teachers: {audio: a.pt}, weigth: 1}]")
    with pytest.raises(ConfigError, match=r"umt teachers: is empty"):
        tiny_experiment(tmp_path, "balance=[{name: umt, teachers: {}}]")
    with pytest.raises(ConfigError, match=r"end_epoch \(1\) must be >= start_epoch \(2\)"):
        tiny_experiment(
            tmp_path, "balance=[{name: umt, teachers: {audio: a.pt}, start_epoch: 2, end_epoch: 1}]"
        )
    with pytest.raises(ConfigError, match=r"balance\[0\]\.reduction: 'max' is not a valid choice"):
        tiny_experiment(tmp_path, "balance=[{name: ume, reduction: max}]")
    cfg = tiny_experiment(
        tmp_path, "balance=[{name: umt, teachers: {audio: a.pt}, end_epoch: null, weight: 1}]"
    )
    settings = cfg.balance[0].settings
    assert isinstance(settings, UMTSettings)
    assert (settings.teachers, settings.weight, settings.end_epoch) == ({"audio": "a.pt"}, 1.0, None)


def test_ume_config_refuses_a_non_additive_head_at_build(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.fusion=concat or model\.fusion=sum"):
        Trainer(tiny_experiment(tmp_path, "balance=[ume]", "model.fusion=film"), progress=False)


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_ume_trains_logs_and_resumes_exactly(tmp_path: Path) -> None:
    steps = train_interrupted_and_resumed(tmp_path, "balance=[ume]", "train.probe=false").steps
    assert {"balance/ume/loss/audio", "balance/ume/loss/image"} <= set(steps[-1])
    assert all(r["balance/ume/loss/audio"] > 0 and r["balance/ume/loss/image"] > 0 for r in steps)
    # the logged training loss is the UME objective, the sum of the unimodal losses
    for r in steps:
        assert r["train/loss"] == pytest.approx(
            r["balance/ume/loss/audio"] + r["balance/ume/loss/image"], rel=1e-5
        )


@pytest.mark.integration
def test_umt_trains_logs_and_resumes_exactly(tmp_path: Path, audio_teacher: Path) -> None:
    balance = f"{{name: umt, teachers: {{audio: {audio_teacher}}}, end_epoch: 1}}"
    steps = train_interrupted_and_resumed(tmp_path, f"balance=[{balance}]", "train.probe=false").steps
    assert {"balance/umt/weight"} <= set(steps[-1])
    assert {r["epoch"] for r in steps} == {0, 1, 2}
    for r in steps:  # distillation in epochs 0 and 1 (end_epoch: 1, inclusive), not in epoch 2
        if r["epoch"] <= 1:
            assert r["balance/umt/weight"] == 10.0 and r["balance/umt/distill/audio"] > 0
        else:
            assert r["balance/umt/weight"] == 0.0 and "balance/umt/distill/audio" not in r
    assert not any("balance/umt/distill/image" in r for r in steps)
