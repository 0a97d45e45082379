"""Contrastive losses against direct loop computations; the cross-rank gather in a real 2-process group."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmonia.losses import VATTLoss, finegrained_nce, mil_nce, nce
from harmonia.metrics.retrieval import recall_at_k, retrieval_metrics


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def nce_by_loops(a: torch.Tensor, b: torch.Tensor, tau: float) -> list[float]:
    n = a.shape[0]
    out = []
    for i in range(n):
        row = [float(a[i] @ b[j]) / tau for j in range(n)]
        col = [float(b[i] @ a[j]) / tau for j in range(n)]
        out.append(0.5 * ((_logsumexp(row) - row[i]) + (_logsumexp(col) - col[i])))
    return out


def mil_nce_by_loops(v: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float) -> list[float]:
    n, k = t.shape[:2]
    out = []
    for i in range(n):
        positives = [float(v[i] @ t[i, c]) / tau for c in range(k) if mask[i, c]]
        denominator = [float(v[i] @ t[j, c]) / tau for j in range(n) for c in range(k) if mask[j, c]]
        denominator += [float(v[j] @ t[i, c]) / tau for j in range(n) for c in range(k) if mask[i, c]]
        out.append(_logsumexp(denominator) - _logsumexp(positives))
    return out


def test_nce_equals_a_loop_over_samples() -> None:
    a, b = _unit(7, 5, seed=1), _unit(7, 5, seed=2)
    per_sample = nce(a, b, temperature=0.1, reduction="none")
    assert per_sample.shape == (7,)
    torch.testing.assert_close(per_sample, torch.tensor(nce_by_loops(a, b, 0.1), dtype=torch.float64))
    assert float(nce(a, b, 0.1)) == pytest.approx(float(per_sample.mean()))
    assert float(nce(a, b, 0.1, reduction="sum")) == pytest.approx(float(per_sample.sum()))


def test_mil_nce_equals_a_loop_over_samples_with_padded_candidates() -> None:
    v, t = _unit(6, 4, seed=3), _unit(6, 3, 4, seed=4)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[1, 2] = mask[4, 0] = mask[4, 1] = False
    per_sample = mil_nce(v, t, mask, temperature=0.2, reduction="none")
    torch.testing.assert_close(
        per_sample, torch.tensor(mil_nce_by_loops(v, t, mask, 0.2), dtype=torch.float64)
    )
    assert float(mil_nce(v, t, mask, 0.2)) == pytest.approx(float(per_sample.mean()))
    # a padded candidate never matters, whatever it holds
    t2 = t.clone()
    t2[1, 2] = _unit(4, seed=9)
    torch.testing.assert_close(mil_nce(v, t2, mask, 0.2, reduction="none"), per_sample)


def test_mil_nce_with_one_candidate_is_not_infonce_but_close() -> None:
    # with K = 1 MIL-NCE's denominator holds the positive twice: ℓ = lse(rows ∪ cols) - s_ii
    v, t = _unit(5, 4, seed=5), _unit(5, 1, 4, seed=6)
    expected = mil_nce_by_loops(v, t, torch.ones(5, 1, dtype=torch.bool), 0.1)
    torch.testing.assert_close(
        mil_nce(v, t, temperature=0.1, reduction="none"), torch.tensor(expected, dtype=torch.float64)
    )


def test_loss_input_errors() -> None:
    a = _unit(4, 3)
    with pytest.raises(ValueError, match="paired rows of one shape"):
        nce(a, _unit(5, 3))
    with pytest.raises(ValueError, match="2 dims"):
        nce(a[0], a[0])
    with pytest.raises(ValueError, match="reduction must be"):
        nce(a, a, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="text must be"):
        mil_nce(a, _unit(4, 2, 5))
    with pytest.raises(ValueError, match="at least one real text candidate"):
        mil_nce(a, _unit(4, 2, 3), torch.tensor([[True, False], [False, False], [True, True], [True, True]]))


def test_vatt_loss_weights_the_two_means() -> None:
    va, audio, vt, text = (
        _unit(6, 4, seed=1),
        _unit(6, 4, seed=2),
        _unit(6, 4, seed=3),
        _unit(6, 2, 4, seed=4),
    )
    out = VATTLoss(temperature=0.1, weight_va=2.0, weight_vt=0.5)(va, audio, vt, text)
    expected = 2.0 * nce(va, audio, 0.1) + 0.5 * mil_nce(vt, text, temperature=0.1)
    torch.testing.assert_close(out.loss, expected)
    assert set(out.per_sample) == {"va", "vt"} and out.per_sample["vt"].shape == (6,)


def test_recall_at_k_by_hand_including_ties() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    # query 0: its match (score 1) ties with gallery 1 -> rank 1 or 2, R@1 = 1/2, R@2 = 1
    # query 1: match scores 0; gallery 2 scores 0.8 (higher), gallery 0 scores 0 (tie) -> R@1 = 0, R@2 = 1/2
    # query 2: match scores 0.6; both others score 1 (higher) -> rank 3
    r = recall_at_k(q, g, ks=(1, 2, 3))
    assert r[1] == pytest.approx((0.5 + 0 + 0) / 3)
    assert r[2] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r[3] == pytest.approx(1.0)
    metrics = retrieval_metrics({("video", "text"): (q, g)}, ks=(1,))
    assert set(metrics) == {"video_to_text/R@1", "text_to_video/R@1"}


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b = _unit(8, 5, seed=1), _unit(8, 5, seed=2)
        v, t = _unit(8, 5, seed=3), _unit(8, 3, 5, seed=4)
        half = slice(rank * 4, (rank + 1) * 4)
        local = [x[half].clone().requires_grad_() for x in (a, b, v, t)]
        fine = [x[half].clone().requires_grad_() for x in _fine_inputs()]
        per_va = nce(local[0], local[1], 0.1, reduction="none")
        per_vt = mil_nce(local[2], local[3], temperature=0.1, reduction="none")
        per_fine = _fine_losses(*fine, mask=_fine_mask()[half])
        (per_va.mean() + per_vt.mean() + sum(x.mean() for x in per_fine)).backward()
        torch.save(
            {
                "va": per_va.detach(),
                "vt": per_vt.detach(),
                "fine": [x.detach() for x in per_fine],
                "grads": [x.grad for x in local + fine],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _fine_inputs() -> list[torch.Tensor]:
    return [_unit(8, 3, 5, seed=5), _unit(8, 2, 5, seed=6), _unit(8, 2, 3, 5, seed=7)]


def _fine_mask() -> torch.Tensor:
    mask = torch.ones(8, 2, 3, dtype=torch.bool)
    mask[1, 1] = False  # a padded candidate
    mask[6, 0, 2] = False  # a padded word
    return mask


def _fine_losses(
    a: torch.Tensor, b: torch.Tensor, bags: torch.Tensor, mask: torch.Tensor
) -> list[torch.Tensor]:
    return [
        finegrained_nce(a, b, temperature=0.1, reduction="none"),
        finegrained_nce(a, bags, None, mask, 0.1, direction="over_a", reduction="none", chunk_size=2),
    ]


@pytest.mark.integration
def test_gathered_negatives_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """2 gloo processes, 4 samples each (coarse and fine-grained losses): same per-sample losses as 1
    process on 8; and each rank's
    embedding gradient is R x the single-process one, so DDP's average over ranks gives the same update."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = _unit(8, 5, seed=1).requires_grad_(), _unit(8, 5, seed=2).requires_grad_()
    v, t = _unit(8, 5, seed=3).requires_grad_(), _unit(8, 3, 5, seed=4).requires_grad_()
    per_va = nce(a, b, 0.1, reduction="none")
    per_vt = mil_nce(v, t, temperature=0.1, reduction="none")
    fine = [x.requires_grad_() for x in _fine_inputs()]
    per_fine = _fine_losses(*fine, mask=_fine_mask())
    (per_va.mean() + per_vt.mean() + sum(x.mean() for x in per_fine)).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        half = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(got["va"], per_va.detach()[half])
        torch.testing.assert_close(got["vt"], per_vt.detach()[half])
        for value, full_value in zip(got["fine"], per_fine, strict=True):
            torch.testing.assert_close(value, full_value.detach()[half])
        for grad, full in zip(got["grads"], (a, b, v, t, *fine), strict=True):
            torch.testing.assert_close(grad, 2 * full.grad[half])


@pytest.mark.parametrize("loss", ["nce", "mil_nce"])
def test_own_gradients_only_gives_each_sample_its_own_loss_gradient(loss: str) -> None:
    a, b = _unit(5, 4, seed=1).requires_grad_(), _unit(5, 2, 4, seed=2).requires_grad_()

    def per_sample(own: bool) -> torch.Tensor:
        if loss == "nce":
            return nce(a, b[:, 0], 0.1, reduction="none", own_gradients_only=own)
        return mil_nce(a, b, temperature=0.1, reduction="none", own_gradients_only=own)

    values = per_sample(True)
    torch.testing.assert_close(values, per_sample(False))  # same values
    (grad_a,) = torch.autograd.grad(values.sum(), a)
    for i in range(5):  # row i of the gradient of the sum = gradient of sample i's own loss w.r.t. a_i
        (own,) = torch.autograd.grad(per_sample(False)[i], a)
        torch.testing.assert_close(grad_a[i], own[i])
