"""harmonia.integrations.lightning: the LightningModules of docs/lightning.md (loaded from the page) train,
resume through a Lightning checkpoint with the balancing methods' state, run under 2-process DDP on CPU, and
give harmonia's own trainer's numbers; every balancing method through the callback gives the trainer's
numbers; the harmonizer recipe gives the plain loop's; forgotten calls are errors that name the fix.

Importing Lightning alone takes about 5 s, so it is imported when a test runs (never when the suite is
collected) and every test here is marked ``integration``: ``make test-fast`` does not pay for it."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.app.callbacks.balance import BalancingCallback
from harmonia.app.registry import BALANCING
from harmonia.app.train import Trainer, build_trainer
from harmonia.app.train.distributed import free_port
from harmonia.balance import OGM, OGMGE, OPM, BalancingMethod
from harmonia.errors import CheckpointError, ConfigError, InputError
from harmonia.gradients.harmonizer import GradientHarmonizer
from harmonia.models import build_classifier
from helpers import tiny_experiment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ex() -> ModuleType:
    """tests/lightning_example.py (which imports Lightning)."""
    return importlib.import_module("lightning_example")


def _copied(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _integration() -> ModuleType:
    return importlib.import_module("harmonia.integrations.lightning")


@pytest.fixture(scope="module")
def data(ex: ModuleType) -> Any:
    return ex.tiny_data()


@pytest.fixture(scope="module")
def example(ex: ModuleType) -> dict[str, Any]:
    return ex.load_example(0)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return bool(a == b)


def _assert_same(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Bitwise equality, key by key."""
    assert list(ours) == list(theirs)
    different = [k for k in ours if not _equal(ours[k], theirs[k])]
    assert not different, f"differ: {different[:5]}"


def _harmonia_state(trainer: Any) -> dict[str, Any]:
    """The trainer's model state and its methods' states, keyed as :func:`balanced_state` keys them (the
    methods by position: the trainer names them by registry name, the callback by class name)."""
    state = {k: _copied(v) for k, v in trainer.model.state_dict().items()}
    callback = next(cb for cb in trainer.callbacks if isinstance(cb, BalancingCallback))
    for i, method in enumerate(callback.methods):
        key = f"{i}:{type(method).__name__.lower()}"
        state.update({f"balance.{key}.{k}": _copied(v) for k, v in method.state_dict().items()})
    return state


# ------------------------------------------------------------------------------------------------------
# the callback's contract, hook by hook (no Lightning loop)


def _tiny_model() -> Any:
    torch.manual_seed(0)
    return build_classifier(
        ["audio", "image"], {"audio": 1, "image": 1}, 3, encoder_widths=[4], feature_dim=8
    )


def _batch() -> dict[str, Any]:
    inputs = {"audio": torch.randn(6, 1, 8, 8), "image": torch.randn(6, 1, 8, 8)}
    return {"inputs": inputs, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}


def test_forgetting_the_transform_or_adjust_loss_is_an_error_that_names_the_line() -> None:
    model, batch = _tiny_model(), _batch()
    callback = _integration().Balancing([OPM.build(model), OGM.build(model)])
    trainer = SimpleNamespace(current_epoch=0)
    callback.on_train_batch_start(trainer, None, batch, 0)
    output = model(batch["inputs"])  # no transform: OPM cannot drop
    with pytest.raises(InputError, match=r"opm edit.*transform=self\.balancing\.transform"):
        callback.adjust_loss(output, F.cross_entropy(output.logits, batch["labels"]))
    callback.on_train_batch_start(trainer, None, batch, 0)
    output = model(batch["inputs"], transform=callback.transform)
    loss = F.cross_entropy(output.logits, batch["labels"])
    with pytest.raises(InputError, match=r"did not call self\.balancing\.adjust_loss\(output, loss\)"):
        callback.on_before_backward(trainer, None, loss)


def test_the_hooks_run_the_methods_and_are_identities_outside_a_training_step() -> None:
    model, batch = _tiny_model(), _batch()
    ogm = OGM.build(model)
    callback = _integration().Balancing([ogm])
    features = {"audio": torch.ones(2, 8), "image": torch.ones(2, 8)}
    assert callback.transform(features) is features
    loss = torch.tensor(1.0)
    assert callback.adjust_loss(None, loss) is loss
    callback.on_train_batch_start(SimpleNamespace(current_epoch=0), None, batch, 0)
    output = model(batch["inputs"], transform=callback.transform)
    loss = callback.adjust_loss(output, F.cross_entropy(output.logits, batch["labels"]))
    callback.on_before_backward(None, None, loss)
    loss.backward()
    callback.on_before_optimizer_step(None, None, None)
    callback.on_before_optimizer_step(None, None, None)  # a second optimizer step of the batch: once only
    assert int(ogm.num_steps) == 1
    logged: dict[str, float] = {}
    module = SimpleNamespace(log_dict=lambda metrics, **kwargs: logged.update(metrics))
    callback.on_train_batch_end(None, module, None, batch, 0)
    assert set(logged) == {"balance/rho/audio", "balance/rho/image", "balance/k/audio", "balance/k/image"}
    assert callback.transform(features) is features  # the step is over


