"""Diagnosing & Re-learning (ECCV 2024): purity, α = tanh(λ·|P_train - P_val|), the soft
re-initialisation, the deterministic k-means, the official schedule, end-to-end training with an exact
resume, the same re-initialisation on every rank (2 gloo processes) and config validation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from harmonia.balance import Relearn, RelearnSettings, kmeans, purity, relearn_alpha, soft_reinit
from harmonia.balance.relearn import minmax_scale
from harmonia.errors import ConfigError
from helpers import Interrupt, tiny_experiment

# --------------------------------------------------------------------------------------------------
# maths


def test_purity_of_hand_made_clusterings() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    # cluster 5: {0,0,1} -> 2; cluster 7: {0,1,2} -> 1; cluster 9: {2,2} -> 2  => 5/8
    clusters = torch.tensor([5, 5, 7, 5, 7, 7, 9, 9])
    assert purity(clusters, labels) == pytest.approx(5 / 8)
    assert purity(labels * 3 + 1, labels) == 1.0  # one cluster per class, any cluster ids
    assert purity(torch.zeros(8, dtype=torch.long), labels) == pytest.approx(3 / 8)  # majority class
    assert purity(torch.arange(8), labels) == 1.0  # singletons are pure


def test_alpha_is_tanh_of_lambda_times_the_purity_gap() -> None:
    for p_train, p_val, lam in [(0.9, 0.6, 3.0), (0.5, 0.7, 3.0), (0.8, 0.8, 3.0), (1.0, 0.2, 0.5)]:
        assert relearn_alpha(p_train, p_val, lam) == pytest.approx(math.tanh(lam * abs(p_train - p_val)))
    assert relearn_alpha(0.9, 0.6, 0.0) == 0.0


def test_soft_reinit_interpolates_towards_the_initial_parameters() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    init = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    current = [p.detach().clone() for p in layer.parameters()]
    soft_reinit(list(layer.parameters()), init, 0.3)
    for p, c, i in zip(layer.parameters(), current, init, strict=True):
        torch.testing.assert_close(p.detach(), 0.7 * c + 0.3 * i)


def test_kmeans_finds_well_separated_clusters_deterministically() -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.arange(4).repeat_interleave(25)
    x = centres[truth] + 0.3 * torch.randn(100, 2, generator=g)
    labels, found = kmeans(x, 4, seed=3)
    assert purity(labels, truth) == 1.0
    assert torch.unique(labels).numel() == 4
    key = lambda c: (c[:, 0] * 100 + c[:, 1]).argsort()  # noqa: E731  (sort both sets of centres)
    torch.testing.assert_close(found[key(found)], centres[key(centres)].double(), atol=0.2, rtol=0)
    again, _ = kmeans(x, 4, seed=3)
    assert torch.equal(labels, again)


def test_minmax_scale_maps_each_column_to_minus_one_one() -> None:
    x = torch.tensor([[0.0, 5.0, 2.0], [2.0, 5.0, 4.0], [1.0, 5.0, 3.0]])
    expected = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(minmax_scale(x), expected)


# --------------------------------------------------------------------------------------------------
# the method


def _two_encoders() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"audio": nn.Linear(4, 3), "image": nn.Linear(4, 3)}


def _split(n: int, separable: dict[str, bool], seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features of two classes: well separated for the modalities marked ``True``, noise otherwise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    feats = {}
    for m, sep in separable.items():
        noise = torch.randn(n, 3, generator=g)
        feats[m] = noise + (10.0 * y[:, None] if sep else 0.0)
    return feats, y


def test_schedule_is_the_official_one() -> None:
    r = Relearn(_two_encoders(), num_classes=2, interval=20, max_reinits=3)
    assert [e for e in range(100) if r.fires_after(e)] == [20, 40, 60]
    r = Relearn(_two_encoders(), num_classes=2, interval=1, max_reinits=2)
    assert [e for e in range(5) if r.fires_after(e)] == [1, 2]


def test_epoch_end_diagnoses_each_modality_and_reinitialises_by_its_own_gap() -> None:
    encoders = _two_encoders()
    r = Relearn(encoders, num_classes=2, interval=1, lam=3.0)
    init = {m: [p.detach().clone() for p in e.parameters()] for m, e in encoders.items()}
    with torch.no_grad():
        for e in encoders.values():
            for p in e.parameters():
                p.add_(1.0)
    current = {m: [p.detach().clone() for p in e.parameters()] for m, e in encoders.items()}
    # audio separable on train only (gap ~ 0.5), image separable on both (gap 0)
    splits = {
        "train": _split(40, {"audio": True, "image": True}, seed=0),
        "val": _split(40, {"audio": False, "image": True}, seed=1),
    }
    metrics: dict[str, float] = {}
    r.on_epoch_end(0, splits.__getitem__, metrics)
    assert metrics == {}  # epoch 0 never fires
    r.on_epoch_end(1, splits.__getitem__, metrics)
    assert metrics["balance/relearn/purity_train/audio"] == 1.0
    assert metrics["balance/relearn/purity_val/image"] == 1.0
    p_val_audio = metrics["balance/relearn/purity_val/audio"]
    assert p_val_audio < 0.8
    alpha = {"audio": math.tanh(3.0 * (1.0 - p_val_audio)), "image": 0.0}
    for m in ("audio", "image"):
        assert metrics[f"balance/relearn/alpha/{m}"] == pytest.approx(alpha[m])
        assert metrics[f"balance/relearn/gap/{m}"] == pytest.approx(
            1.0 - (p_val_audio if m == "audio" else 1.0)
        )
        for p, c, i in zip(encoders[m].parameters(), current[m], init[m], strict=True):
            torch.testing.assert_close(p.detach(), (1 - alpha[m]) * c + alpha[m] * i)


def test_initial_parameters_are_buffers_that_resume() -> None:
    encoders = _two_encoders()
    r = Relearn(encoders, num_classes=2)
    state = r.state_dict()
    assert set(state) == {"init_0_0", "init_0_1", "init_1_0", "init_1_1"}
    other = Relearn(_two_encoders() | {"audio": nn.Linear(4, 3)}, num_classes=2)  # different θ_0 for audio
    other.load_state_dict(state)
    for m in ("audio", "image"):
        for a, b in zip(other.initial(m), r.initial(m), strict=True):
            assert torch.equal(a, b)
    assert not any(name.startswith("encoders") for name in state)  # the encoders themselves are not state


# --------------------------------------------------------------------------------------------------
# distributed: rank 0's diagnosis for every rank


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    encoders = _two_encoders()
    r = Relearn(encoders, num_classes=2, interval=1)
    with torch.no_grad():
        for e in encoders.values():
            for p in e.parameters():
                p.add_(1.0)
    # the ranks see different features: only rank 0's diagnosis may count
    val = {"audio": rank == 0, "image": rank == 1}
    splits = {"train": _split(40, {"audio": True, "image": True}, 0), "val": _split(40, val, 1)}
    metrics: dict[str, float] = {}
    r.on_epoch_end(1, splits.__getitem__, metrics)
    torch.save(
        {"metrics": metrics, "params": {m: list(e.parameters()) for m, e in encoders.items()}},
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_every_rank_applies_rank_zeros_reinitialisation(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from harmonia.app.train.distributed import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["balance/relearn/alpha/audio"] == 0.0  # rank 0: audio separable on val
    assert ranks[0]["metrics"]["balance/relearn/alpha/image"] > 0.5  # rank 0: image noise on val
    for m in ("audio", "image"):
        for a, b in zip(ranks[0]["params"][m], ranks[1]["params"][m], strict=True):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# config and end to end


def test_relearn_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balance\[0\]\.lam"):
        tiny_experiment(tmp_path, "balance=[{name: relearn, lam: -1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.interval"):
        tiny_experiment(tmp_path, "balance=[{name: relearn, interval: 0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.clusters"):
        tiny_experiment(tmp_path, "balance=[{name: relearn, clusters: 1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.beta"):
        tiny_experiment(tmp_path, "balance=[{name: relearn, beta: 1}]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: relearn, lam: 2, interval: 5, max_reinits: 1}]")
    assert cfg.balance[0].settings == RelearnSettings(lam=2, interval=5, max_reinits=1)


@pytest.mark.integration
def test_relearn_training_logs_purity_and_alpha_and_resumes_exactly(tmp_path: Path) -> None:
    from harmonia.app.logs import read_metrics
    from harmonia.app.train import Trainer

    overrides = ("balance=[{name: relearn, interval: 1, n_init: 2}]", "train.epochs=3", "train.probe=false")
    full = Trainer(tiny_experiment(tmp_path / "a", *overrides), progress=False)
    relearn = full.callbacks[0].methods[0]  # type: ignore[attr-defined]
    initial = {m: [p.detach().clone() for p in relearn.initial(m)] for m in relearn.modalities}
    full_result = full.fit()
    epochs = [r for r in read_metrics(tmp_path / "a" / "tiny" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 3
    assert not any(k.startswith("balance/relearn") for k in epochs[0])  # epoch 0 never fires
    for record in epochs[1:]:
        for m in ("audio", "image"):
            for key in ("purity_train", "purity_val", "gap", "alpha"):
                value = record[f"balance/relearn/{key}/{m}"]
                assert math.isfinite(value) and 0 <= value <= 1
    for m in relearn.modalities:  # θ_0 is untouched by training and by the re-initialisations
        for a, b in zip(relearn.initial(m), initial[m], strict=True):
            assert torch.equal(a, b)

    cfg = tiny_experiment(tmp_path / "b", *overrides)
    with pytest.raises(KeyboardInterrupt):  # in epoch 2, after the re-initialisation of epoch 1
        Trainer(cfg, [Interrupt(at_step=2 * len(full.train_loader) + 1)], progress=False).fit()
    resumed = Trainer(cfg, resume=True, progress=False).fit()
    assert resumed.test == full_result.test
