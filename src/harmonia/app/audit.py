"""``harmonia audit``: rank every training triplet by its cross-modal gradient conflict.

The conflict score of triplet i is c_i = cos(g^va_i, g^vt_i), the cosine between the video–audio and the
video–text losses' gradients at the video anchor (``mode="feature"``) or on the anchor branch's parameters
(``mode="parameter"``), computed with a trained checkpoint over the training split in fixed batches of
``train.batch_size``. Triplets are written to a CSV from most to least conflicting; where the data carries
ground-truth misalignment flags, the AUROC of −c_i for finding them is reported, next to the AUROC of the
per-sample losses (the "small-loss" detector) as a reference.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harmonia.app.config import ExperimentConfig, TaskKind
from harmonia.app.train.checkpoint import load_checkpoint
from harmonia.errors import CheckpointError, ConfigError
from harmonia.gradients.harmonizer import per_sample_parameter_rows
from harmonia.gradients.realign import row_cosine
from harmonia.metrics.classification import auroc
from harmonia.models.pretrain import VideoAnchor


@dataclass
class AuditResult:
    """Per-triplet scores (in training-set order) and, with ground truth, each detector's AUROC."""

    cosine: torch.Tensor
    loss_va: torch.Tensor
    loss_vt: torch.Tensor
    noisy: torch.Tensor
    auroc: dict[str, float]
    csv_path: Path


def audit_conflicts(
    cfg: ExperimentConfig,
    checkpoint: str | Path,
    out_csv: str | Path,
    mode: str = "feature",
    progress: bool = True,
) -> AuditResult:
    """Score every training triplet of ``cfg``'s data with the model in ``checkpoint``; write ``out_csv``."""
    from harmonia.app.train.pretrain import INPUT_KEYS, PretrainTrainer

    if cfg.task is not TaskKind.PRETRAIN:
        raise ConfigError("harmonia audit scores pre-training triplets: give a task=pretrain config")
    if mode not in ("feature", "parameter"):
        raise ConfigError(f"audit mode must be 'feature' or 'parameter', got {mode!r}")
    if cfg.data.name == "shards":
        raise ConfigError(
            "harmonia audit scores tri-modal AV-Digits against its ground truth; for shards, train with "
            "harmonize.mode=feature: the run folder's conflicts/epoch_*.npz rank every training triplet "
            "(index = shard number x shard size + place in the shard) by conflict"
        )
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"no checkpoint at {checkpoint}; train the config first (harmonia train ...)")
    with tempfile.TemporaryDirectory() as tmp:  # a throw-away run folder: the audited run is not touched
        trainer = PretrainTrainer(cfg.model_copy(update={"out_dir": tmp}), progress=False)
    state = load_checkpoint(checkpoint, required=("model",))
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit this config's model: {exc}") from exc
    model, split = trainer.model, trainer.dataset.split("train")
    model.eval()
    pooled = not trainer.loss.needs_tokens  # fine-grained losses flow through the video tokens
    anchor_module = VideoAnchor(model, pooled=pooled)
    anchor_params = anchor_module.anchor_named_parameters()
    cosines, va, vt = [], [], []
    bs = cfg.train.batch_size
    for start in tqdm(range(0, len(split), bs), desc="audit", disable=not progress, unit="batch"):
        inputs = {k: split.inputs[k][start : start + bs].to(trainer.device) for k in INPUT_KEYS}
        out = trainer.forward(inputs)
        losses = trainer.compute_loss(out).per_sample
        anchor = out.features["video" if pooled else "video_tokens"]
        g_va = torch.autograd.grad(losses["va"].mean(), anchor, retain_graph=True)[0]
        g_vt = torch.autograd.grad(losses["vt"].mean(), anchor)[0]
        if mode == "parameter":
            g_va, g_vt = (
                per_sample_parameter_rows(anchor_module, anchor_params, inputs["video"], g)
                for g in (g_va, g_vt)
            )
        g_va, g_vt = g_va.flatten(1), g_vt.flatten(1)
        cosines.append(row_cosine(g_va, g_vt).detach().cpu())
        va.append(losses["va"].detach().cpu())
        vt.append(losses["vt"].detach().cpu())
    cosine, loss_va, loss_vt = torch.cat(cosines), torch.cat(va), torch.cat(vt)
    noisy = split.noisy
    scores = {
        "conflict (-cos)": -cosine,
        "loss_vt": loss_vt,
        "loss_va": loss_va,
        "loss_va + loss_vt": loss_va + loss_vt,
    }
    aurocs = {name: auroc(s, noisy) for name, s in scores.items()} if noisy.any() and not noisy.all() else {}
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "rank",
                "index",
                "conflict_cosine",
                "loss_va",
                "loss_vt",
                "misaligned_text",
                "misaligned_audio",
                "video_digit",
                "first_caption",
            ]
        )
        for rank, i in enumerate(torch.argsort(cosine).tolist(), start=1):
            writer.writerow(
                [
                    rank,
                    i,
                    f"{float(cosine[i]):.6f}",
                    f"{float(loss_va[i]):.5f}",
                    f"{float(loss_vt[i]):.5f}",
                    int(split.misaligned["text"][i]),
                    int(split.misaligned["audio"][i]),
                    int(split.labels[i]),
                    split.captions[i][0] if split.captions else "",
                ]
            )
    return AuditResult(cosine, loss_va, loss_vt, noisy, aurocs, out_csv)