def test_settings_the_methods_cannot_work_with_are_refused() -> None:
    model = _tiny_model()
    callback = _integration().Balancing([OGM.build(model)])
    with pytest.raises(ConfigError, match="accumulate_grad_batches=1"):
        callback.setup(SimpleNamespace(accumulate_grad_batches=4), None, "fit")
    with pytest.raises(CheckpointError, match="same methods in the same order"):
        callback.load_state_dict({"0:opm": {}})
    with pytest.raises(InputError, match="BalancingMethod objects"):
        _integration().Balancing([nn.Linear(2, 2)])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="automatic_optimization = False"):
        _integration().Harmonizing(GradientHarmonizer()).backward(
            SimpleNamespace(automatic_optimization=True), {}
        )


def test_without_lightning_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import harmonia.integrations.lightning as integration

    monkeypatch.setitem(sys.modules, "lightning", None)  # what an environment without it gives
    monkeypatch.delitem(sys.modules, "harmonia.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'harmonia\[lightning\]'"):
        importlib.import_module("harmonia.integrations.lightning")
    monkeypatch.setitem(sys.modules, "harmonia.integrations.lightning", integration)


# ------------------------------------------------------------------------------------------------------
# the doc example: trains, resumes, matches the trainer


def test_the_doc_examples_run_as_scripts(
    ex: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    data: Any,
) -> None:
    monkeypatch.chdir(tmp_path)
    ex.load_example(0, as_main=True)
    ex.load_example(1, as_main=True)
    out = capsys.readouterr().out
    for key in (
        "balance/rho/audio",
        "balance/q/image",
        "balance/k/image",
        "val/accuracy",
        "harmonize/kept_fraction",
    ):
        assert f"'{key}'" in out


class EpochsSeen(BalancingMethod):
    """Counts the epoch-end hooks it ran: a state that only the end of an epoch changes."""

    epochs: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    @classmethod
    def build(cls, model: nn.Module, settings: Any = None, seed: int = 0) -> EpochsSeen:
        return cls()

    def on_epoch_end(self, epoch: int, features: Any, metrics: dict[str, float]) -> None:
        self.epochs += 1


WITH_EPOCH_STATE = ((OPM, None), (OGMGE, None), (EpochsSeen, None))


def _fit(ex: ModuleType, example: dict[str, Any], data: Any, root: Path, epochs: int, **kwargs: Any) -> Any:
    """The doc example for ``epochs`` whole epochs (3 steps each, the last one of 26 samples), validated and
    checkpointed on Lightning's default schedule; ``ckpt_path``, ``seed`` and the module's arguments from
    ``kwargs``."""
    ckpt_path, seed = kwargs.pop("ckpt_path", None), kwargs.pop("seed", 0)
    ex.L.seed_everything(seed, verbose=False)
    module = example["BalancedAVDigits"](data, **ex.TINY_MODEL, **kwargs)
    checkpoints = ex.L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    ex.lightning_trainer(root, max_epochs=epochs, callbacks=[checkpoints]).fit(module, ckpt_path=ckpt_path)
    return module


def test_resuming_from_a_lightning_checkpoint_restores_the_methods(
    ex: ModuleType, tmp_path: Path, example: dict[str, Any], data: Any
) -> None:
    uninterrupted = ex.balanced_state(_fit(ex, example, data, tmp_path / "full", 2, methods=WITH_EPOCH_STATE))
    first = _fit(ex, example, data, tmp_path / "first", 1, methods=WITH_EPOCH_STATE)
    last = tmp_path / "first" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["callbacks"][first.balancing.state_key]
    assert set(saved) == {"0:opm", "1:ogmge", "2:epochsseen"}
    assert int(saved["1:ogmge"]["num_steps"]) == 3 and bool((saved["0:opm"]["q"] > 0).any())
    assert int(saved["2:epochsseen"]["epochs"]) == 1  # the epoch-end hook ran before the checkpoint
    # another initialisation: everything the resumed run has must come from the checkpoint
    resumed = _fit(
        ex, example, data, tmp_path / "resumed", 2, ckpt_path=last, seed=1, methods=WITH_EPOCH_STATE
    )
    state = ex.balanced_state(resumed)
    assert int(state["balance.1:ogmge.num_steps"]) == 6 and int(state["balance.2:epochsseen.epochs"]) == 2
    _assert_same(state, uninterrupted)


def test_the_lightning_example_gives_harmonias_trainer_numbers(
    ex: ModuleType, tmp_path: Path, example: dict[str, Any], data: Any
) -> None:
    lightning = ex.balanced_state(_fit(ex, example, data, tmp_path / "lightning", 2))
    cfg = tiny_experiment(tmp_path, "balance=[opm, ogm_ge]", "train.epochs=2", "train.probe=false")
    trainer = Trainer(cfg, progress=False, dataset=data.dataset)
    trainer.fit()
    _assert_same(_harmonia_state(trainer), lightning)


# ------------------------------------------------------------------------------------------------------
# every method through the callback


