"""Contrastive pre-training: losses with cross-rank negatives (VATT) and fine-grained losses."""

from harmonia.losses.finegrained import FineGrainedNCE, FineGrainedOutput, PoolDirection, finegrained_nce
from harmonia.losses.gather import distributed_world, gather_features, gather_with_grad
from harmonia.losses.nce import mil_nce, nce
from harmonia.losses.scale import LogitScale
from harmonia.losses.vatt import ContrastiveGrain, VATTLoss, VATTLossOutput

__all__ = [
    "ContrastiveGrain",
    "FineGrainedNCE",
    "FineGrainedOutput",
    "LogitScale",
    "PoolDirection",
    "VATTLoss",
    "VATTLossOutput",
    "distributed_world",
    "finegrained_nce",
    "gather_features",
    "gather_with_grad",
    "mil_nce",
    "nce",
]
