"""Zero-shot retrieval between two modalities: recall at K (DESIGN §4)."""

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
    scores = queries.double() @ gallery.double().T
    true = scores.diagonal()[:, None]
    higher = (scores > true).sum(1).double()
    equal = (scores == true).sum(1).double() - 1
    return {k: float(((k - higher) / (equal + 1)).clamp(0, 1).mean()) for k in ks}


def retrieval_metrics(
    pairs: dict[tuple[str, str], tuple[Tensor, Tensor]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``"<a>_to_<b>/R@K"`` in both directions for each ``(a, b): (embeddings_a, embeddings_b)``."""
    out: dict[str, float] = {}
    for (a, b), (x, y) in pairs.items():
        for (q, g), (qx, gx) in (((a, b), (x, y)), ((b, a), (y, x))):
            for k, r in recall_at_k(qx, gx, ks).items():
                out[f"{q}_to_{g}/R@{k}"] = r
    return out
