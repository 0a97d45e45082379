"""Contrastive pre-training: losses with cross-rank negatives (VATT) and fine-grained losses."""

from harmonia.contrastive.finegrained import FineGrainedNCE, FineGrainedOutput, PoolDirection, finegrained_nce
from harmonia.contrastive.gather import distributed_world, gather_with_grad
from harmonia.contrastive.losses import mil_nce, nce
from harmonia.contrastive.vatt import ContrastiveGrain, VATTLoss, VATTLossOutput

__all__ = [
    "ContrastiveGrain",
    "FineGrainedNCE",
    "FineGrainedOutput",
    "PoolDirection",
    "VATTLoss",
    "VATTLossOutput",
    "distributed_world",
    "finegrained_nce",
    "gather_with_grad",
    "mil_nce",
    "nce",
]
