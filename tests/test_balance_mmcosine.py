"""MMCosine (Xu et al., ICASSP 2023) checked against an independent computation of its cosine logits."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harmonia.app.train import Trainer
from harmonia.balance import BalanceStep, MMCosine, MMCosineSettings
from harmonia.errors import ConfigError
from harmonia.models import MultimodalClassifier
from harmonia.models.fusion import ConcatFusion, CosineFusion, FiLMFusion, SumFusion
from helpers import tiny_experiment, train_interrupted_and_resumed

DIMS = {"audio": 4, "image": 3}


def ref_cosine_logits(
    weights: dict[str, list[list[float]]], features: dict[str, list[list[float]]], scale: float
) -> list[list[float]]:
    """s · Σ_m cos(W^m_c, φ^m) with Python floats (normalising by hand)."""

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    names = list(weights)
    batch = len(features[names[0]])
    classes = len(weights[names[0]])
    out = [[0.0] * classes for _ in range(batch)]
    for m in names:
        for i in range(batch):
            phi = unit(features[m][i])
            for c in range(classes):
                w = unit(weights[m][c])
                out[i][c] += scale * sum(a * b for a, b in zip(w, phi, strict=True))
    return out


def _features(batch: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: 3.0 * torch.randn(batch, d, generator=g, dtype=torch.float64) for m, d in DIMS.items()}


def _model(kind: type = ConcatFusion) -> SimpleNamespace:
    torch.manual_seed(0)
    fusion = kind(tuple(DIMS), DIMS, 6)
    return SimpleNamespace(modalities=tuple(DIMS), fusion=fusion.double())


# --------------------------------------------------------------------------------------------------
# maths


@pytest.mark.parametrize("kind", [ConcatFusion, SumFusion])
def test_build_replaces_the_head_by_cosine_logits_of_the_old_weights(kind: type) -> None:
    model = _model(kind)
    old = model.fusion
    if kind is ConcatFusion:
        blocks = {"audio": old.fc.weight[:, :4], "image": old.fc.weight[:, 4:]}
    else:
        blocks = {m: old.heads[m].weight for m in DIMS}
    blocks = {m: w.detach().clone() for m, w in blocks.items()}
    method = MMCosine.build(model, MMCosineSettings(scale=7.5))  # type: ignore[arg-type]
    assert isinstance(model.fusion, CosineFusion) and method.head is model.fusion
    assert model.fusion.scale == 7.5
    assert all(model.fusion.heads[m].bias is None for m in DIMS)
    features = _features()
    want = ref_cosine_logits(
        {m: w.tolist() for m, w in blocks.items()}, {m: f.tolist() for m, f in features.items()}, 7.5
    )
    got = model.fusion(features)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    uni = model.fusion.unimodal_logits(features)
    torch.testing.assert_close(uni["audio"] + uni["image"], got)
    for m in DIMS:  # each unimodal logit is s·cos, within [-s, s]
        alone = ref_cosine_logits({m: blocks[m].tolist()}, {m: features[m].tolist()}, 7.5)
        torch.testing.assert_close(uni[m], torch.tensor(alone, dtype=torch.float64))
        assert float(uni[m].detach().abs().max()) <= 7.5 + 1e-9


def test_logits_ignore_feature_and_weight_norms() -> None:
    head = CosineFusion(tuple(DIMS), DIMS, 6).double()
    features = _features()
    before = head(features)
    with torch.no_grad():
        head.heads["audio"].weight.mul_(torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1)
    scaled = {m: f * (5.0 if m == "image" else 0.01) for m, f in features.items()}
    torch.testing.assert_close(head(scaled), before)


def test_evaluated_model_output_is_the_cosine_logits() -> None:
    torch.manual_seed(3)
    cfg_dims = {"audio": 16, "image": 16}
    encoders = {
        m: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, d)) for m, d in cfg_dims.items()
    }
    model = MultimodalClassifier(encoders, SumFusion(tuple(cfg_dims), cfg_dims, 5))
    MMCosine.build(model)
    model.eval()
    inputs = {m: torch.randn(4, 8) for m in cfg_dims}
    out = model(inputs)
    feats = {m: encoders[m](inputs[m]) for m in cfg_dims}
    weights = {m: model.fusion.heads[m].weight.tolist() for m in cfg_dims}
    want = ref_cosine_logits(weights, {m: f.tolist() for m, f in feats.items()}, 10.0)
    torch.testing.assert_close(out.logits, torch.tensor(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(out.unimodal_logits.values()), out.logits)
    # the head is part of the model: its weights are model parameters and in its state_dict
    assert {f"fusion.heads.{m}.weight" for m in cfg_dims} <= set(model.state_dict())
    assert not any(
        k.startswith("fusion.fc") or (k.endswith(".bias") and "fusion" in k) for k in model.state_dict()
    )


def test_gradients_reach_the_cosine_head_and_the_logs() -> None:
    model = _model(SumFusion)
    method = MMCosine.build(model)  # type: ignore[arg-type]
    features = {m: f.requires_grad_() for m, f in _features(seed=1).items()}
    labels = torch.tensor([0, 1, 2, 3, 4])
    logits = model.fusion(features)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert all(model.fusion.heads[m].weight.grad is not None for m in DIMS)
    # the cosine is invariant to the feature norm, so its gradient is orthogonal to the feature
    for m in DIMS:
        radial = (features[m].grad * features[m]).sum(dim=1)
        torch.testing.assert_close(radial, torch.zeros_like(radial), atol=1e-10, rtol=0)
    step = BalanceStep(labels, epoch=0)
    uni = model.fusion.unimodal_logits(features)
    method.after_backward(step, SimpleNamespace(logits=logits, unimodal_logits=uni))
    for m in DIMS:
        w = model.fusion.heads[m].weight.detach()
        cos_true = [
            float(w[y] @ features[m][i].detach()) / float(w[y].norm() * features[m][i].detach().norm())
            for i, y in enumerate(labels.tolist())
        ]
        assert step.metrics[f"balance/mmcosine/cos/{m}"] == pytest.approx(sum(cos_true) / len(cos_true))
        assert step.metrics[f"balance/mmcosine/weight_norm/{m}"] == pytest.approx(float(w.norm(dim=1).mean()))


def test_unsupported_heads_and_settings_are_refused(tmp_path: Path) -> None:
    model = SimpleNamespace(modalities=tuple(DIMS), fusion=FiLMFusion(tuple(DIMS), DIMS, 6, hidden_dim=4))
    with pytest.raises(ConfigError, match=r"model\.fusion=concat"):
        MMCosine.build(model)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scale"):
        CosineFusion(tuple(DIMS), DIMS, 6, scale=0.0)
    with pytest.raises(ConfigError, match=r"balance\[0\]\.scale"):
        tiny_experiment(tmp_path, "balance=[{name: mmcosine, scale: 0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.scale"):
        tiny_experiment(tmp_path, "balance=[{name: mmcosine, scale: big}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.margin"):
        tiny_experiment(tmp_path, "balance=[{name: mmcosine, margin: 0.1}]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: mmcosine, scale: 15}]")
    assert cfg.balance[0].settings == MMCosineSettings(scale=15.0)


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_mmcosine_training_logs_evaluates_cosine_logits_and_resumes_exactly(tmp_path: Path) -> None:
    run = train_interrupted_and_resumed(tmp_path, "balance=[mmcosine]", "train.probe=false")
    full, steps = run.full, run.steps
    assert isinstance(full.model.fusion, CosineFusion)
    for m in full.modalities:
        keys = {f"balance/mmcosine/cos/{m}", f"balance/mmcosine/weight_norm/{m}"}
        assert all(keys <= set(r) for r in steps)
        assert all(-1.0 <= r[f"balance/mmcosine/cos/{m}"] <= 1.0 for r in steps)
    # the model's (evaluated) output is s·Σ_m cos on real features
    batch = next(iter(full.train_loader))
    full.model.eval()
    with torch.no_grad():
        inputs = {m: x.to(full.device) for m, x in batch["inputs"].items()}
        out = full.model(inputs)
        feats = {m: full.model.encoders[m](inputs[m]) for m in full.modalities}
    weights = {m: full.model.fusion.heads[m].weight.tolist() for m in full.modalities}
    want = ref_cosine_logits(weights, {m: f.tolist() for m, f in feats.items()}, 10.0)
    torch.testing.assert_close(out.logits, torch.tensor(want), rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_film_model_is_refused_by_the_trainer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.fusion=concat"):
        Trainer(tiny_experiment(tmp_path, "balance=[mmcosine]", "model.fusion=film"), progress=False)
