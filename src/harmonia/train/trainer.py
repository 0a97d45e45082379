"""Supervised multimodal classification: the trainer of ``task: classify``.

Run folder, checkpoints, resume and logging come from :class:`~harmonia.train.base.BaseTrainer`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from harmonia.data.avdigits import AVDigits, check_modalities, load_avdigits
from harmonia.data.loader import BatchLoader
from harmonia.eval.metrics import classification_metrics
from harmonia.eval.probe import extract_features, linear_probe
from harmonia.models import MultimodalClassifier
from harmonia.train.base import BaseTrainer, TrainResult, seed_everything, to_device
from harmonia.train.build import build_balance_callback, build_model


class Trainer(BaseTrainer):
    """Train a :class:`~harmonia.models.MultimodalClassifier` (``task: classify``), with OGM / OPM when
    ``balance.method`` asks for them.

    Args:
        cfg: the validated experiment config.
        callbacks: hook objects (see :class:`~harmonia.train.callbacks.Callback`).
        resume: continue the run in ``out_dir/name`` from its last checkpoint.
        overwrite: delete an existing run folder first.
        progress: show progress bars.
        dataset: a loaded :class:`~harmonia.data.avdigits.AVDigits` to use instead of loading ``cfg.data``.
    """

    model: MultimodalClassifier

    def setup(self, dataset: AVDigits | None) -> None:
        cfg = self.cfg
        self.dataset = dataset or load_avdigits(cfg.data.avdigits, progress=self.progress)
        check_modalities(cfg.data.modalities, self.dataset.modalities)
        self.modalities = list(cfg.data.modalities)
        self.splits = {s: self.dataset.split(s, self.modalities) for s in ("train", "val", "test")}
        channels = {m: int(t.shape[1]) for m, t in self.splits["train"].inputs.items()}
        self.model = self.prepare_model(  # type: ignore[assignment]
            build_model(cfg.model, self.modalities, channels, self.dataset.num_classes)
        )
        balance = build_balance_callback(cfg.balance, self.model, cfg.train.seed, self.device)
        if balance is not None:
            self.callbacks.insert(0, balance)
        train = self.splits["train"]
        self.train_loader = BatchLoader(
            {**train.inputs, **train.train_inputs},
            train.labels,
            cfg.train.batch_size,
            shuffle=True,
            seed=cfg.train.seed,
            transforms=train.train_transforms,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

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
        for cb in self.callbacks:
            cb.before_forward(self, batch)

        def transform(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            for cb in self.callbacks:
                features = cb.transform_features(self, features)
            return features

        output = self.parallel_model(batch["inputs"], transform=transform)
        loss = F.cross_entropy(output.logits, batch["labels"])
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for cb in self.callbacks:
            cb.after_backward(self, batch, output)
        self._finish_step()
        return output, float(loss.detach())

    # ----------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def predict(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Fused logits, per-modality logits and labels over a whole split (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        data = self.splits[split]
        loader = BatchLoader(data.inputs, data.labels, self.cfg.train.eval_batch_size)
        logits: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        unimodal: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        for batch in loader:
            batch = to_device(batch, self.device)
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

    def probe_encoders(self) -> dict[str, float]:
        """Linear-probe test accuracy of each frozen encoder (fit on train features)."""
        results = {}
        train, test = self.splits["train"], self.splits["test"]
        for m in self.modalities:
            encoder = self.model.encoders[m]
            bs = self.cfg.train.eval_batch_size

            def chunks(t: torch.Tensor, bs: int = bs) -> list[torch.Tensor]:
                return [c.to(self.device) for c in t.split(bs)]

            train_x = extract_features(encoder, chunks(train.inputs[m])).cpu()
            test_x = extract_features(encoder, chunks(test.inputs[m])).cpu()
            probe = linear_probe(
                train_x, train.labels, test_x, test.labels, self.dataset.num_classes, seed=self.cfg.train.seed
            )
            results[m] = probe.accuracy
        return results


def train(cfg: Any, **kwargs: Any) -> TrainResult:
    """Convenience wrapper: build the trainer of ``cfg.task`` and run it."""
    from harmonia.train import build_trainer

    return build_trainer(cfg, **kwargs).fit()


__all__ = ["TrainResult", "Trainer", "seed_everything", "train"]