SETTINGS = {  # what makes each act within 2 epochs of 2 steps (as in test_distributed.py)
    "gblending": ["balance=[{name: gblending, first_super_epoch: 2, super_epoch: 1, negative_gain: abs}]"],
    "greedy": ["balance=[{name: greedy, start_epoch: 0, rebalance_steps: 1}]"],
    "valuation": ["balance=[{name: valuation, start_epoch: 0}]"],
    "relearn": ["balance=[{name: relearn, interval: 1, n_init: 2}]"],
    "mla": ["balance=[mla]", "model.fusion=sum"],
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (untrained) audio teacher checkpoint for UMT."""
    path = tmp_path_factory.mktemp("teacher") / "audio.pt"
    model = build_trainer(tiny_experiment(path.parent, "train.probe=false"), progress=False).model
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", BALANCING.names())
def test_every_method_through_the_callback_gives_harmonias_trainer_numbers(
    ex: ModuleType, name: str, tmp_path: Path, example: dict[str, Any], data: Any, teacher: Path
) -> None:
    overrides = SETTINGS.get(name, [f"balance=[{name}]"])
    if name == "umt":
        overrides = [f"balance=[{{name: umt, teachers: {{audio: {teacher}}}}}]"]
    cfg = tiny_experiment(tmp_path, *overrides, "train.epochs=2", "train.probe=false")
    ours = build_trainer(cfg, progress=False, dataset=data.dataset)
    ours.model.train()
    for epoch in range(2):  # the trainer's steps and epoch-end hooks, without its evaluation
        ours.epoch = epoch
        ours.train_loader.set_epoch(epoch)
        for _, batch in zip(range(ex.STEPS), ours.train_loader, strict=False):
            ours.train_step(batch)
        for cb in ours.callbacks:
            cb.on_epoch_end(ours, epoch, {})
        ours.scheduler.step()

    methods = [(BALANCING.get(entry.name), entry.settings) for entry in cfg.balance]
    ex.L.seed_everything(0, verbose=False)
    module = example["BalancedAVDigits"](
        data, **ex.TINY_MODEL, fusion=cfg.model.fusion.value, methods=methods
    )
    trainer = ex.lightning_trainer(  # no validation: the comparison is of the training steps
        tmp_path, max_epochs=2, limit_train_batches=ex.STEPS, limit_val_batches=0, enable_checkpointing=False
    )
    trainer.fit(module)
    _assert_same(ex.balanced_state(module), _harmonia_state(ours))


# ------------------------------------------------------------------------------------------------------
# 2-process DDP on CPU, and the harmonizer recipe


def test_two_ddp_processes_agree_and_equal_one_process(
    ex: ModuleType, tmp_path: Path, example: dict[str, Any], data: Any
) -> None:
    import torch.multiprocessing as mp

    single = ex.balanced_run(example, data, tmp_path / "single")
    harmonized = ex.harmonized_state(ex.harmonized_run(ex.load_example(1), tmp_path / "single"))
    assert not torch.distributed.is_initialized()  # the forked ranks must not inherit a process group
    # forked (no second import of torch and Lightning), each rank joins as torchrun's ranks do
    ranks = mp.start_processes(
        ex.ddp_rank, (2, free_port(), tmp_path, data), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=2):  # raises with the rank's traceback when one fails
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the 2 DDP ranks did not finish within 300 s")
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for run, reference in (("balanced", single), ("harmonized", harmonized)):
        _assert_same(saved[0][run], saved[1][run])  # the replicas are identical ...
        for key, value in reference.items():  # ... and one process on the global batch, up to rounding
            torch.testing.assert_close(saved[0][run][key], value, rtol=1e-4, atol=1e-5, msg=f"{run} {key}")
        largest = max(
            float((saved[0][run][k].double() - v.double()).abs().max()) for k, v in reference.items()
        )
        print(f"{run}: DDP vs one process, largest absolute difference {largest:.1e}")  # docs/lightning.md
    assert bool((saved[0]["balanced"]["balance.0:opm.q"] > 0).any())  # OPM dropped with a global q


def test_the_harmonizing_step_equals_the_plain_loop(ex: ModuleType, tmp_path: Path) -> None:
    harmonizer_example = ex.load_example(1)
    trained = ex.harmonized_run(harmonizer_example, tmp_path, sgd=False)
    ex.L.seed_everything(0, verbose=False)
    fresh = harmonizer_example["HarmonizedPretraining"]()  # the same model, loss and harmonizer, by hand:
    model, loss_fn, harmonizer = fresh.model, fresh.loss, fresh.harmonizing.harmonizer
    optimizer = fresh.configure_optimizers()
    for batch in ex.pretrain_batches():
        out = model(batch)
        losses = loss_fn(out.video_va, out.audio, out.video_vt, out.text, out.text_mask)
        optimizer.zero_grad()
        harmonizer.backward(losses.per_sample, anchor=out.features["video"])
        optimizer.step()
    assert harmonizer.num_steps == 2
    _assert_same(ex.harmonized_state(trained), ex.harmonized_state(fresh))
