"""Fine-grained contrastive loss: against a loop reference, the coarse losses at K = J = 1, padding,
chunking, gradcheck, and its attention maps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harmonia.losses import FineGrainedNCE, finegrained_nce, mil_nce, nce
from harmonia.losses.finegrained import paired_attention, token_scores


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


def score_by_loops(a, b, a_mask, b_mask, tau_att: float, direction: str) -> float:
    """s(a, b) of one pair, from the definition, over real tokens only."""
    ks = [k for k in range(a.shape[0]) if a_mask[k]]
    js = [j for j in range(b.shape[0]) if b_mask[j]]
    s = {(k, j): float(a[k] @ b[j]) for k in ks for j in js}
    over_a = sum(
        sum(w * s[k, j] for w, k in zip(_softmax([s[k, j] / tau_att for k in ks]), ks, strict=True))
        for j in js
    ) / len(js)
    over_b = sum(
        sum(w * s[k, j] for w, j in zip(_softmax([s[k, j] / tau_att for j in js]), js, strict=True))
        for k in ks
    ) / len(ks)
    return {"over_a": over_a, "over_b": over_b, "both": 0.5 * (over_a + over_b)}[direction]


def _masks(n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, length, generator=g) < 0.7
    mask[:, 0] = True
    return mask


@pytest.mark.parametrize("direction", ["both", "over_a", "over_b"])
def test_token_scores_equal_the_definition_by_loops(direction: str) -> None:
    a, b = _unit(3, 4, 5, seed=1), _unit(2, 3, 5, seed=2)
    am, bm = _masks(3, 4, seed=3), _masks(2, 3, seed=4)
    got = token_scores(a, b, am, bm, tau_att=0.2, direction=direction)
    for i in range(3):
        for j in range(2):
            assert float(got[i, j]) == pytest.approx(score_by_loops(a[i], b[j], am[i], bm[j], 0.2, direction))


def test_one_token_each_is_the_coarse_loss() -> None:
    a, b, bags = _unit(6, 1, 5, seed=1), _unit(6, 1, 5, seed=2), _unit(6, 3, 1, 5, seed=3)
    bag_mask = torch.ones(6, 3, 1, dtype=torch.bool)
    bag_mask[2, 1:] = False  # clip 2 has one candidate
    pairs = finegrained_nce(a, b, temperature=0.1, reduction="none")
    torch.testing.assert_close(pairs, nce(a[:, 0], b[:, 0], 0.1, reduction="none"))
    mil = finegrained_nce(a, bags, None, bag_mask, temperature=0.1, reduction="none")
    torch.testing.assert_close(mil, mil_nce(a[:, 0], bags[:, :, 0], bag_mask[..., 0], 0.1, reduction="none"))


def test_attention_sums_to_one_over_real_tokens() -> None:
    a, b = _unit(4, 5, 6, seed=1), _unit(4, 3, 6, seed=2)
    am, bm = _masks(4, 5, seed=3), _masks(4, 3, seed=4)
    att = paired_attention(a, b, am, bm, tau_att=0.1)
    # over_a: for each real token j of b, weights over a's real tokens sum to one; padding gets zero
    torch.testing.assert_close(att["over_a"].sum(1), bm.double())
    assert float(att["over_a"][~am].abs().sum()) == 0
    torch.testing.assert_close(att["over_b"].sum(2), am.double())
    assert float(att["over_b"].transpose(1, 2)[~bm].abs().sum()) == 0


def test_padding_never_changes_the_result() -> None:
    a, bags = _unit(5, 4, 6, seed=1), _unit(5, 2, 3, 6, seed=2)
    loss = FineGrainedNCE(tau=0.1, tau_att=0.2)
    clean = loss(a.clone().requires_grad_(), bags)
    # append padded tokens full of garbage (even NaN) to both sides, and a padded third candidate
    pad_a = torch.cat([a, torch.full((5, 2, 6), float("nan"), dtype=a.dtype)], 1)
    pad_b = torch.cat([bags, 1e3 * _unit(5, 2, 2, 6, seed=3)], 2)
    pad_b = torch.cat([pad_b, _unit(5, 1, 5, 6, seed=4)], 1)
    am = torch.zeros(5, 6, dtype=torch.bool)
    am[:, :4] = True
    bm = torch.zeros(5, 3, 5, dtype=torch.bool)
    bm[:, :2, :3] = True
    x = pad_a.clone().requires_grad_()
    padded = loss(x, pad_b, am, bm)
    torch.testing.assert_close(padded.per_sample, clean.per_sample)
    padded.loss.backward()
    assert torch.isfinite(x.grad).all() and float(x.grad[:, 4:].abs().sum()) == 0


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_chunked_equals_unchunked_in_value_and_gradient(chunk_size: int) -> None:
    def run(chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = _unit(5, 4, 6, seed=1).requires_grad_(), _unit(5, 2, 3, 6, seed=2).requires_grad_()
        per_sample = finegrained_nce(a, b, temperature=0.1, reduction="none", chunk_size=chunk)
        per_sample.sum().backward()
        return per_sample.detach(), a.grad, b.grad

    for got, want in zip(run(chunk_size), run(None), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.integration
@pytest.mark.parametrize("direction", ["both", "over_a"])
@pytest.mark.parametrize("bags", [False, True])
def test_gradients_pass_gradcheck(direction: str, bags: bool) -> None:
    a = _unit(3, 3, 4, seed=1).requires_grad_()
    b = (_unit(3, 2, 2, 4, seed=2) if bags else _unit(3, 2, 4, seed=2)).requires_grad_()
    mask = torch.ones(b.shape[:-1], dtype=torch.bool)
    mask[..., 1, -1] = False

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return finegrained_nce(x, y, None, mask, 0.2, 0.3, direction, "none", chunk_size=2)

    assert torch.autograd.gradcheck(f, (a, b))


#: a's scale for the kernel's three ways to the exponential: unshifted (Cauchy–Schwarz bounds |S/τ| by 10),
#: shifted by each chunk's largest S/τ (the bound is 70, but a's tokens lie near one direction and b's near
#: another, 45° away, so the similarities, padding's zeros included, span about 50 < 60), and the autograd
#: fallback (similarities span up to 800)
EXP_PATHS = {"unshifted": 1.0, "shifted": 7.0, "fallback": 40.0}


def _kernel_tokens(
    path: str, items: int, tokens: int, seed: int, toward: tuple[float, ...], scale: float
) -> torch.Tensor:
    """Random unit tokens (near ``toward`` on the shifted path) times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(items, tokens, 3, generator=g, dtype=torch.float64)
    if path == "shifted":
        noise = torch.tensor(toward, dtype=torch.float64) + 0.02 * noise
    return F.normalize(noise, dim=-1) * scale


