"""What every harmonia training run shares, whatever the task: run folder, checkpoints, resume, logs.

One run = one folder ``out_dir/name`` holding ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/last.pt`` (written atomically at the end of every epoch) and, when done,
``results.json``. ``resume=True`` continues from ``last.pt``; the data order of each epoch depends only on
(seed, epoch) and all RNG states are checkpointed, so on CPU a resumed run ends with the same metrics as an
uninterrupted one (on GPU, up to cuDNN's non-deterministic kernels).

A task (:class:`~harmonia.app.train.trainer.Trainer` for classification,
:class:`~harmonia.app.train.pretrain.PretrainTrainer` for contrastive pre-training) builds its data, model and
loader in :meth:`BaseTrainer.setup` and defines one training step, the per-epoch evaluation and the final
evaluation.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from harmonia.app.build import build_optimizer, build_scheduler, parameter_groups
from harmonia.app.callbacks.base import Callback
from harmonia.app.config import (
    ExperimentConfig,
    ScheduleKind,
    dump_config,
    load_config,
    to_dict,
)
from harmonia.app.logs import RunLogger, check_loggers, open_run_logger
from harmonia.app.train.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    atomic_save,
    capture_rng_state,
    last_checkpoint_path,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
)
from harmonia.app.train.compile import CompiledStep
from harmonia.app.train.distributed import convert_batchnorm, init_distributed
from harmonia.app.train.precision import MixedPrecision
from harmonia.data.sources import EpochLoader
from harmonia.distributed import all_reduce_sum
from harmonia.errors import CheckpointError, ConfigError, NonFiniteLossError, RunFolderExistsError
from harmonia.reproducibility import apply_reproducibility


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``results.json``)."""

    run_dir: Path
    test: dict[str, float]
    probe: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    seconds: float = 0.0
    num_threads: int = 0  # CPU threads the run trained with (its numbers repeat at this count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "test": self.test,
            "probe": self.probe,
            "epochs": self.epochs,
            "seconds": self.seconds,
            "num_threads": self.num_threads,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: what a checkpoint must hold for ``--resume``
RESUME_KEYS = ("epoch", "global_step", "model", "optimizer", "scheduler", "rng", "callbacks")
#: ``train`` settings a resumed run may change (where its metrics go)
LOGGING_KEYS = ("loggers", "mlflow_uri", "mlflow_experiment")
#: ``train`` settings a resumed run may change that change its numbers in the last digits only
SPEED_KEYS = ("compile", "compile_mode")


