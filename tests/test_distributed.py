"""Data-parallel training with 2 real gloo processes on CPU: the same parameters (and balancing-method state)
as one process on the same global batch (supervised with every balancing method that keeps cross-sample
statistics; pre-training with the harmonizer in each mode and with a fine-grained loss), torchrun end to end,
resume under DDP, and a clear exit when a rank dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harmonia.app.callbacks.balance import BalancingCallback
from harmonia.app.train import build_trainer
from harmonia.app.train.checkpoint import load_checkpoint
from harmonia.app.train.distributed import free_port
from harmonia.data.loader import BatchLoader
from helpers import tiny_experiment, tiny_pretrain

STEPS = 2  # the tiny supervised data holds 2 full global batches of 32
# configs whose method keeps epoch-level state run several epochs (the epoch-end hooks between them):
# G-Blending records at the end of epoch 0 and re-estimates at the end of epoch 1, so epoch 2 trains with the
# new weights; PMR swaps the epoch's all-reduced class means in at epoch 1; AMCo masks only from epoch 1
EPOCHS = {"gblending": 3, "pmr": 2, "amco": 2}

SUPERVISED = ("balance=[{name: ogm, ge: true, alpha: 0.5}]", "optim.name=sgd")
PRETRAIN = {
    "feature+curriculum": (
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_keep=top_fraction",
        "harmonize.curriculum_epochs=0.2",
    ),
    "batch": ("harmonize.mode=batch",),
    "parameter+gradvac": ("harmonize.mode=parameter", "harmonize.rule=gradvac"),
    "finegrained": ("pretrain.vt_loss=finegrained", "harmonize.mode=feature"),
}


def _configs(out_dir: Path) -> dict[str, object]:
    # SGD: Adam turns float noise in gradients that are zero in exact arithmetic (attention key biases)
    # into full-size steps, so its single-process and DDP parameters differ by noise, not by a bug
    noisy = ("data.trimodal.misalign_rate=0.3", "train.batch_size=16", "optim.name=sgd", "optim.lr=0.1")
    return {
        "supervised": tiny_experiment(out_dir, "name=supervised", *SUPERVISED),
        "opm": tiny_experiment(out_dir, "name=opm", "balance=[{name: opm, p_exe: 1.0}]", "optim.name=sgd"),
        "mmpareto": tiny_experiment(out_dir, "name=mmpareto", "balance=[mmpareto]", "optim.name=sgd"),
        "agm": tiny_experiment(out_dir, "name=agm", "balance=[agm]", "optim.name=sgd"),
        "amco": tiny_experiment(out_dir, "name=amco", "balance=[amco]", "optim.name=sgd"),
        "pmr": tiny_experiment(out_dir, "name=pmr", "balance=[pmr]", "optim.name=sgd"),
        "mla": tiny_experiment(out_dir, "name=mla", "balance=[mla]", "model.fusion=sum", "optim.name=sgd"),
        # step 0 measures the speeds and decides, step 1 re-balances with the all-reduced feature means
        "greedy": tiny_experiment(
            out_dir,
            "name=greedy",
            "balance=[{name: greedy, start_epoch: 0, rebalance_steps: 1}]",
            "optim.name=sgd",
        ),
        # one modality per step: DDP must leave the other's gradients unset (no momentum, no weight decay
        # on it), as one process does; momentum (MLA) and a large weight decay (ReconBoost) would show it
        "mla_per_step": tiny_experiment(
            out_dir,
            "name=mla_per_step",
            "balance=[{name: mla, schedule: per_step}]",
            "model.fusion=sum",
            "optim.name=sgd",
        ),
        "reconboost": tiny_experiment(
            out_dir, "name=reconboost", "balance=[reconboost]", "optim.name=sgd", "optim.weight_decay=0.5"
        ),
        "cml": tiny_experiment(out_dir, "name=cml", "balance=[cml]", "optim.name=sgd"),
        "valuation": tiny_experiment(
            out_dir, "name=valuation", "balance=[{name: valuation, start_epoch: 0}]", "optim.name=sgd"
        ),
        "gblending": tiny_experiment(
            out_dir,
            "name=gblending",
            # abs: in eval mode the tiny model's validation losses rise over its first epochs, and clipping
            # the negative gains would leave no weight to estimate
            "balance=[{name: gblending, first_super_epoch: 2, super_epoch: 1, negative_gain: abs}]",
            "optim.name=sgd",
        ),
        **{
            name: tiny_pretrain(out_dir, f"name={name.replace('+', '_')}", *noisy, *extra)
            for name, extra in PRETRAIN.items()
        },
    }


Trained = tuple[dict[str, torch.Tensor], dict[str, list[float]]]


def _train_steps(cfg: object, epochs: int = 1) -> Trained:
    """The model's state (and the balancing methods' buffers, as ``balance.<method>.<buffer>``) after
    ``epochs`` epochs of ``STEPS`` steps, with the callbacks' epoch-end hooks between epochs, and the values
    each step metric took."""
    trainer = build_trainer(cfg, overwrite=True, progress=False)  # type: ignore[arg-type]
    trainer.model.train()
    logged: dict[str, list[float]] = {}
    for epoch in range(epochs):
        trainer.epoch = epoch
        trainer.train_loader.set_epoch(epoch)
        for _, batch in zip(range(STEPS), trainer.train_loader, strict=False):
            trainer.train_step(batch)
            for k, v in trainer.step_metrics.items():
                logged.setdefault(k, []).append(v)
        if epoch + 1 < epochs:
            for cb in trainer.callbacks:
                cb.on_epoch_end(trainer, epoch, {})
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for cb in trainer.callbacks:
        if isinstance(cb, BalancingCallback):
            for method, buffers in cb.state_dict().items():
                state.update({f"balance.{method}.{k}": v.detach().clone() for k, v in buffers.items()})
    return state, logged


def _train_all(configs: dict[str, object]) -> dict[str, Trained]:
    return {name: _train_steps(cfg, EPOCHS.get(name, 1)) for name, cfg in configs.items()}


def _masked_some_step(logged: dict[str, list[float]]) -> bool:
    """Whether AMCo masked a dependent modality (mask ratio p > 0) in some step."""
    flags = [values for k, values in logged.items() if k.startswith("balance/amco/dependent/")]
    return any(p > 0 and any(d) for p, *d in zip(logged["balance/amco/ratio"], *flags, strict=True))


# G-Blending's weights divide differences of whole-split losses of order 1e-4 (a few tiny steps) by one
# another: float noise of 1e-8 in the losses (DDP sums gradients in another order) moves them by up to 1e-3
LOOSER = {("gblending", "balance.0:gblending.weights"): 1e-2}

# what a run must have done for its comparison to test the method's cross-rank statistics
EXERCISED = {
    # copies were added to the objective
    "valuation": lambda logged: any(max(v) > 0 for k, v in logged.items() if "valuation/copies/" in k),
    # the summed hinge term was non-zero
    "cml": lambda logged: max(logged["balance/cml/violated"]) > 0,
    "amco": _masked_some_step,
    # the weights were re-estimated
    "gblending": lambda logged: logged["balance/gblending/weight/fused"][-1] != pytest.approx(1 / 3),
    # a re-balancing step was taken (it uses the all-reduced feature means)
    "greedy": lambda logged: any(max(v) > 0 for k, v in logged.items() if "greedy/rebalance/" in k),
}


def _join_as(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` (harmonia joins the group from it)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _join_as(rank, world, port)
    torch.set_num_threads(1)
    states = _train_all(_configs(Path(out_dir) / "ddp"))
    torch.save(states, Path(out_dir) / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.integration
def test_two_processes_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _train_all(_configs(tmp_path / "single"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (expected, logged) in single.items():
        for key, value in expected.items():
            if not value.is_floating_point():
                continue
            # the replicas are identical (statistics of the global batch, rank 0's estimates for all) ...
            assert torch.equal(ranks[0][name][0][key], ranks[1][name][0][key]), f"{name} {key}"
            # ... and equal one process on the global batch, up to float noise
            rtol = LOOSER.get((name, key), 1e-4)
            torch.testing.assert_close(
                ranks[0][name][0][key], value, rtol=rtol, atol=1e-5, msg=f"{name} {key}"
            )
        assert EXERCISED.get(name, lambda _: True)(logged), f"{name}: the run did not exercise the method"
        # and training did move the parameters
        fresh = build_trainer(_configs(tmp_path / "fresh")[name], progress=False).model.state_dict()  # type: ignore[arg-type]
        assert any(not torch.allclose(v, expected[k]) for k, v in fresh.items() if v.is_floating_point())


def test_model_output_flattens_into_its_tensors() -> None:
    # DistributedDataParallel passes a forward's output tensors through its sink (which sends "no gradient"
    # back through the branches a loss leaves out) only when it can flatten the output
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from harmonia.models import MultimodalOutput

    out = MultimodalOutput(torch.ones(2, 3), {"a": torch.zeros(2, 4)}, {"a": torch.full((2, 3), 2.0)})
    leaves, spec = tree_flatten(out)
    assert len(leaves) == 3 and all(isinstance(t, torch.Tensor) for t in leaves)
    back = tree_unflatten([t + 1 for t in leaves], spec)
    assert isinstance(back, MultimodalOutput) and torch.equal(back.features["a"], torch.ones(2, 4))


def test_loader_shards_each_global_batch_contiguously() -> None:
    labels = torch.arange(20)
    loaders = [
        BatchLoader({"x": labels[:, None].float()}, labels, 8, shuffle=True, seed=3, rank=r, world_size=2)
        for r in range(2)
    ]
    single = BatchLoader({"x": labels[:, None].float()}, labels, 8, shuffle=True, seed=3, drop_last=True)
    for whole, a, b in zip(single, *loaders, strict=True):
        assert torch.equal(torch.cat([a["indices"], b["indices"]]), whole["indices"])
        assert torch.equal(a["inputs"]["x"][:, 0].long(), a["labels"])
    assert len(loaders[0]) == 2  # the last, incomplete global batch of 4 is dropped
    with pytest.raises(ValueError, match="multiple of the 2 ranks"):
        BatchLoader({"x": labels[:, None].float()}, labels, 7, world_size=2)


def _torchrun(
    args: list[str], nproc: int, env: dict[str, str], timeout: int = 240
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", "-m", "harmonia", "train", *args, "--quiet",
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_torchrun_trains_resumes_and_matches_one_process(tmp_path: Path) -> None:
    from harmonia.app.config import dump_config

    config = tmp_path / "pretrain.yaml"
    config.write_text(
        dump_config(
            tiny_pretrain(
                tmp_path,
                "harmonize.mode=feature",
                "data.trimodal.misalign_rate=0.3",
                "optim.name=sgd",
                "optim.lr=0.1",
            )
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = _torchrun([str(config), "name=ddp", "train.epochs=1"], 2, env)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun([str(config), "name=ddp", "train.epochs=2", "--resume"], 2, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("zero-shot retrieval") == 1  # rank 0 reports, rank 1 stays quiet
    one = subprocess.run(
        [sys.executable, "-m", "harmonia", "train", str(config), "name=single", "--quiet"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    assert ddp["epoch"] == single["epoch"] == 2 and ddp["global_step"] == single["global_step"]
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    epochs = [
        line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line
    ]
    assert sum('"kind": "epoch"' in line for line in epochs) == 2  # one log, written by rank 0 only
    assert len(list((tmp_path / "ddp" / "conflicts").glob("epoch_*.npz"))) == 2


def _dying_worker(rank: int, port: int, config: str, out_dir: str) -> None:
    _join_as(rank, 2, port)
    if rank == 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        os._exit(3)  # dies right after joining, as a killed process would
    import contextlib
    import io

    from harmonia.app.cli import main

    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = main(["train", config, "train.dist_timeout_s=20", "--quiet"])
    Path(out_dir, "rank0.txt").write_text(f"{code}\n{time.perf_counter() - start:.1f}\n{err.getvalue()}")


@pytest.mark.integration
def test_a_dead_rank_makes_the_others_exit_with_a_message(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from harmonia.app.config import dump_config

    config = tmp_path / "pretrain.yaml"
    config.write_text(dump_config(tiny_pretrain(tmp_path)))
    context = mp.start_processes(
        _dying_worker,
        args=(free_port(), str(config), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    for process in context.processes:
        process.join(120)
    code, seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 2)
    assert code == "1" and float(seconds) < 60
    assert "another rank has probably stopped" in message and "rank 0" in message


@pytest.mark.integration
def test_bench_distributed_reports_throughput_of_each_process_count(tmp_path: Path) -> None:
    from harmonia.app.bench.distributed import run_distributed_benchmark
    from harmonia.app.config import dump_config

    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(tiny_experiment(tmp_path)))
    summary = run_distributed_benchmark(config, nprocs=[1, 2], epochs=2, out_dir=tmp_path, progress=False)
    assert set(summary["results"]) == {"1", "2"} and summary["results"]["1"]["speedup"] == 1.0
    assert all(r["samples_per_second"] > 0 for r in summary["results"].values())
    assert "| 2 |" in (tmp_path / "distributed" / "distributed.md").read_text()
