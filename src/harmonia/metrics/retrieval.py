"""Zero-shot retrieval between two modalities: recall at K."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def recall_at_k(queries: Tensor, gallery: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """R@K of retrieving ``gallery[i]`` for ``queries[i]`` by dot product (cosine for unit vectors).

    Ties are broken at random, in expectation: if g gallery items score higher than the true match and e
    others score the same, the true match's rank is uniform on g+1 .. g+1+e, so it counts
    ``clip((K - g) / (e + 1), 0, 1)`` towards R@K. Identical captions of equal clips therefore neither help
    nor hurt.
    """
    if queries.shape != gallery.shape or queries.dim() != 2:
        raise ValueError(
            f"recall_at_k: expected paired [N, D] tensors, got {tuple(queries.shape)}, {tuple(gallery.shape)}"
        )
    return recall_at_k_from_scores(queries.double() @ gallery.double().T, ks)


def recall_at_k_from_scores(scores: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """R@K from any score matrix [N, N] (``scores[i, j]``: query i vs gallery j; the match on the
    diagonal), with ties broken at random in expectation as :func:`recall_at_k`."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"recall_at_k: expected square scores [N, N], got {tuple(scores.shape)}")
    true = scores.diagonal()[:, None]
    higher = (scores > true).sum(1).double()
    equal = (scores == true).sum(1).double() - 1
    return {k: float(((k - higher) / (equal + 1)).clamp(0, 1).mean()) for k in ks}


def retrieval_metrics(
    pairs: dict[tuple[str, str], tuple[Tensor, Tensor]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``"<a>_to_<b>/R@K"`` in both directions for each ``(a, b): (embeddings_a, embeddings_b)``."""
    return retrieval_metrics_from_scores(
        {pair: x.double() @ y.double().T for pair, (x, y) in pairs.items()}, ks
    )


def retrieval_metrics_from_scores(
    scores: dict[tuple[str, str], Tensor], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``"<a>_to_<b>/R@K"`` in both directions for each ``(a, b): scores`` [N_a, N_b] (a as queries)."""
    out: dict[str, float] = {}
    for (a, b), s in scores.items():
        for (q, g), qs in (((a, b), s), ((b, a), s.T)):
            for k, r in recall_at_k_from_scores(qs, ks).items():
                out[f"{q}_to_{g}/R@{k}"] = r
    return out
