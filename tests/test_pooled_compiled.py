"""The opt-in compiled kernel of the fine-grained loss gives the eager kernel's scores and gradients."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmonia.losses import FineGrainedNCE
from harmonia.losses.finegrained import token_scores
from helpers import tiny_pretrain


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_compiled_elementwise_passes_equal_eager_in_float64() -> None:
    """Padded tokens on both sides, direction both, two chunks of the same shape (one compilation of
    each compiled function): scores and gradients equal eager's to rounding."""
    torch.manual_seed(0)
    a = F.normalize(torch.randn(6, 5, 4, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(6, 3, 4, dtype=torch.float64), dim=-1)
    a_mask = torch.rand(6, 5) > 0.3
    b_mask = torch.rand(6, 3) > 0.3
    a_mask[:, 0] = b_mask[:, 0] = True
    upstream = torch.randn(6, 6, dtype=torch.float64)
    results = []
    for compile in (False, True):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        scores = token_scores(x, y, a_mask, b_mask, 0.1, "both", chunk_size=3, compile=compile)
        results.append((scores, *torch.autograd.grad(scores, (x, y), upstream)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    fine = FineGrainedNCE(compile=True)
    assert fine.compiled and callable(fine.compile)  # nn.Module.compile is not shadowed


@pytest.mark.integration
def test_the_pretraining_config_turns_the_compiled_kernel_on(tmp_path: Path) -> None:
    from harmonia.app.train import build_trainer

    for flag in (False, True):
        cfg = tiny_pretrain(tmp_path, "pretrain.vt_loss=finegrained", f"pretrain.finegrained_compile={flag}")
        trainer = build_trainer(cfg, overwrite=True, progress=False)
        assert trainer.loss.finegrained.compiled is flag
