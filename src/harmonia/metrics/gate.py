"""Learnability gate of tri-modal pre-training: has L_va learned something a conflict score can use?

The conflict score cos(g_va, g_vt) can only flag a wrong caption once both losses pull the video anchor
along a semantic direction: while L_va is still at its chance value ln B, its gradient has no "this clip
is digit d" direction for L_vt's wrong pull to conflict with. The gate checks that on clean validation
data, with batches of the training batch size B:

    passed  ⇔  L_va ≤ ln B − margin   and   R@K(video → audio) ≥ factor · K / N

(defaults: margin 1 nat, K = 10, factor 5; N validation clips, so K / N is the chance R@K).

The **digit-axis diagnostic** measures the semantic direction itself. For a triplet i whose caption is
replaced by one of another digit d' (synthetic misalignment of validation triplets), the descent direction
of loss k at the video anchor z_i is −g^k_i = −∂ℓ^k/∂z_i; the digit axis is a_i = μ_{d'} − μ_{d_i}, the
difference of the class means of the clean anchors of digit d' and of the clip's digit d_i. The diagnostic
is the mean over such triplets of

    cos(−g^k_i, a_i),

positive when loss k pulls the clip towards the wrong digit (what L_vt does with a wrong caption) and
negative when it pulls it back towards its own (what a learned L_va does): the conflict the curriculum
relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class GateRule:
    """``L_va ≤ ln B − margin_nats`` and ``R@k(video → audio) ≥ recall_factor · k / N``."""

    margin_nats: float = 1.0
    recall_factor: float = 5.0
    k: int = 10

    def loss_threshold(self, batch_size: int) -> float:
        """ln B − margin: the largest L_va that passes."""
        return math.log(batch_size) - self.margin_nats

    def recall_threshold(self, n_items: int) -> float:
        """factor · K / N: the smallest R@K (a fraction) that passes."""
        return self.recall_factor * min(self.k, n_items) / n_items

    def passed(self, loss_va: float, recall_va: float, batch_size: int, n_items: int) -> bool:
        """Whether ``loss_va`` (mean per-sample L_va on batches of ``batch_size``) and ``recall_va``
        (video → audio R@k as a fraction, over ``n_items`` clips) pass."""
        if batch_size < 2 or n_items < 1:
            raise ValueError(f"GateRule: need batch_size >= 2 and n_items >= 1, got {batch_size}, {n_items}")
        return loss_va <= self.loss_threshold(batch_size) and recall_va >= self.recall_threshold(n_items)


def digit_axis_cosines(grads: Tensor, anchors: Tensor, labels: Tensor, wrong: Tensor) -> Tensor:
    """cos(−g_i, μ_{wrong_i} − μ_{labels_i}) per row [N].

    Args:
        grads: [N, ...] gradients of one loss w.r.t. the anchors of the rows of interest.
        anchors: [M, ...] clean anchors with their ``labels`` [M] (the class means μ_c come from them).
        labels: [M] digit of each anchor; the rows of ``grads`` are the first N anchors.
        wrong: [N] the digit each row's wrong caption shows.
    """
    flat = anchors.flatten(1).double()
    classes = int(max(labels.max(), wrong.max())) + 1
    sums = torch.zeros(classes, flat.shape[1], dtype=flat.dtype).index_add_(0, labels, flat)
    counts = torch.bincount(labels, minlength=classes).to(flat.dtype)
    if bool((counts[wrong] == 0).any()):
        raise ValueError("digit_axis_cosines: a wrong digit has no clean anchor to take its mean from")
    means = sums / counts.clamp(min=1)[:, None]
    n = grads.shape[0]
    axis = means[wrong] - means[labels[:n]]
    return F.cosine_similarity(-grads.flatten(1).double(), axis, dim=1)


def swap_pairs(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(len(labels))`` that swaps disjoint pairs of items of different labels,
    about ``fraction`` of the items in all (each swapped item gets its partner's caption). Swapping within
    the batch keeps the batch's set of captions, so only the pairing changes."""
    perm = np.arange(len(labels))
    want = int(round(fraction * len(labels))) // 2
    order = rng.permutation(len(labels))
    free = list(order)
    pairs = 0
    while pairs < want and free:
        i = free.pop(0)
        partner = next((j for j in free if labels[j] != labels[i]), None)
        if partner is None:
            continue
        free.remove(partner)
        perm[i], perm[partner] = partner, i
        pairs += 1
    return perm
