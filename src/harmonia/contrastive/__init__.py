"""Contrastive pre-training: losses with cross-rank negatives (DESIGN §1.4)."""

from harmonia.contrastive.gather import distributed_world, gather_with_grad
from harmonia.contrastive.losses import VATTLoss, VATTLossOutput, mil_nce, nce

__all__ = ["VATTLoss", "VATTLossOutput", "distributed_world", "gather_with_grad", "mil_nce", "nce"]
