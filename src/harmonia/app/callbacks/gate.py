"""The learnability gate of pre-training as a trainer callback: measured on clean validation data every
epoch (see :mod:`harmonia.metrics.gate` for the rule and the digit-axis diagnostic).

Logged every epoch, on validation batches of the training batch size B (the last partial batch is left
out):

* ``gate/loss_va``, ``gate/loss_vt``: mean per-sample losses of the clean triplets, beside
  ``gate/ln_batch`` = ln B (a loss at chance) and ``gate/loss_va_threshold`` = ln B − margin;
* ``gate/video_to_audio/R@1``, ``R@10``, ``gate/video_to_text/R@1``, ``R@10``: retrieval over the whole
  validation split, beside ``gate/recall_threshold`` = factor · K / N;
* ``gate/axis_va``, ``gate/axis_vt``: the digit-axis diagnostic on synthetic misaligned triplets (half of
  each batch has its captions swapped in pairs of clips of different digits);
* ``gate/val_conflict_auroc``: how well −cos(g_va, g_vt) finds those swapped triplets, beside
  ``gate/val_loss_vt_auroc`` (the per-sample L_vt as detector);
* ``gate/passed`` (0/1) and ``gate/first_passed_epoch`` (the first epoch, counted from 0, at which it
  passed; −1 while it has not).

When the gate first passes, every function in ``on_pass`` is called with the epoch (the trainer starts a
deferred curriculum there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from harmonia.app.callbacks.base import Callback
from harmonia.gradients.realign import row_cosine
from harmonia.losses.vatt import VATTLoss
from harmonia.metrics.classification import auroc
from harmonia.metrics.gate import GateRule, digit_axis_cosines, swap_pairs

SWAP_FRACTION = 0.5  # share of each validation batch whose captions are swapped for the diagnostic


class LearnabilityGate(Callback):
    """Measures the gate on ``split`` (default ``val``) at the end of every epoch."""

    def __init__(self, rule: GateRule | None = None, split: str = "val", seed: int = 0) -> None:
        self.rule = rule or GateRule()
        self.split, self.seed = split, seed
        self.first_passed_epoch: int | None = None
        self.on_pass: list[Callable[[int], None]] = []

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        gate = measure_gate(trainer, self.rule, self.split, self.seed, metrics)
        passed = bool(gate.pop("passed"))
        if passed and self.first_passed_epoch is None:
            self.first_passed_epoch = epoch
            for action in self.on_pass:
                action(epoch)
        metrics.update({f"gate/{k}": v for k, v in gate.items()})
        metrics["gate/passed"] = float(passed)
        metrics["gate/first_passed_epoch"] = float(
            -1 if self.first_passed_epoch is None else self.first_passed_epoch
        )

    def state_dict(self) -> dict[str, Any]:
        return {"first_passed_epoch": self.first_passed_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_passed_epoch = state.get("first_passed_epoch")


def measure_gate(
    trainer: Any,  # a PretrainTrainer (its embed, loss and dataset)
    rule: GateRule,
    split_name: str,
    seed: int,
    evaluated: dict[str, float] | None = None,
) -> dict[str, float]:
    """The gate's measurements of ``trainer``'s current model on ``split_name`` (see the module doc);
    retrieval is taken from ``evaluated`` when this epoch's evaluation already holds it."""
    split = trainer.dataset.split(split_name)
    n = len(split)
    batch = min(trainer.cfg.train.batch_size, n)
    loss = VATTLoss(
        trainer.loss.temperature,
        trainer.loss.weight_va,
        trainer.loss.weight_vt,
        va=trainer.loss.va,
        vt=trainer.loss.vt,
        finegrained=trainer.loss.finegrained,
        gather=False,  # every rank measures the same validation data on its own
    )
    anchor_key = "video" if not loss.needs_tokens else "video_tokens"
    rng = np.random.default_rng(seed)  # the same synthetic swaps every epoch
    sums = {"va": 0.0, "vt": 0.0}
    anchors, grads_va, grads_vt, cosines, swapped, wrong, losses_vt = [], [], [], [], [], [], []
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n - batch + 1, batch):
            inputs = {k: v[start : start + batch].to(trainer.device) for k, v in split.inputs.items()}
            labels = split.labels[start : start + batch]
            with torch.enable_grad(), trainer.precision.autocast():
                out = trainer.forward(inputs)
                clean = loss.from_output(out)
                for key in sums:
                    sums[key] += float(clean.per_sample[key].detach().sum())
                perm = torch.from_numpy(swap_pairs(labels.numpy(), SWAP_FRACTION, rng))
                noisy = loss.from_output(_permute_text(out, perm.to(out.text.device)))
                anchor = out.features[anchor_key]
                g_va, g_vt = (
                    torch.autograd.grad(noisy.per_sample[k].mean(), anchor, retain_graph=True)[0]
                    for k in ("va", "vt")
                )
            flags = perm != torch.arange(batch)
            anchors.append(anchor.detach().cpu())
            grads_va.append(g_va[flags.to(g_va.device)].cpu())
            grads_vt.append(g_vt[flags.to(g_vt.device)].cpu())
            cosines.append(row_cosine(g_va.flatten(1), g_vt.flatten(1)).detach().cpu())
            losses_vt.append(noisy.per_sample["vt"].detach().cpu())
            swapped.append(flags)
            wrong.append(labels[perm][flags])
    finally:
        model.train(was_training)
    seen = len(anchors) * batch
    all_labels = split.labels[:seen]
    flags = torch.cat(swapped)
    # the rows of interest first, then every clean anchor (for the class means)
    order = torch.cat([torch.nonzero(flags).flatten(), torch.nonzero(~flags).flatten()])
    anchor_all, label_all = torch.cat(anchors)[order], all_labels[order]
    wrong_all = torch.cat(wrong)
    result = {
        "loss_va": sums["va"] / seen,
        "loss_vt": sums["vt"] / seen,
        "ln_batch": float(np.log(batch)),
        "loss_va_threshold": rule.loss_threshold(batch),
        "recall_threshold": rule.recall_threshold(n),
        "axis_va": float(digit_axis_cosines(torch.cat(grads_va), anchor_all, label_all, wrong_all).mean()),
        "axis_vt": float(digit_axis_cosines(torch.cat(grads_vt), anchor_all, label_all, wrong_all).mean()),
        "val_conflict_auroc": auroc(-torch.cat(cosines), flags),
        "val_loss_vt_auroc": auroc(torch.cat(losses_vt), flags),
    }
    retrieval = evaluated or {}
    if f"{split_name}/video_to_audio/R@{rule.k}" not in retrieval:
        retrieval = trainer.evaluate(split_name)
    for pair in ("video_to_audio", "video_to_text"):
        for k in (1, rule.k):
            result[f"{pair}/R@{k}"] = retrieval[f"{split_name}/{pair}/R@{k}"]
    result["passed"] = float(rule.passed(result["loss_va"], result[f"video_to_audio/R@{rule.k}"], batch, n))
    return result


def _permute_text(out: Any, perm: torch.Tensor) -> Any:
    """``out`` with the caption bags (embeddings, masks and word tokens) of clip i taken from perm[i]."""
    tokens = dict(out.tokens)
    masks = dict(out.token_masks)
    if "text" in tokens:
        tokens["text"] = tokens["text"][perm]
    if "text" in masks:
        masks["text"] = masks["text"][perm]
    return dataclasses.replace(
        out, text=out.text[perm], text_mask=out.text_mask[perm], tokens=tokens, token_masks=masks
    )
