"""Per-sample gradient realignment against hand-computed projections."""

from __future__ import annotations

import pytest
import torch

from harmonia.gradients.realign import realign, row_cosine


def test_pcgrad_projects_conflicting_rows_from_the_original_vectors() -> None:
    g_a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    g_b = torch.tensor([[-1.0, 1.0], [1.0, 0.0]])
    new_a, new_b, cos = realign(g_a, g_b, "pcgrad")
    # row 0 conflicts: a·b = -1, |b|² = 2, |a|² = 1
    #   a' = (1,0) - (-1/2)(-1,1) = (0.5, 0.5);  b' = (-1,1) - (-1/1)(1,0) = (0, 1)   (from the originals)
    # row 1 agrees (cos = 1/√2): unchanged
    torch.testing.assert_close(new_a, torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    torch.testing.assert_close(new_b, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(cos, torch.tensor([-(2**-0.5), 2**-0.5]))
    # after projection each is orthogonal to the other's original
    assert abs(float(new_a[0] @ g_b[0])) < 1e-6 and abs(float(new_b[0] @ g_a[0])) < 1e-6


def test_gradvac_raises_each_cosine_to_the_target_and_leaves_the_others() -> None:
    g = torch.Generator().manual_seed(0)
    g_a, g_b = (
        torch.randn(64, 5, generator=g, dtype=torch.float64),
        torch.randn(64, 5, generator=g, dtype=torch.float64),
    )
    new_a, new_b, cos = realign(g_a, g_b, "gradvac", target=0.3)
    below = cos < 0.3
    torch.testing.assert_close(
        row_cosine(new_a, g_b)[below], torch.full((int(below.sum()),), 0.3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        row_cosine(new_b, g_a)[below], torch.full((int(below.sum()),), 0.3, dtype=torch.float64)
    )
    torch.testing.assert_close(new_a[~below], g_a[~below])


def test_none_leaves_gradients_and_reports_cosines() -> None:
    g_a, g_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, -2.0]])
    new_a, new_b, cos = realign(g_a, g_b, "none")
    assert new_a is g_a and new_b is g_b and float(cos) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        realign(g_a, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="is not a valid RealignRule"):
        realign(g_a, g_b, "magic")


def test_curriculum_thresholds_follow_the_schedule_exactly() -> None:
    import math

    from harmonia.gradients.curriculum import ConflictCurriculum

    linear = ConflictCurriculum(start=0.0, end=-1.0, steps=100)
    assert [linear.threshold(t) for t in (0, 25, 50, 100, 500)] == [0.0, -0.25, -0.5, -1.0, -1.0]
    cosine = ConflictCurriculum(start=0.5, end=-1.0, steps=10, shape="cosine")
    for t in range(12):
        u = min(t / 10, 1)
        assert cosine.threshold(t) == pytest.approx(0.5 - 1.5 * (1 - math.cos(math.pi * u)) / 2)
    cos = torch.tensor([0.3, -0.2, 0.9, -0.7])
    assert linear.keep_mask(cos, 0).tolist() == [True, False, True, False]
    assert linear.keep_mask(cos, 50).tolist() == [True, True, True, False]
    assert linear.keep_mask(cos, 100).all()
    top = ConflictCurriculum(steps=10, keep="top_fraction", start_fraction=0.25)
    assert top.keep_mask(cos, 0).tolist() == [False, False, True, False]  # ⌈0.25·4⌉ = 1
    assert top.keep_mask(cos, 5).tolist() == [True, True, True, False]  # p = 0.625 -> 3
    assert ConflictCurriculum(start=1.0, end=1.0).keep_mask(cos, 0).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="end <= start"):
        ConflictCurriculum(start=-1.0, end=0.0)