@pytest.mark.parametrize("direction", ["both", "over_a", "over_b"])
@pytest.mark.parametrize("path", list(EXP_PATHS))
def test_hand_written_backward_equals_autograd_of_the_definition(direction: str, path: str) -> None:
    """The kernel's hand-derived ∂s/∂S against autograd through the plain softmax formulas (with padding in
    both a and b, a candidate of padding only, and chunks), and against finite differences, on each of the
    kernel's ways to the exponential (checked: which one ran)."""
    from harmonia.losses.finegrained import PoolDirection, _chunk_scores
    from harmonia.losses.pooled_scores import exp_shift, pooled_scores

    g = torch.Generator().manual_seed(3)
    a_mask, b_mask = torch.rand(5, 4, generator=g) > 0.3, torch.rand(6, 3, generator=g) > 0.4
    a_mask[:, 0], b_mask[0] = True, False
    a = _kernel_tokens(path, 5, 4, 4, (1, 0, 0), EXP_PATHS[path])
    b = _kernel_tokens(path, 6, 3, 5, (1, 1, 0), 1.0)
    a = torch.where(a_mask[..., None], a, 0).requires_grad_()
    b = torch.where(b_mask[..., None], b, 0).requires_grad_()
    over_a, over_b = direction != "over_b", direction != "over_a"
    fallbacks = []

    def reference(x, xm, y, ym):  # autograd through masked softmaxes: the formulas as written
        fallbacks.append(x.shape[0])
        return _chunk_scores(x, xm, y, ym, 0.1, PoolDirection(direction))

    weights = torch.randn(5, 6, generator=g, dtype=torch.float64)
    want = reference(a, a_mask, b, b_mask)
    want_grads = torch.autograd.grad((want * weights).sum(), (a, b))
    fallbacks.clear()
    got = pooled_scores(a, b, a_mask, b_mask, 0.1, over_a, over_b, 2, reference)
    assert exp_shift(a, b, 0.1) == (0.0 if path == "unshifted" else None)
    assert fallbacks == ([2, 2, 1] if path == "fallback" else [])
    got_grads = torch.autograd.grad((got * weights).sum(), (a, b))
    torch.testing.assert_close(got, want)
    for got_grad, want_grad, mask in zip(got_grads, want_grads, (a_mask, b_mask), strict=True):
        torch.testing.assert_close(got_grad * mask[..., None], want_grad * mask[..., None])
    assert torch.autograd.gradcheck(
        lambda x, y: pooled_scores(x, y, a_mask, b_mask, 0.1, over_a, over_b, 2, reference), (a, b)
    )


def test_irrelevant_tokens_get_low_attention() -> None:
    """Half of each clip's tokens copy its caption's words (noisy), half are random: attention over the
    clip's tokens concentrates on the matching half."""
    g = torch.Generator().manual_seed(0)
    words = _unit(8, 3, 16, seed=1)
    relevant = F.normalize(words + 0.3 * torch.randn(8, 3, 16, generator=g, dtype=torch.float64), dim=-1)
    clips = torch.cat([relevant, _unit(8, 3, 16, seed=2)], 1)
    att = paired_attention(clips, words, tau_att=0.1)["over_a"]  # [8, 6 tokens, 3 words]
    per_token = att.mean(-1)
    assert float(per_token[:, :3].mean()) > 5 * float(per_token[:, 3:].mean())


def test_input_errors_name_the_problem() -> None:
    a, b = _unit(4, 3, 5), _unit(4, 2, 5)
    with pytest.raises(ValueError, match="a must be float"):
        finegrained_nce(a[:, 0], b)
    with pytest.raises(ValueError, match="b must be"):
        finegrained_nce(a, b[:3])
    with pytest.raises(ValueError, match="mask must be bool"):
        finegrained_nce(a, b, torch.ones(4, 3))
    no_tokens = torch.ones(4, 2, dtype=torch.bool)
    no_tokens[1] = False
    with pytest.raises(ValueError, match="no real token"):
        finegrained_nce(a, b, None, no_tokens)
    with pytest.raises(ValueError, match="tau"):
        FineGrainedNCE(tau_att=0)