class BaseTrainer:
    """Train ``cfg``'s model on its dataset.

    Args:
        cfg: the validated experiment config.
        callbacks: hook objects (see :class:`~harmonia.app.callbacks.base.Callback`).
        resume: continue the run in ``out_dir/name`` from its last checkpoint.
        overwrite: delete an existing run folder first.
        progress: show progress bars.
        dataset: a loaded dataset to use instead of loading ``cfg.data``.
        model: your own model to train instead of building ``cfg.model`` (``task: classify``; see
            :class:`~harmonia.app.train.trainer.Trainer` for the output contract).
    """

    model: nn.Module
    train_loader: EpochLoader
    dataset: Any
    #: splits evaluated at the end of an epoch ("test" is the one results report)
    eval_splits: tuple[str, ...] = ("val", "test")

    def __init__(
        self,
        cfg: ExperimentConfig,
        callbacks: Sequence[Callback] = (),
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        dataset: Any = None,
        model: nn.Module | None = None,
    ) -> None:
        if resume and overwrite:
            raise ConfigError("choose one of --resume (continue the run) and --overwrite (start it again)")
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.checkpoint_path = last_checkpoint_path(self.run_dir)
        self.resume = resume
        self.user_model = model

        self.num_threads = apply_reproducibility(cfg.train.reproducibility, cfg.train.num_threads)
        self.device = resolve_device(cfg.train.device)
        self.dist = init_distributed(self.device, cfg.train.dist_timeout_s)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.progress = progress and self.dist.is_main
        self.precision = MixedPrecision(cfg.train.precision, self.device)
        check_loggers(cfg)
        seed_everything(cfg.train.seed)
        self.step_metrics: dict[str, float] = {}  # callbacks add per-step values; logged every step
        self.setup(dataset)
        self.parallel_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.parallel_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,  # batch statistics are global already (CrossRankBatchNorm)
                find_unused_parameters=self.find_unused_parameters,
            )
        # what a training step calls forward: compiled under train.compile (after DDP wrapping, as PyTorch
        # advises); self.model stays the original module (checkpoints, evaluation, methods' own passes)
        self.step_model: Any = self.parallel_model
        if cfg.train.compile and self.find_unused_parameters:
            raise ConfigError(
                "train.compile: steps of this run leave some parameters without gradient (a balancing method "
                "that trains one modality per step, such as mla with schedule=per_step or reconboost, or the "
                "minilm text encoder); a compiled model's backward gives them zero gradients instead, which "
                "momentum and weight decay do not skip, so the run would train differently. Set "
                "train.compile=false"
            )
        if cfg.train.compile:
            self.step_model = CompiledStep(self.parallel_model, cfg.train.compile_mode, "model")
        self.optimizer = build_optimizer(cfg.optim, parameter_groups(self.model))
        self.num_epochs = planned_epochs(cfg.train.epochs, cfg.train.max_steps, len(self.train_loader))
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.num_epochs)
        # only now that the config, data and model are known to be good, touch the run folder
        self._on_main_first(lambda: self._prepare_run_dir(resume, overwrite))
        self.epoch = 0  # the next epoch to run
        self.global_step = 0

    #: whether DistributedDataParallel must look for parameters a step leaves without gradient
    find_unused_parameters = False
    #: how a step turns its loss into gradients (set by the task in :meth:`setup`; see harmonia.app.backward)
    backward_strategy: Any

    # ----------------------------------------------------------------------------------------------
    # data-parallel plumbing

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move a freshly built model to the device; under data parallelism, make its batch statistics
        global. Tasks call this in :meth:`setup` before anything keeps references to its parameters."""
        model = model.to(self.device)
        return convert_batchnorm(model) if self.dist.enabled else model

    def _on_main_first(self, action: Any) -> None:
        """Run ``action`` on rank 0 only; the other ranks wait and raise the same error if it failed."""
        if not self.dist.enabled:
            action()
            return
        import torch.distributed as dist

        failure: list[Any] = [None]
        if self.dist.is_main:
            try:
                action()
            except Exception as exc:
                failure[0] = exc
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise failure[0]

    # ----------------------------------------------------------------------------------------------
    # what a task defines

    def setup(self, dataset: Any) -> None:
        """Load the data and build ``self.model`` and ``self.train_loader`` (and anything else needed)."""
        raise NotImplementedError

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, float]:
        """One optimisation step on ``batch``; returns the model output and the loss value."""
        raise NotImplementedError

    def epoch_tally(self) -> dict[str, float]:
        """Running sums a task accumulates over an epoch's training steps (see :meth:`tally_step`)."""
        return {}

    def tally_step(self, tally: dict[str, float], batch: dict[str, Any], output: Any) -> None:
        """Add one step's contribution to ``tally``."""

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model on ``split``, keyed ``"<split>/<metric>"``."""
        raise NotImplementedError

    def probe_encoders(self) -> dict[str, float]:
        """Linear-probe test accuracy of each frozen encoder, keyed by modality."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------
    # run folder and checkpoints

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        exists = self.run_dir.exists() and any(self.run_dir.iterdir())
        remove_stale_temp_files(self.checkpoint_path)  # left by a kill during a checkpoint write
        if resume:
            if not self.checkpoint_path.exists():
                raise CheckpointError(
                    f"cannot resume: no checkpoint at {self.checkpoint_path}; "
                    "run without --resume to start it"
                )
            saved = load_config(self.run_dir / "config.yaml")
            self._check_resumable(saved)
            return
        if exists:
            if not overwrite:
                raise RunFolderExistsError(
                    f"run folder {self.run_dir} already exists; pass --resume to continue it, --overwrite to "
                    f"start it again, or choose another name with name=..."
                )
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))

    def _check_resumable(self, saved: ExperimentConfig) -> None:
        """A run may be resumed with more epochs, but not with a different recipe."""
        ours, theirs = to_dict(self.cfg), to_dict(saved)
        for free in ("epochs", *LOGGING_KEYS, *SPEED_KEYS):  # may change on resume: the recipe stays
            ours["train"][free] = theirs["train"][free] = None
        if ours != theirs:
            diffs = _dict_diff(theirs, ours)
            raise ConfigError(
                f"cannot resume {self.run_dir}: the config differs from the saved one ({'; '.join(diffs)}). "
                f"Resume with the same config, or start a new run with another name=..."
            )
        if self.cfg.train.epochs != saved.train.epochs and self.cfg.optim.schedule is ScheduleKind.COSINE:
            raise ConfigError(
                f"cannot resume {self.run_dir} with train.epochs={self.cfg.train.epochs} (saved: "
                f"{saved.train.epochs}): the cosine schedule was laid out for {saved.train.epochs} epochs"
            )

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/last.pt`` atomically (rank 0 only; every rank holds the same state)."""
        if not self.dist.is_main:
            return
        state = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "callbacks": self._callback_states(),
            "precision": self.precision.state_dict(),
            "config": to_dict(self.cfg),
            "num_threads": self.num_threads,
        }
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.checkpoint_path)

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path, required=RESUME_KEYS)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved, ours = state["callbacks"], self._callback_states()
        if set(saved) != set(ours):
            raise CheckpointError(
                f"checkpoint {path} holds the state of {sorted(saved) or 'no stateful methods'}, "
                f"this run has "
                f"{sorted(ours) or 'none'}; resume with the same methods enabled"
            )
        for key, cb in self._keyed_callbacks().items():
            if key in saved:
                cb.load_state_dict(saved[key])
        self.precision.load_state_dict(state.get("precision", {}))
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        restore_rng_state(state["rng"])
        started_with = state.get("num_threads")
        if started_with is not None and started_with != self.num_threads:
            warnings.warn(
                f"the run was started with {started_with} CPU threads and resumes with {self.num_threads}: "
                f"its numbers will differ from an uninterrupted run in the last digits; resume with "
                f"train.num_threads={started_with} (or train with train.reproducibility=any_threads)",
                stacklevel=2,
            )
        if self.num_epochs < self.epoch:
            raise ConfigError(
                f"train.epochs={self.cfg.train.epochs} (max_steps={self.cfg.train.max_steps}) is below the "
                f"{self.epoch} epochs the checkpoint has done"
            )
        if self.dist.is_main:  # train.epochs may have grown
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))

    def _check_finite_state(self) -> None:
        """Refuse to overwrite the last good checkpoint with non-finite weights or statistics."""
        bad = [
            name
            for name, t in self.model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            raise NonFiniteLossError(
                f"parameters or buffers became NaN/inf during epoch {self.epoch + 1} "
                f"({', '.join(bad[:3])}); "
                f"the checkpoint of the epoch before is kept at {self.checkpoint_path}. "
                f"Lower optim.lr or set "
                f"optim.grad_clip_norm and start again with --overwrite"
            )

    def _keyed_callbacks(self) -> dict[str, Callback]:
        keyed: dict[str, Callback] = {}
        for cb in self.callbacks:
            name = type(cb).__qualname__
            key, n = name, 1
            while key in keyed:
                n += 1
                key = f"{name}#{n}"
            keyed[key] = cb
        return keyed

    def _callback_states(self) -> dict[str, dict[str, Any]]:
        """States of the stateful callbacks, keyed by class name (stateless hooks are not recorded)."""
        states = {key: cb.state_dict() for key, cb in self._keyed_callbacks().items()}
        return {key: st for key, st in states.items() if st}

    # ----------------------------------------------------------------------------------------------
    # training

    def fit(self) -> TrainResult:
        """Train for ``cfg.train.epochs`` epochs (or ``cfg.train.max_steps`` steps), then evaluate on test and
        probe each encoder."""
        start = time.perf_counter()
        if self.resume:
            self.load_checkpoint(self.checkpoint_path)
        logger: RunLogger | NullLogger = (
            open_run_logger(self.cfg, self.run_dir, self.resume, self.epoch, self.global_step)
            if self.dist.is_main
            else NullLogger()
        )
        self.logger = logger
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            epochs, last_test = self.num_epochs, None
            while self.epoch < epochs:
                epoch_start = time.perf_counter()
                train_stats = self._train_epoch()
                train_stats["train/epoch_seconds"] = time.perf_counter() - epoch_start
                self.scheduler.step()
                metrics = dict(train_stats)
                self._check_finite_state()  # before evaluation, whose errors would hide the cause
                if (self.epoch + 1) % self.cfg.train.eval_every == 0 or self.epoch + 1 == epochs:
                    for split in self.eval_splits:
                        metrics |= self.evaluate(split)
                    last_test = {k: v for k, v in metrics.items() if k.startswith("test/")}
                for cb in self.callbacks:
                    cb.on_epoch_end(self, self.epoch, metrics)
                logger.log("epoch", self.global_step, self.epoch, metrics)
                self.epoch += 1
                self.save_checkpoint()
            if last_test is None:  # resumed after the last epoch
                last_test = self.evaluate("test")
            test = {k.removeprefix("test/"): v for k, v in last_test.items()}
            probe = self.probe_encoders() if self.cfg.train.probe else {}
            logger.log(
                "final",
                self.global_step,
                self.epoch,
                {**{f"test/{k}": v for k, v in test.items()}, **{f"probe/{k}": v for k, v in probe.items()}},
            )
        except BaseException as exc:
            logger.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        logger.close()
        for cb in self.callbacks:
            cb.on_train_end(self)
        result = TrainResult(
            self.run_dir, test, probe, self.epoch, time.perf_counter() - start, self.num_threads
        )
        if self.dist.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=1))
        logger.finish()  # last: uploads the run folder's files (MLflow)
        return result

    def _train_epoch(self) -> dict[str, float]:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        total_loss, total_seen = 0.0, 0
        tally = self.epoch_tally()
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {self.epoch + 1}/{self.num_epochs}",
            disable=not self.progress,
            leave=False,
            unit="batch",
        )
        max_steps = self.cfg.train.max_steps
        for batch in bar:
            if max_steps is not None and self.global_step >= max_steps:
                break  # the last epoch of a max_steps run is cut short
            batch = to_device(batch, self.device)
            output, loss = self.train_step(batch)
            n = int(batch["indices"].shape[0])
            total_loss += loss * n
            total_seen += n
            self.tally_step(tally, batch, output)
            # methods' per-step statistics (ρ, k, q) are logged every step; the loss every log_every
            if self.step_metrics or self.global_step % self.cfg.train.log_every == 0:
                scaler = {"train/loss_scale": self.precision.loss_scale} if self.precision.scaler else {}
                self.logger.log(
                    "step",
                    self.global_step,
                    self.epoch,
                    {
                        "train/loss": loss,
                        "train/lr": self.optimizer.param_groups[0]["lr"],
                        **scaler,
                        **self.step_metrics,
                    },
                )
            bar.set_postfix(loss=f"{total_loss / total_seen:.3f}")
        if self.dist.enabled:  # epoch statistics of the global batches
            sums = all_reduce_sum(
                torch.tensor([total_loss, total_seen, *tally.values()], dtype=torch.float64)
            )
            total_loss, total_seen = float(sums[0]), int(sums[1])
            tally = dict(zip(tally, sums[2:].tolist(), strict=True))
        stats = {"train/loss": total_loss / total_seen}
        stats.update({f"train/{k}": v / total_seen for k, v in tally.items()})
        if self.precision.scaler is not None:
            stats["train/skipped_steps"] = float(self.precision.skipped_steps)
        return stats

    def backward(self, batch: dict[str, Any], losses: Any, output: Any) -> None:
        """The backward pass of a step, then the callbacks' ``after_backward``.

        Under ``16-mixed`` the strategy backpropagates the loss times the scaler's scale, and the gradients
        are unscaled before any callback reads them: balancing methods (OGM, MMPareto, ...), gradient
        clipping and ``before_optimizer_step`` see the true gradients.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_strategy.backward(self, batch, losses, output)
        self.precision.unscale(self.optimizer)
        for cb in self.callbacks:
            cb.after_backward(self, batch, output)

    def _finish_step(self) -> None:
        """After the backward pass: clip, let callbacks see the gradients, step the optimizer (through the
        gradient scaler under ``16-mixed``, which skips a step with inf/NaN gradients)."""
        if self.cfg.optim.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm)
        for cb in self.callbacks:
            cb.before_optimizer_step(self)
        self.precision.step(self.optimizer)
        self.global_step += 1

    def _raise_non_finite(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        last = (
            f"the last good checkpoint is {self.checkpoint_path} (end of epoch {self.epoch}); "
            if self.checkpoint_path.exists()
            else "no checkpoint was written yet; "
        )
        raise NonFiniteLossError(
            f"the training loss became {loss.item()} at epoch {self.epoch + 1}, step {self.global_step} "
            f"(batch samples {batch['indices'][:8].tolist()}...). {last}lower optim.lr or set "
            f"optim.grad_clip_norm and start again with --overwrite"
        )


class NullLogger:
    """The logger of ranks other than 0: logs nothing."""

    def log(self, kind: str, step: int, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def close(self, status: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def planned_epochs(epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    """Epochs a run has: ``epochs``, or with ``max_steps`` the ceil(max_steps / steps_per_epoch) epochs
    that hold that many steps (the last one cut short)."""
    if max_steps is None:
        return epochs
    return max(1, math.ceil(max_steps / max(1, steps_per_epoch)))


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device, with an error that says what is available."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device: {name!r} asked for a GPU but CUDA is not available to this torch "
                f"({torch.__version__}); use train.device=cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device: {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    moved = {**batch, "inputs": {m: t.to(device, non_blocking=True) for m, t in batch["inputs"].items()}}
    if "labels" in batch:
        moved["labels"] = batch["labels"].to(device, non_blocking=True)
    return moved


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _dict_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}: saved {va!r}, now {vb!r}")
    return diffs


__all__ = ["BaseTrainer", "TrainResult", "resolve_device", "seed_everything"]
