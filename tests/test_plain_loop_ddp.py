"""The README's plain loop (OPM attached to the model, OGM-GE after backward) under DistributedDataParallel
with 2 gloo processes equals one process on the global batch: the model is called through its forward, ρ is
all-reduced, OPM draws its drops for the global batch and GE noise is seeded by (seed, step)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmonia.app.train.distributed import free_port
from harmonia.balance import OGM, OPM, OPMSettings
from harmonia.distributed import convert_batchnorm
from harmonia.models import ConcatFusion, ConvEncoder, MultimodalClassifier

GLOBAL_BATCH, STEPS = 16, 4


def _data() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            {
                "audio": torch.randn(GLOBAL_BATCH, 1, 16, 16, generator=g),
                "image": torch.randn(GLOBAL_BATCH, 1, 16, 16, generator=g) * 3,  # the dominant one
            },
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MultimodalClassifier(
        {"audio": ConvEncoder(1, feature_dim=8), "image": ConvEncoder(1, feature_dim=8)},
        ConcatFusion(["audio", "image"], {"audio": 8, "image": 8}, num_classes=4),
    )
    if world > 1:  # batch statistics of the global batch; before building methods that hold parameters
        model = convert_batchnorm(model)
    ogm = OGM(dict(model.encoders), alpha=0.8, ge=True)
    model.feature_transform = OPM.build(model, OPMSettings(p_exe=1.0, q_base=0.9))
    opm = model.feature_transform
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    net.train()
    for inputs, labels in _data():
        local = {m: x[rows] for m, x in inputs.items()}
        out = net(local)
        loss = F.cross_entropy(out.logits, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        ogm.modulate(opm.step(labels[rows]), epoch=0)
        optimizer.step()
    assert float(opm.q.max()) > 0  # OPM did drop in the later steps
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(_train(rank, world), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.integration
def test_readme_plain_loop_under_ddp_equals_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _train(0, 1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if value.is_floating_point():
            # float noise of 4 steps
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(ranks[0][key], value), key
