"""Supervised multimodal classification: the trainer of ``task: classify``.

Run folder, checkpoints, resume and logging come from :class:`~harmonia.app.train.base.BaseTrainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from harmonia.app.build import build_balancing, build_model
from harmonia.app.callbacks.base import transforms_features
from harmonia.app.registry import BACKWARD, BALANCING, DATASETS
from harmonia.app.train.base import BaseTrainer, TrainResult, seed_everything, to_device
from harmonia.app.train.compile import keep_features
from harmonia.data.avdigits import AVDigits
from harmonia.data.sources import ClassificationData
from harmonia.errors import ConfigError
from harmonia.metrics.classification import classification_metrics
from harmonia.metrics.probe import linear_probe
from harmonia.models import MultimodalClassifier


class Trainer(BaseTrainer):
    """Train a multimodal classifier (``task: classify``) with the balancing methods ``balance`` lists.

    Args:
        cfg: the validated experiment config.
        callbacks: hook objects (see :class:`~harmonia.app.callbacks.Callback`).
        resume: continue the run in ``out_dir/name`` from its last checkpoint.
        overwrite: delete an existing run folder first.
        progress: show progress bars.
        dataset: a loaded :class:`~harmonia.data.avdigits.AVDigits` or any
            :class:`~harmonia.data.sources.ClassificationData` to use instead of loading ``cfg.data``.
        model: your own ``nn.Module`` instead of the one ``cfg.model`` describes. The contract (which
            :class:`~harmonia.models.MultimodalClassifier` follows): ``model(inputs, transform=None)`` takes
            ``{modality: tensor}``, applies ``transform`` to the per-modality features between its encoders
            and its fusion, and returns an object with ``logits`` [B, C] and ``unimodal_logits``
            ``{m: [B, C]}``; ``model.encoders[m]`` maps a modality's input to its features (for OGM and the
            linear probe); ``model.modalities`` names them, and ``model.unimodal_logits(features)`` (or
            ``model.fusion.unimodal_logits``) gives unimodal logits from features (for OPM).
    """

    model: MultimodalClassifier
    dataset: ClassificationData

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        """A balancing method that trains one modality at a time leaves the others without gradient."""
        return any(
            BALANCING.get(entry.name).leaves_parameters_unused(entry.settings) for entry in self.cfg.balance
        )

    def setup(self, dataset: AVDigits | ClassificationData | None) -> None:
        cfg = self.cfg
        self.dataset = self._load_data(dataset)
        self.modalities = list(self.dataset.modalities)
        self.eval_splits = self.dataset.eval_splits
        model = self.user_model
        if model is None:
            model = build_model(
                cfg.model, self.modalities, self.dataset.input_channels, self.dataset.num_classes
            )
        elif not hasattr(model, "encoders") and cfg.train.probe:
            raise ConfigError(
                f"{type(model).__name__} has no 'encoders' (modality -> encoder module), which the linear "
                "probe needs; add them to the model, or set train.probe=false"
            )
        self.model = self.prepare_model(model)  # type: ignore[assignment]
        if cfg.train.batch_size > self.dataset.train_size:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} exceeds the {self.dataset.train_size} training "
                "samples; lower train.batch_size"
            )
        self.backward_strategy = BACKWARD.get("plain")(self)
        self._eager_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
        balance = build_balancing([(e.name, e.settings) for e in cfg.balance], self.model, cfg.train.seed)
        if balance is not None:
            self.callbacks.insert(0, balance)
        self.train_loader = self.dataset.train_loader(
            cfg.train.batch_size, cfg.train.seed, self.dist.rank, self.dist.world_size
        )
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} leaves no training batch (under torchrun the last "
                f"incomplete global batch is dropped); lower train.batch_size"
            )

    def _load_data(self, dataset: AVDigits | ClassificationData | None) -> ClassificationData:
        if dataset is not None and not isinstance(dataset, AVDigits):
            return dataset
        data: ClassificationData = DATASETS.get(self.cfg.data.name).build(self, dataset)
        return data

    def epoch_tally(self) -> dict[str, float]:
        return {"accuracy": 0.0, **{f"unimodal_accuracy/{m}": 0.0 for m in self.modalities}}

    def tally_step(self, tally: dict[str, float], batch: dict[str, Any], output: Any) -> None:
        labels = batch["labels"]
        tally["accuracy"] += int((output.logits.argmax(1) == labels).sum())
        for m in self.modalities:
            tally[f"unimodal_accuracy/{m}"] += int((output.unimodal_logits[m].argmax(1) == labels).sum())

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, float]:
        """One optimisation step on ``batch``; returns the model output and the loss value."""
        self.step_metrics = {}
        with self.precision.autocast():  # train.precision: the forward pass and the loss
            for cb in self.callbacks:
                cb.before_forward(self, batch)
            output = self.step_model(batch["inputs"], transform=self._feature_transform())
            loss = F.cross_entropy(output.logits.float(), batch["labels"])
            for cb in self.callbacks:
                loss = cb.adjust_loss(self, batch, output, loss)
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, batch)
        self.backward(batch, loss, output)
        self._finish_step()
        return output, float(loss.detach())

    def transform_features(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The callbacks' feature transforms in turn (between the model's encoders and its fusion head)."""
        for cb in self.callbacks:
            features = cb.transform_features(self, features)
        return features

    def _feature_transform(self) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """What the training forward applies between encoders and fusion: the identity when no callback
        transforms features; under ``train.compile``, the callbacks' transforms run eagerly (a graph break:
        the methods' random draws and state updates stay exactly those of an eager step)."""
        if not any(transforms_features(cb) for cb in self.callbacks):
            return keep_features
        if self.cfg.train.compile:
            if self._eager_transform is None:  # one object for every step, so the compiled guards hold
                self._eager_transform = torch.compiler.disable(self.transform_features)
            return self._eager_transform
        return self.transform_features

    # ----------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def predict(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Fused logits, per-modality logits and labels over a whole split (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        logits: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        unimodal: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        for batch in self.dataset.eval_batches(split, self.cfg.train.eval_batch_size):
            batch = to_device(batch, self.device)
            with self.precision.autocast():
                out = self.model(batch["inputs"])
            logits.append(out.logits.float().cpu())
            for m in self.modalities:
                unimodal[m].append(out.unimodal_logits[m].float().cpu())
            labels.append(batch["labels"].cpu())
        self.model.train(was_training)
        return torch.cat(logits), {m: torch.cat(v) for m, v in unimodal.items()}, torch.cat(labels)

    def evaluate(self, split: str) -> dict[str, float]:
        """Accuracy, macro-F1 and mAP of the fused prediction, and each modality's unimodal accuracy."""
        logits, unimodal, labels = self.predict(split)
        metrics = classification_metrics(logits, labels, self.dataset.num_classes)
        out = {f"{split}/{k}": v for k, v in metrics.items()}
        for m, lg in unimodal.items():
            out[f"{split}/unimodal_accuracy/{m}"] = float((lg.argmax(1) == labels).float().mean())
        return out

    @torch.no_grad()
    def encoder_features(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each frozen encoder's features over a whole split (eval mode, no augmentation), and the labels."""
        was_training = self.model.training
        self.model.eval()
        features: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        labels: list[torch.Tensor] = []
        try:
            for batch in self.dataset.eval_batches(split, self.cfg.train.eval_batch_size):
                batch = to_device(batch, self.device)
                for m in self.modalities:
                    with self.precision.autocast():
                        encoded = self.model.encoders[m](batch["inputs"][m])
                    features[m].append(encoded.float().cpu())
                labels.append(batch["labels"].cpu())
        finally:
            self.model.train(was_training)
        return {m: torch.cat(v) for m, v in features.items()}, torch.cat(labels)

    def probe_encoders(self) -> dict[str, float]:
        """Linear-probe test accuracy of each frozen encoder (fit on train features)."""
        (train_x, train_y), (test_x, test_y) = self.encoder_features("train"), self.encoder_features("test")
        return {
            m: linear_probe(
                train_x[m], train_y, test_x[m], test_y, self.dataset.num_classes, seed=self.cfg.train.seed
            ).accuracy
            for m in self.modalities
        }


def train(cfg: Any, **kwargs: Any) -> TrainResult:
    """Convenience wrapper: build the trainer of ``cfg.task`` and run it."""
    from harmonia.app.train import build_trainer

    return build_trainer(cfg, **kwargs).fit()


__all__ = ["TrainResult", "Trainer", "seed_everything", "train"]
