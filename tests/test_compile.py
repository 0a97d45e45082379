"""The compiled training step (``train.compile``): a compiled step gives the loss and the update of an eager
one, with balancing methods and the gradient harmonizer; checkpoints hold the plain model; failures name the
fix.

Most tests compile with TorchDynamo + AOTAutograd and run the captured graphs eagerly (backend
``aot_eager``): that exercises what harmonia builds on torch.compile (graph capture and its guards, the
graph breaks at feature transforms and at the harmonizer's anchor, gradients through compiled graphs) in
seconds each. The inductor test checks the generated kernels against eager execution. The tests that
compile are marked integration.

Tolerances, over 3 SGD steps: with ``aot_eager`` a compiled step runs the same kernels, so losses agree
to 1e-6 relative and each parameter's update to 1e-5 relative + 1e-6; with inductor (fused kernels round
differently) losses agree to 1e-5 relative and updates to 1e-4 relative + 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from harmonia.app.callbacks.base import Callback
from harmonia.app.config import ExperimentConfig
from harmonia.app.train import build_trainer
from harmonia.app.train.checkpoint import last_checkpoint_path
from harmonia.errors import ConfigError, InputError
from helpers import tiny_experiment, tiny_pretrain

STEPS = 3


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Every test compiles from scratch (torch's recompile limit counts across one process's trainers)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(monkeypatch: pytest.MonkeyPatch, name: str = "aot_eager") -> list[Any]:
    """Make the trainer compile with backend ``name``; returns the list of graphs it compiles."""
    from torch._dynamo.backends.registry import lookup_backend

    inner, graphs = lookup_backend(name), []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(gm)
        return inner(gm, example_inputs)

    monkeypatch.setattr("harmonia.app.train.compile.BACKEND", backend)
    return graphs


def config(task: str, out_dir: Path, *overrides: str) -> ExperimentConfig:
    make = tiny_experiment if task == "classify" else tiny_pretrain
    # SGD: its update is the gradient times lr (AdamW would turn rounding noise in a gradient that is zero in
    # exact arithmetic, such as that of attention's key bias, into steps of ±lr)
    return make(
        out_dir, "train.batch_size=16", "train.probe=false", "optim.name=sgd", "optim.lr=0.05", *overrides
    )


def take_steps(
    cfg: ExperimentConfig, steps: int = STEPS, after_step: Callable[[int], None] | None = None
) -> tuple[list[float], dict[str, torch.Tensor], dict[str, float]]:
    """Losses of the first ``steps`` full batches of epoch 0, the update they made to each parameter and
    the step metrics of the last step."""
    trainer = build_trainer(cfg, overwrite=True, progress=False)
    before = parameters(trainer.model)
    trainer.model.train()
    trainer.train_loader.set_epoch(0)
    losses = []
    for batch in trainer.train_loader:
        if len(batch["indices"]) < cfg.train.batch_size:
            continue  # a smaller batch would compile once more
        losses.append(trainer.train_step(batch)[1])
        if after_step is not None:
            after_step(len(losses))
        if len(losses) == steps:
            break
    assert len(losses) == steps
    after = parameters(trainer.model)
    return losses, {k: after[k] - v for k, v in before.items()}, dict(trainer.step_metrics)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers (batch-norm statistics, which a compiled graph updates)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def assert_same_update(
    compiled: dict[str, torch.Tensor], eager: dict[str, torch.Tensor], rtol: float, atol: float
) -> None:
    """The compiled steps moved every parameter as the eager ones did."""
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        torch.testing.assert_close(
            compiled[key], value, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_compile_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no effect without train\.compile=true"):
        tiny_experiment(tmp_path, "train.compile_mode=max-autotune-no-cudagraphs")
    with pytest.raises(ConfigError, match="replays CUDA graphs"):
        tiny_experiment(tmp_path, "train.compile=true", "train.compile_mode=reduce-overhead")
    with pytest.raises(ConfigError, match="compile_mode"):
        tiny_experiment(tmp_path, "train.compile=true", "train.compile_mode=fast")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("task", "overrides"),
    [
        ("classify", ()),
        ("classify", ("balance=[opm,ogm_ge]",)),
        ("classify", ("train.precision=bf16",)),
        ("pretrain", ()),
        ("pretrain", ("harmonize.mode=feature",)),
        ("pretrain", ("harmonize.mode=feature", "pretrain.vt_loss=finegrained")),
    ],
    ids=[
        "classify",
        "classify-opm-ogm_ge",
        "classify-bf16",
        "pretrain",
        "pretrain-harmonize",
        "pretrain-fine",
    ],
)
def test_compiled_steps_equal_eager_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, overrides: tuple[str, ...]
) -> None:
    graphs = counting_backend(monkeypatch)
    eager = take_steps(config(task, tmp_path / "eager", *overrides))
    compiled_after: list[int] = []
    compiled = take_steps(
        config(task, tmp_path / "compiled", *overrides, "train.compile=true"),
        after_step=lambda _: compiled_after.append(len(graphs)),
    )
    # the step was compiled, once: the guards hold from one step to the next (no recompilation)
    assert compiled_after[0] > 0 and compiled_after == [compiled_after[0]] * STEPS
    if task == "pretrain" and not overrides:  # the model and the loss, each one whole graph (no breaks)
        assert compiled_after[0] == 2
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=0)
    assert_same_update(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    # the methods' and the harmonizer's statistics of the last step (ρ, k, conflict fraction, ...)
    assert compiled[2].keys() == eager[2].keys()
    for key, value in eager[2].items():
        assert compiled[2][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.integration
@pytest.mark.skipif(
    os.environ.get("HARMONIA_SLOW_TESTS") != "1",
    reason="a cold inductor compile takes about a minute: HARMONIA_SLOW_TESTS=1 runs it (the aot_eager tests "
    "cover harmonia's side of the compiled step)",
)
def test_inductor_step_equals_eager_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pre-training: its graphs hold the most varied kernels (attention, layer norms, the contrastive loss);
    # a classifier's compiles as long (about a minute on two busy cores) and adds convolutions only
    task = "pretrain"
    graphs = counting_backend(monkeypatch, "inductor")
    eager = take_steps(config(task, tmp_path / "eager"))
    start = time.perf_counter()
    compiled = take_steps(config(task, tmp_path / "compiled", "train.compile=true"))
    print(f"{task}: {len(graphs)} graphs, {STEPS} compiled steps in {time.perf_counter() - start:.1f} s")
    assert graphs
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=0)
    assert_same_update(compiled[1], eager[1], rtol=1e-4, atol=1e-5)


class StartState(Callback):
    """Keeps the model's state when training starts (after a resume has loaded the checkpoint)."""

    def on_train_start(self, trainer: Any) -> None:
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.integration
def test_checkpoint_holds_the_plain_model_and_resumes_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting_backend(monkeypatch)
    first = config("classify", tmp_path / "a", "train.compile=true", "train.epochs=1")
    build_trainer(first, progress=False).fit()
    saved = torch.load(last_checkpoint_path(tmp_path / "a" / "tiny"), weights_only=False)
    plain = build_trainer(config("classify", tmp_path / "plain", "train.epochs=1"), progress=False)
    assert list(saved["model"]) == list(plain.model.state_dict())  # no "_orig_mod." prefix
    run = tmp_path / "a" / "tiny"
    shutil.copytree(run, tmp_path / "saved")
    finals = {}
    for compile_ in ("false", "true"):  # the same run resumed both ways
        shutil.rmtree(run)
        shutil.copytree(tmp_path / "saved", run)
        start = StartState()
        resumed = build_trainer(
            config("classify", tmp_path / "a", f"train.compile={compile_}", "train.epochs=2"),
            [start],
            resume=True,
            progress=False,
        )
        resumed.fit()
        assert start.state.keys() == saved["model"].keys()
        for key, value in saved["model"].items():  # it resumed from the checkpoint's state, exactly
            assert torch.equal(start.state[key], value), key
        finals[compile_] = resumed.model.state_dict()
    for key, value in finals["false"].items():
        torch.testing.assert_close(finals["true"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_compile_failure_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr("harmonia.app.train.compile.BACKEND", broken)
    trainer = build_trainer(config("classify", tmp_path, "train.compile=true"), progress=False)
    batch = next(iter(trainer.train_loader))
    with pytest.raises(ConfigError, match=r"train.compile=false \(or install a C\+\+ compiler"):
        trainer.train_step(batch)


def test_errors_of_the_model_come_through_a_compiled_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting_backend(monkeypatch)
    trainer = build_trainer(config("classify", tmp_path, "train.compile=true"), progress=False)
    batch = next(iter(trainer.train_loader))
    with pytest.raises(InputError, match="batch lacks modality 'image'"):
        trainer.step_model({"audio": batch["inputs"]["audio"]})


def test_compile_refuses_steps_that_leave_parameters_unused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zero gradients instead"):
        build_trainer(
            config(
                "classify",
                tmp_path,
                "train.compile=true",
                "model.fusion=sum",
                "balance=[{name: mla, schedule: per_step}]",
            ),
            progress=False,
        )


@pytest.mark.integration
def test_bench_compile_reports_both_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.app.cli import main
    from helpers import TINY_RECIPE

    counting_backend(monkeypatch)  # the plumbing, not inductor's kernels, is under test
    recipe = [f"data.avdigits.{k}={v!r}".replace("'", "") for k, v in TINY_RECIPE.items()]
    tiny = [
        *recipe,
        "model.feature_dim=16",
        "model.encoder_widths=[8, 16]",
        "model.hidden_dim=16",
        "pretrain.width=16",
        "pretrain.depth=1",
        "pretrain.heads=2",
        "pretrain.embed_dim=16",
        "train.batch_size=16",
    ]
    argv = ["bench", "compile", *tiny, "--speed-steps", "2", "--speed-rounds", "1", "--out", str(tmp_path)]
    assert main([*argv, "--quiet"]) == 0
    report = (tmp_path / "compile" / "compile.md").read_text()
    assert "| classify | configs/avdigits_concat.yaml | 16 |" in report
    assert "| pretrain | configs/trimodal_pretrain.yaml | 16 |" in report
    assert "harmonia bench compile data.avdigits.limit=150" in report and "--speed-steps 2" in report
    summary = json.loads((tmp_path / "compile" / "compile.json").read_text())
    for task in ("classify", "pretrain"):
        t = summary["tasks"][task]
        assert t["timing"]["eager"]["ratio"] == 1.0 and t["timing"]["compiled"]["seconds"] > 0
        assert t["graphs"] >= 1 and t["recompiled"] == 0
        assert t["first_step_seconds"]["compiled"] > 0
