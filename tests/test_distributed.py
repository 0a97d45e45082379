"""Data-parallel training with 2 real gloo processes on CPU: the same parameters as one process on the same
global batch (supervised with OGM-GE, OPM, MMPareto, AGM, AMCo, PMR, MLA and greedy; pre-training with the
harmonizer in each mode and with a fine-grained loss), torchrun end to end, resume under DDP, and a clear exit
when a rank dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harmonia.app.train import build_trainer
from harmonia.app.train.checkpoint import load_checkpoint
from harmonia.app.train.distributed import free_port
from harmonia.data.loader import BatchLoader
from helpers import tiny_experiment, tiny_pretrain

STEPS = 2  # the tiny supervised data holds 2 full global batches of 32

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
        **{
            name: tiny_pretrain(out_dir, f"name={name.replace('+', '_')}", *noisy, *extra)
            for name, extra in PRETRAIN.items()
        },
    }


def _train_steps(cfg: object) -> dict[str, torch.Tensor]:
    trainer = build_trainer(cfg, overwrite=True, progress=False)  # type: ignore[arg-type]
    trainer.model.train()
    for _, batch in zip(range(STEPS), trainer.train_loader, strict=False):
        trainer.train_step(batch)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


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
    states = {name: _train_steps(cfg) for name, cfg in _configs(Path(out_dir) / "ddp").items()}
    torch.save(states, Path(out_dir) / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.integration
def test_two_processes_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = {name: _train_steps(cfg) for name, cfg in _configs(tmp_path / "single").items()}
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, expected in single.items():
        for key, value in expected.items():
            if not value.is_floating_point():
                continue
            for r in range(2):  # every replica equals one process on the global batch
                torch.testing.assert_close(
                    ranks[r][name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}"
                )
        # and training did move the parameters
        moved = build_trainer(_configs(tmp_path / "fresh")[name], progress=False).model.state_dict()  # type: ignore[arg-type]
        assert any(not torch.allclose(moved[k], v) for k, v in expected.items() if v.is_floating_point())


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
