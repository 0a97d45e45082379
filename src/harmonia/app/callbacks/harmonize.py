"""The trainer's use of the harmonizer: one callback, through the same public API a user's loop calls."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmonia.app.callbacks.base import Callback, TrainerView
from harmonia.distributed import all_gather_rows
from harmonia.gradients.curriculum import ConflictCurriculum
from harmonia.gradients.harmonizer import GradientHarmonizer, HarmonizeMode
from harmonia.losses.vatt import ContrastiveGrain, VATTLossOutput
from harmonia.metrics.classification import auroc, drop_precision
from harmonia.models.pretrain import PretrainOutput, TriModalPretrainModel, VideoAnchor

CONFLICTS_DIR = "conflicts"


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def build_harmonize_callback(
    cfg: Any, model: TriModalPretrainModel, steps_per_epoch: int, pretrain: Any
) -> HarmonizeCallback:
    """The harmonizer the ``harmonize`` config section asks for (``mode`` feature, parameter or batch).
    Its anchor is the pooled video feature, or the video tokens when a loss is fine-grained (its gradient
    bypasses the pooled feature)."""
    mode = HarmonizeMode(_value(cfg.mode))
    pooled = ContrastiveGrain.FINEGRAINED not in (pretrain.va_loss, pretrain.vt_loss)
    anchor = VideoAnchor(model, pooled=pooled)
    curriculum = None
    if cfg.curriculum:
        curriculum = ConflictCurriculum(
            cfg.curriculum_start,
            cfg.curriculum_end,
            steps=max(1, round(cfg.curriculum_epochs * steps_per_epoch)),
            shape=cfg.curriculum_shape,
            keep=cfg.curriculum_keep,
            start_fraction=cfg.curriculum_start_fraction,
            warmup_steps=round(cfg.curriculum_warmup_epochs * steps_per_epoch),
            deferred=_value(cfg.curriculum_start_when) == "gate",
        )
    parameter = mode is HarmonizeMode.PARAMETER
    harmonizer = GradientHarmonizer(
        mode=mode.value,
        rule=cfg.rule,
        curriculum=curriculum,
        params=model.anchor_parameters() if mode is HarmonizeMode.BATCH else None,
        gradvac_beta=cfg.gradvac_beta,
        anchor_module=anchor if parameter else None,
        anchor_params=anchor.anchor_named_parameters() if parameter else None,
    )
    return HarmonizeCallback(
        harmonizer,
        {"va": pretrain.weight_va, "vt": pretrain.weight_vt},
        anchor_key="video" if pooled else "video_tokens",
    )


class HarmonizeCallback(Callback):
    """Runs the pre-training backward through a :class:`GradientHarmonizer`.

    Logs the harmonizer's statistics every step (``harmonize/conflict_fraction``, ``kept_fraction``,
    ``mean_cosine``, ``threshold``, ``curriculum_active``). In feature mode it also keeps every training
    triplet's conflict score and per-sample losses: each epoch's go to ``conflicts/epoch_NNN.npz`` in the
    run folder, and the run ends with ``conflict_histograms.png``. When the data has ground-truth noise
    flags, the epoch metrics get ``train/conflict_auroc`` (how well −cos finds the misaligned triplets)
    beside the loss-based detectors' ``train/loss_vt_auroc`` and ``train/loss_sum_auroc``, and, with a
    curriculum, the precision of what it dropped: ``train/drop_precision`` (share of the dropped
    triplets that are truly misaligned), ``train/noise_base_rate``, ``train/drop_lift`` (their ratio) and
    ``train/dropped_fraction``. ``anchor_key`` names the ``output.features`` entry both
    losses flow through: ``video`` (pooled) or ``video_tokens`` (for fine-grained losses).
    """

    def __init__(
        self, harmonizer: GradientHarmonizer, weights: Mapping[str, float], anchor_key: str = "video"
    ) -> None:
        self.harmonizer, self.weights, self.anchor_key = harmonizer, dict(weights), anchor_key
        self._indices: list[torch.Tensor] = []
        self._cosines: list[torch.Tensor] = []
        self._kept: list[torch.Tensor] = []
        self._losses: dict[str, list[torch.Tensor]] = {"va": [], "vt": []}

    def backward(
        self, trainer: TrainerView, batch: Mapping[str, Any], losses: VATTLossOutput, output: PretrainOutput
    ) -> None:
        video = batch["inputs"]["video"] if self.harmonizer.mode is HarmonizeMode.PARAMETER else None
        anchor = output.features[self.anchor_key]
        # under 16-mixed, the loss scale S multiplies both weights: every gradient the harmonizer takes and
        # leaves is S times the true one (realignment is scale-equivariant), and the trainer unscales them
        scale = trainer.precision.loss_scale if hasattr(trainer, "precision") else 1.0
        weights = {k: w * scale for k, w in self.weights.items()}
        stats = self.harmonizer.backward(losses.per_sample, anchor, weights, video)
        trainer.step_metrics.update(stats.metrics())
        if self.harmonizer.mode is not HarmonizeMode.BATCH:
            self._indices.append(batch["indices"].cpu())
            self._cosines.append(stats.cosine.float().cpu())
            self._kept.append(stats.kept.cpu())
            for key, parts in self._losses.items():
                parts.append(losses.per_sample[key].detach().float().cpu())

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        if not self._cosines:
            return
        # every rank's triplets (each rank saw an equal share of every global batch)
        index, cosine, kept, loss_va, loss_vt = (
            all_gather_rows(torch.cat(parts))
            for parts in (
                self._indices,
                self._cosines,
                [k.to(torch.uint8) for k in self._kept],
                self._losses["va"],
                self._losses["vt"],
            )
        )
        kept = kept.bool()
        self._indices, self._cosines, self._kept = [], [], []
        self._losses = {"va": [], "vt": []}
        truth = getattr(trainer.dataset, "train_noise", None)  # None: real data has no ground truth
        flags = truth[index] if truth is not None else torch.zeros(len(index), dtype=torch.bool)
        if trainer.dist.is_main:
            folder = trainer.run_dir / CONFLICTS_DIR
            folder.mkdir(exist_ok=True)
            np.savez(
                folder / f"epoch_{epoch:03d}.npz",
                index=index.numpy(),
                cosine=cosine.numpy(),
                kept=kept.numpy(),
                noisy=flags.numpy(),
                loss_va=loss_va.numpy(),
                loss_vt=loss_vt.numpy(),
            )
        metrics["train/conflict_mean_cosine"] = float(cosine.mean())
        if flags.any() and not flags.all():
            metrics["train/conflict_auroc"] = auroc(-cosine, flags)
            metrics["train/loss_vt_auroc"] = auroc(loss_vt, flags)
            metrics["train/loss_sum_auroc"] = auroc(loss_va + loss_vt, flags)
        if truth is not None and self.harmonizer.curriculum is not None:
            for key, value in drop_precision(kept, flags).items():
                if not np.isnan(value):
                    metrics[f"train/{key}"] = value

    def on_train_end(self, trainer: TrainerView) -> None:
        if not trainer.dist.is_main:
            return
        files = sorted((trainer.run_dir / CONFLICTS_DIR).glob("epoch_*.npz"))
        if files:
            plot_conflict_histograms(files, trainer.run_dir / "conflict_histograms.png")

    def state_dict(self) -> dict[str, Any]:
        return self.harmonizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.harmonizer.load_state_dict(state)


def plot_conflict_histograms(files: list[Path], out: Path, panels: int = 6) -> None:
    """Histograms of the per-triplet conflict score of up to ``panels`` evenly spaced epochs, clean and
    misaligned triplets apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [
        files[i]
        for i in np.unique(np.linspace(0, len(files) - 1, min(panels, len(files))).round().astype(int))
    ]
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 2.8), sharey=True, squeeze=False)
    bins = np.linspace(-1, 1, 41)
    for ax, path in zip(axes[0], chosen, strict=True):
        data = np.load(path)
        cos, noisy = data["cosine"], data["noisy"].astype(bool)
        ax.hist(cos[~noisy], bins=bins, alpha=0.7, label="clean", density=True)
        if noisy.any():
            ax.hist(cos[noisy], bins=bins, alpha=0.7, label="misaligned", density=True)
        ax.set_title(f"epoch {int(path.stem.split('_')[1]) + 1}", fontsize=9)
        ax.set_xlabel("cos(g_va, g_vt)")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
