"""open_clip-style contrastive options: the learnable logit scale and the local_loss / gather_with_grad
switches, against a port of open_clip's ``ClipLoss`` formula written here, in one process and in two gloo
processes; the scale in a pre-training run (learns, is clamped at 100, logged, resumed)."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harmonia.errors import ConfigError
from harmonia.losses import LogitScale, VATTLoss, mil_nce, nce

# the application is imported inside the tests that train: the 2-process workers import this module

SWITCHES = list(itertools.product([True, False], repeat=2))  # (local_loss, gather_with_grad)
WORLD, B, D, K = 2, 3, 5, 2


def clip_loss_port(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """open_clip's ClipLoss (src/open_clip/loss.py), re-derived: gather, logits, symmetric cross-entropy."""
    if world == 1:
        per_image = logit_scale * image @ text.T
        per_text = logit_scale * text @ image.T
        labels = torch.arange(image.shape[0])
    else:
        if gather_with_grad:  # gradients reach every rank: torch.distributed.nn's autograd all_gather
            from torch.distributed.nn.functional import all_gather

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                all_image, all_text = torch.cat(all_gather(image)), torch.cat(all_gather(text))
        else:  # a plain all_gather; the local rows put back only for local_loss=False
            images = [torch.zeros_like(image) for _ in range(world)]
            texts = [torch.zeros_like(text) for _ in range(world)]
            dist.all_gather(images, image)
            dist.all_gather(texts, text)
            if not local_loss:
                images[rank], texts[rank] = image, text
            all_image, all_text = torch.cat(images), torch.cat(texts)
        if local_loss:
            per_image = logit_scale * image @ all_text.T
            per_text = logit_scale * text @ all_image.T
            labels = torch.arange(image.shape[0]) + image.shape[0] * rank
        else:
            per_image = logit_scale * all_image @ all_text.T
            per_text = per_image.T
            labels = torch.arange(per_image.shape[0])
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def _features(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _both(
    a: torch.Tensor,
    b: torch.Tensor,
    init: float,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int,
    world: int,
) -> dict[str, list[torch.Tensor]]:
    """Loss and gradients (a, b, log-scale) of harmonia's nce and of the port, on leaf copies of a, b."""
    out: dict[str, list[torch.Tensor]] = {}
    for name in ("harmonia", "port"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        scale = LogitScale(init).double()
        if name == "harmonia":
            loss = nce(x, y, logit_scale=scale(), local_loss=local_loss, gather_with_grad=gather_with_grad)
        else:
            loss = clip_loss_port(x, y, scale.log_scale.exp(), local_loss, gather_with_grad, rank, world)
        loss.backward()
        assert x.grad is not None and y.grad is not None and scale.log_scale.grad is not None
        out[name] = [loss.detach(), x.grad, y.grad, scale.log_scale.grad]
    return out


@pytest.mark.parametrize(("local_loss", "gather_with_grad"), SWITCHES)
def test_nce_with_logit_scale_equals_the_open_clip_port_in_one_process(
    local_loss: bool, gather_with_grad: bool
) -> None:
    a, b = _features(1, 6, D), _features(2, 6, D)
    got = _both(a, b, 1 / 0.07, local_loss, gather_with_grad, 0, 1)
    for mine, port in zip(got["harmonia"], got["port"], strict=True):
        torch.testing.assert_close(mine, port)
    # in one process the switches change nothing, and s = 1/τ gives the fixed-temperature loss
    torch.testing.assert_close(got["harmonia"][0], nce(a, b, 0.07))
    assert got["harmonia"][3].abs() > 0  # the scale has a gradient


def _mil_nce_reference(
    v: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, s: torch.Tensor, i: int
) -> torch.Tensor:
    """ℓ_i of MIL-NCE with gradients through clip i's row and bag i's column only (its own embeddings as
    queries; every key a constant): what local_loss=True, gather_with_grad=False gives."""
    rows = (s * torch.einsum("d,jkd->jk", v[i], t.detach())).masked_fill(~mask, -math.inf)
    cols = (s * torch.einsum("jd,kd->jk", v.detach(), t[i])).masked_fill(~mask[i][None], -math.inf)
    return torch.logsumexp(torch.cat([rows.flatten(), cols.flatten()]), 0) - torch.logsumexp(rows[i], 0)


def _inputs() -> tuple[torch.Tensor, ...]:
    n = WORLD * B
    mask = torch.ones(n, K, dtype=torch.bool)
    mask[1, 1] = mask[4, 0] = False  # padded candidates, on both ranks
    return _features(1, n, D), _features(2, n, D), _features(3, n, D), _features(4, n, K, D), mask


def _switch_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b, v, t, mask = _inputs()
        mine = slice(rank * B, (rank + 1) * B)
        results = {}
        for local_loss, gather_with_grad in SWITCHES:
            got = _both(a[mine], b[mine], 5.0, local_loss, gather_with_grad, rank, world)
            x, y, scale = (
                v[mine].clone().requires_grad_(),
                t[mine].clone().requires_grad_(),
                LogitScale(5.0).double(),
            )
            per_sample = mil_nce(
                x, y, mask[mine], logit_scale=scale(), reduction="none",
                local_loss=local_loss, gather_with_grad=gather_with_grad,
            )  # fmt: skip
            per_sample.mean().backward()
            got["mil_nce"] = [per_sample.detach(), x.grad, y.grad, scale.log_scale.grad]
            results[(local_loss, gather_with_grad)] = got
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves while another's backward still gathers
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_switches_equal_the_open_clip_port_in_two_processes(tmp_path: Path) -> None:
    """2 gloo processes, 3 samples each: for every local_loss x gather_with_grad, harmonia's nce gives the
    port's loss and gradients (features and log-scale) on each rank; and the update DistributedDataParallel
    makes of them (the mean over ranks) is the one-process gradient on the 6 samples where the docs say so.
    MIL-NCE with the same switches against one process and a query-only reference."""
    import torch.multiprocessing as mp

    mp.spawn(_switch_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    a, b, v, t, mask = _inputs()
    full = _both(a, b, 5.0, True, True, 0, 1)["port"]  # one process on the global batch
    x, y, scale = v.clone().requires_grad_(), t.clone().requires_grad_(), LogitScale(5.0).double()
    mil_per_sample = mil_nce(x, y, mask, logit_scale=scale(), reduction="none")
    mil_per_sample.mean().backward()
    mil_full = [mil_per_sample.detach(), x.grad, y.grad, scale.log_scale.grad]
    for (local_loss, gather_with_grad), rank in itertools.product(SWITCHES, range(WORLD)):
        got = ranks[rank][(local_loss, gather_with_grad)]
        for mine, port in zip(got["harmonia"], got["port"], strict=True):
            torch.testing.assert_close(mine, port)
        mine = slice(rank * B, (rank + 1) * B)
        loss, grad_a, grad_b, _ = got["harmonia"]
        mil_values, grad_v, grad_t, _ = got["mil_nce"]
        # the DDP-averaged feature gradient g_r / R against one process: exact when gradients cross ranks,
        # 1/R of it with local_loss=False and a plain gather; local_loss=True with a plain gather is neither
        if gather_with_grad:
            torch.testing.assert_close(grad_a / WORLD, full[1][mine])
            torch.testing.assert_close(grad_b / WORLD, full[2][mine])
            torch.testing.assert_close(grad_v / WORLD, mil_full[1][mine])
            torch.testing.assert_close(grad_t / WORLD, mil_full[2][mine])
        elif not local_loss:
            torch.testing.assert_close(grad_a, full[1][mine])
            torch.testing.assert_close(grad_b, full[2][mine])
            torch.testing.assert_close(grad_v, mil_full[1][mine])
            torch.testing.assert_close(grad_t, mil_full[2][mine])
        else:
            assert not torch.allclose(grad_a / WORLD, full[1][mine])
            xr, yr = v.clone().requires_grad_(), t.clone().requires_grad_()
            s = torch.tensor(5.0, dtype=torch.float64)
            torch.stack(
                [_mil_nce_reference(xr, yr, mask, s, i) for i in range(mine.start, mine.stop)]
            ).mean().backward()
            torch.testing.assert_close(grad_v, xr.grad[mine])
            torch.testing.assert_close(grad_t, yr.grad[mine])
        # values: this rank's samples, or with local_loss=False the whole global batch
        torch.testing.assert_close(mil_values, mil_full[0][mine] if local_loss else mil_full[0])
        if not local_loss:
            torch.testing.assert_close(loss, full[0])
        # the scale's gradient, averaged over ranks, is the one-process one for every combination
        mean_scale = (
            sum(ranks[r][(local_loss, gather_with_grad)]["harmonia"][3] for r in range(WORLD)) / WORLD
        )
        torch.testing.assert_close(mean_scale, full[3])
        mil_scale = sum(ranks[r][(local_loss, gather_with_grad)]["mil_nce"][3] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mil_scale, mil_full[3])


def test_logit_scale_starts_at_clip_value_and_clamps_to_1_100() -> None:
    scale = LogitScale()
    assert float(scale().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert float(scale.log_scale.detach()) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)  # e^10 ≫ 100
    assert float(scale.clamp_()().detach()) == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(-3.0)
    assert float(scale.clamp_()().detach()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must lie in"):
        LogitScale(init=200.0)


def test_scale_and_temperature_are_exclusive_and_checked() -> None:
    a = _features(1, 4, 3)
    s = LogitScale()()
    with pytest.raises(ValueError, match="not both"):
        nce(a, a, 0.07, logit_scale=s)
    with pytest.raises(ValueError, match="one element"):
        mil_nce(a, a[:, None], logit_scale=torch.ones(2))
    with pytest.raises(ValueError, match="needs local_loss=True"):
        nce(a, a, own_gradients_only=True, local_loss=False)
    with pytest.raises(ValueError, match="coarse terms only"):
        VATTLoss(vt="finegrained", local_loss=False)
    # the defaults are the fixed temperature, bit for bit
    assert torch.equal(nce(a, a), nce(a, a, 0.07, local_loss=True, gather_with_grad=True))


def test_vatt_loss_takes_the_scale_for_both_terms() -> None:
    va, audio, vt, text = _features(1, 5, 4), _features(2, 5, 4), _features(3, 5, 4), _features(4, 5, 2, 4)
    s = torch.tensor(20.0, dtype=torch.float64)
    out = VATTLoss(temperature=0.5)(va, audio, vt, text, logit_scale=s)
    torch.testing.assert_close(out.loss, nce(va, audio, 0.05) + mil_nce(vt, text, temperature=0.05))


def test_config_validates_the_switches(tmp_path: Path) -> None:
    from helpers import tiny_pretrain

    cfg = tiny_pretrain(tmp_path, "pretrain.learnable_scale=true")
    assert cfg.pretrain.architecture()["logit_scale"] == pytest.approx(1 / 0.07)
    assert "logit_scale" not in tiny_pretrain(tmp_path).pretrain.architecture()
    with pytest.raises(ConfigError, match="outside the clamp range"):
        tiny_pretrain(tmp_path, "pretrain.learnable_scale=true", "pretrain.temperature=0.005")
    with pytest.raises(ConfigError, match="coarse losses only"):
        tiny_pretrain(tmp_path, "pretrain.vt_loss=finegrained", "pretrain.gather_with_grad=false")
    with pytest.raises(ConfigError, match=r"pretrain\.local_loss=true"):
        tiny_pretrain(tmp_path, "pretrain.local_loss=false", "harmonize.mode=feature")


def _scales(run_dir: Path) -> list[float]:
    from harmonia.app.logs import read_metrics

    return [r["loss/logit_scale"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss/logit_scale" in r]


@pytest.mark.integration
def test_pretraining_learns_clamps_logs_and_resumes_the_scale(tmp_path: Path) -> None:
    from harmonia.app.callbacks.base import Callback
    from harmonia.app.train import PretrainTrainer
    from harmonia.app.train.checkpoint import load_checkpoint
    from helpers import tiny_pretrain

    class PushScaleUp(Callback):
        """Sets the log-scale's gradient to -1 before every step: the optimizer drives the scale up."""

        def before_optimizer_step(self, trainer: PretrainTrainer) -> None:  # type: ignore[override]
            trainer.model.logit_scale.log_scale.grad.fill_(-1.0)  # type: ignore[union-attr]

    quick = ["pretrain.learnable_scale=true", "train.probe=false", "pretrain.gate=false"]
    full = PretrainTrainer(tiny_pretrain(tmp_path, *quick, "name=full"), progress=False)
    no_decay = full.optimizer.param_groups[1]  # the scale, without weight decay (as open_clip)
    assert len(no_decay["params"]) == 1 and no_decay["params"][0] is full.model.logit_scale.log_scale
    assert no_decay["weight_decay"] == 0.0
    result = full.fit()
    scales = _scales(result.run_dir)
    assert len(scales) == full.global_step  # train.log_every=1
    assert all(abs(s - 1 / 0.07) > 1e-4 for s in scales)  # it learns from the first step
    saved = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["model"]["logit_scale.log_scale"]
    assert math.exp(float(saved)) == pytest.approx(scales[-1], rel=1e-6)

    # one epoch, then resumed for the second: the same scale and metrics as the uninterrupted run
    PretrainTrainer(tiny_pretrain(tmp_path, *quick, "name=resumed", "train.epochs=1"), progress=False).fit()
    resumed_trainer = PretrainTrainer(
        tiny_pretrain(tmp_path, *quick, "name=resumed"), resume=True, progress=False
    )
    resumed = resumed_trainer.fit()
    assert resumed.test == result.test
    assert torch.equal(resumed_trainer.model.logit_scale.log_scale, full.model.logit_scale.log_scale)

    # pushed up from 99 (τ = 1/99), the scale stops at the cap of 100
    capped = PretrainTrainer(
        tiny_pretrain(
            tmp_path,
            *quick,
            "name=capped",
            f"pretrain.temperature={1 / 99}",
            "optim.lr=0.01",
            "train.max_steps=4",
        ),
        [PushScaleUp()],
        progress=False,
    )
    scales = _scales(capped.fit().run_dir)
    assert scales[0] > 99 and all(s <= 100 * (1 + 1e-6) for s in scales)
    assert scales[-1] == pytest.approx(100.0, rel=1e-6)
