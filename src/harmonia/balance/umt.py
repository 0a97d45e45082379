"""UMT: the uni-modal teacher (Du et al., ICML 2023).

Chenzhuang Du, Jiaye Teng, Tingle Li, Yichen Liu, Tianyuan Yuan, Yue Wang, Yang Yuan, Hang Zhao, *On Uni-Modal
Feature Learning in Supervised Multi-Modal Learning*, ICML 2023 (arXiv:2305.01233; openreview HNbwCYFOZM; the
method first appeared in Du et al., *Improving Multi-Modal Learning with Uni-Modal Teachers*,
arXiv:2106.11059). Diagnosis ("modality laziness"): late-fusion joint training leaves each modality's
uni-modal features under-learned. When paired (cross-modal) features matter, the paper keeps joint training
and distils, into each modality's encoder of the multimodal model, the features of a uni-modal model of that
modality trained beforehand.

Objective of one step, for the features ``φ^m`` that modality m's encoder gives the fusion head, the features
``φ̂^m = T^m(x^m)`` of the frozen uni-modal teacher's encoder (same architecture) on the same input, and the
trainer's loss ``L`` (the fused cross-entropy)::

    L_UMT = L + λ Σ_{m ∈ teachers} MSE(φ^m, φ̂^m),    MSE(a, b) = 1/(B·d) Σ_{i,j} (a_ij - b_ij)²,

with the distillation active for epochs ``start_epoch <= e <= end_epoch`` (counted from 0). The layer is the
encoder's output, the features fed to the fusion head (BalanceMM's ``encoder_result[m]``); the distance is the
element-wise mean squared error (``nn.MSELoss()``); defaults λ = 10, epochs 0 to 80 (BalanceMM,
GeWu-Lab/BalanceBenchmark ``configs/trainer_config.yaml`` ``UMT: scaling: 10, modulation_starts: 0,
modulation_ends: 80``, and ``balancemm/trainer/UMT_trainer.py``: ``loss = CE(out, y) + scaling · Σ_m
MSE(teacher_m, student_m)``). Not verified against the paper's text (only its abstract was readable here): its
own λ, and whether it distils every modality; harmonia distils the modalities ``teachers`` lists.

Teachers: ``teachers`` maps a modality to a checkpoint written by ``harmonia train`` of a unimodal run
(``data.modalities=[m]``, same ``model.*`` settings; ``<out_dir>/<name>/checkpoints/last.pt``). Its ``model``
state dict's ``encoders.<m>.`` entries are loaded (``torch.load(weights_only=True)``: tensors only) into a
deep copy of the multimodal model's encoder of m, kept in eval mode (batch-norm running statistics, no
dropout) with ``requires_grad=False`` and run under ``no_grad`` on ``BalanceStep.inputs[m]``. The copies are
*not* registered submodules: their weights are in the teacher files, so they are neither saved again in the
run's checkpoints nor moved or switched to train mode with the method; the method's state keeps only a
SHA-256 fingerprint of each teacher, and a resume with a teacher file whose weights changed is refused.
BalanceMM differs: its teachers are whole unimodal models run in their default train mode (batch statistics),
and it distils every modality.

The student features are those the method's ``transform_features`` receives (the encoders' outputs, before
any feature-level method listed after UMT edits them), or ``output.features`` for a model that ignores
``transform``. Every term is a per-sample mean, so data-parallel training needs no extra communication; the
teachers are fixed, so a resumed run is exact. Logs ``balance/umt/distill/<m>`` (each unweighted MSE, while
active) and ``balance/umt/weight`` (λ, 0 outside the epoch window).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod
from harmonia.errors import CheckpointError, ConfigError, InputError
from harmonia.settings import setting


@dataclass
class UMTSettings:
    """UMT settings (defaults: BalanceMM's; see the module docstring); ``teachers`` has no default."""

    teachers: dict[str, str] = setting(
        help="modality -> checkpoint of a unimodal run of it (runs/<name>/checkpoints/last.pt); at least one"
    )
    weight: float = setting(10.0, help="λ: weight of the feature distillation MSE (BalanceMM: 10)", ge=0)
    start_epoch: int = setting(0, help="first epoch (from 0) with distillation (BalanceMM: 0)", ge=0)
    end_epoch: int | None = setting(
        80, help="last epoch with distillation, inclusive (BalanceMM: 80); null: to the end", ge=0
    )

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError(
                "umt teachers: is empty; map each distilled modality to the checkpoint of a unimodal run "
                "of it, e.g. {name: umt, teachers: {audio: runs/audio_only/checkpoints/last.pt}}"
            )
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ConfigError(
                f"umt end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch}), or null"
            )


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (in key order)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def teacher_state(path: str | Path, modality: str) -> dict[str, Tensor]:
    """The ``encoders.<modality>.`` entries (prefix removed) of the ``model`` state dict in a checkpoint
    written by ``harmonia train``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"umt teachers.{modality}: no teacher checkpoint at {file}; train a unimodal run first "
            f"(data.modalities=[{modality}], the same model.* settings) and give its "
            "<out_dir>/<name>/checkpoints/last.pt"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"umt teachers.{modality}: cannot read {file} as a harmonia checkpoint (tensors and plain "
            f"containers only) ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    model = state.get("model") if isinstance(state, Mapping) else None
    if not isinstance(model, Mapping):
        raise CheckpointError(
            f"umt teachers.{modality}: {file} is not a checkpoint of `harmonia train` (no 'model' state "
            "dict); give <out_dir>/<name>/checkpoints/last.pt of a unimodal run"
        )
    prefix = f"encoders.{modality}."
    own = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    if not own:
        have = sorted({k.split(".")[1] for k in model if k.startswith("encoders.") and k.count(".") > 1})
        raise ConfigError(
            f"umt teachers.{modality}: {file} has no encoder for modality '{modality}' (it has encoders for "
            f"{', '.join(have) or 'no modality'}); give the checkpoint of a run trained on '{modality}'"
        )
    return own


def load_teacher(encoder: nn.Module, path: str | Path, modality: str) -> nn.Module:
    """A frozen copy of ``encoder`` (eval mode, ``requires_grad=False``) holding the teacher weights of
    ``modality`` from the checkpoint at ``path``."""
    state = teacher_state(path, modality)
    teacher = copy.deepcopy(encoder)
    expected = teacher.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing[:5])}")
        if extra:
            parts.append(f"has unexpected {', '.join(extra[:5])}")
        if wrong:
            parts.append(f"has shapes {', '.join(wrong[:5])}")
        raise ConfigError(
            f"umt teachers.{modality}: the encoder in {path} does not fit this model's '{modality}' encoder: "
            f"it {'; '.join(parts)}; train the teacher with the same model.* settings (encoder, "
            "feature_dim, encoder_widths)"
        )
    teacher.load_state_dict(state, strict=True)
    teacher.requires_grad_(False)
    return teacher.eval()


class UMT(BalancingMethod):
    """UMT: ``loss -> loss + λ Σ_m MSE(φ^m, T^m(x^m))`` with frozen unimodal teacher encoders ``T^m``.

    Args:
        teachers: modality -> frozen teacher encoder (from :func:`load_teacher`); at least one.
        weight: λ (BalanceMM: 10).
        start_epoch, end_epoch: the epochs (inclusive, from 0) with distillation; ``end_epoch=None``: all.
    """

    Settings: ClassVar[type[Any]] = UMTSettings

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        weight: float = 10.0,
        start_epoch: int = 0,
        end_epoch: int | None = 80,
    ) -> None:
        super().__init__()
        if not teachers:
            raise ConfigError("UMT needs at least one teacher (modality -> frozen unimodal encoder)")
        if weight < 0 or start_epoch < 0 or (end_epoch is not None and end_epoch < start_epoch):
            raise ConfigError(
                f"UMT needs weight >= 0 and 0 <= start_epoch <= end_epoch, got {weight}, {start_epoch}, "
                f"{end_epoch}"
            )
        for t in teachers.values():
            t.requires_grad_(False)
            t.eval()
        # a plain dict: the teachers are not submodules (not in state_dict, not moved, never train mode)
        self.teachers: dict[str, nn.Module] = dict(teachers)
        self.weight, self.start_epoch, self.end_epoch = float(weight), int(start_epoch), end_epoch
        self.fingerprints = {m: state_fingerprint(t.state_dict()) for m, t in self.teachers.items()}
        self._features: dict[str, Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module, settings: UMTSettings | None = None, seed: int = 0) -> UMT:
        """UMT of ``model`` with the teachers ``settings.teachers`` names (loaded into copies of
        ``model.encoders[m]``; no randomness)."""
        if settings is None:
            raise ConfigError(
                "UMT needs settings with teachers, e.g. UMTSettings(teachers={'audio': 'runs/a/checkpoints/"
                "last.pt'})"
            )
        modalities = tuple(getattr(model, "modalities", ()))
        if len(modalities) < 2:
            raise ConfigError(
                f"UMT balances modalities (distils unimodal teachers into a multimodal model): give at least "
                f"2, got {list(modalities)}"
            )
        encoders = getattr(model, "encoders", None)
        if not isinstance(encoders, Mapping | nn.ModuleDict):
            raise ConfigError(
                "UMT needs the model's per-modality encoders (model.encoders); "
                f"{type(model).__name__} has none"
            )
        unknown = sorted(set(settings.teachers) - set(modalities))
        if unknown:
            raise ConfigError(
                f"umt teachers: {', '.join(unknown)} is not a modality of the model "
                f"({', '.join(modalities)}); key the teachers by the model's modalities"
            )
        teachers = {
            m: load_teacher(encoders[m], settings.teachers[m], m)
            for m in modalities
            if m in settings.teachers
        }
        return cls(teachers, settings.weight, settings.start_epoch, settings.end_epoch)

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` distils (``start_epoch <= epoch <= end_epoch``)."""
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch <= self.end_epoch)

    def distillation(self, features: Mapping[str, Tensor], inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``MSE(φ^m, T^m(x^m))`` of each teacher's modality (teachers under ``no_grad``)."""
        out: dict[str, Tensor] = {}
        for m, teacher in self.teachers.items():
            if m not in features or m not in inputs:
                raise InputError(f"UMT: the step has no features or inputs of modality '{m}'")
            x, phi = inputs[m], features[m]
            first = next(iter(teacher.parameters()), None)
            if first is not None and first.device != x.device:
                teacher.to(x.device)
            with torch.no_grad():
                target = teacher(x)
            if target.shape != phi.shape:
                raise InputError(
                    f"UMT: the teacher of '{m}' gives features {list(target.shape)}, the model "
                    f"{list(phi.shape)}; train the teacher with the same model.* settings"
                )
            out[m] = F.mse_loss(phi, target.to(phi.dtype))
        return out

    def before_forward(self, step: BalanceStep) -> None:
        self._features = None

    def transform_features(self, step: BalanceStep, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep the features as they reach this method (the students of the distillation)."""
        self._features = dict(features)
        return features

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Return ``loss + λ Σ_m MSE(φ^m, T^m(x^m))`` inside the epoch window, else ``loss``; log both."""
        features, self._features = self._features, None
        if not self.active(step.epoch):
            step.metrics["balance/umt/weight"] = 0.0
            return loss
        if step.inputs is None:
            raise InputError("UMT runs its teachers on the batch's inputs: pass BalanceStep(inputs=...)")
        terms = self.distillation(features if features is not None else output.features, step.inputs)
        step.metrics["balance/umt/weight"] = self.weight
        step.metrics.update({f"balance/umt/distill/{m}": float(v.detach()) for m, v in terms.items()})
        return loss + self.weight * torch.stack(list(terms.values())).sum()

    def get_extra_state(self) -> dict[str, Any]:
        return {"teacher_sha256": dict(self.fingerprints)}

    def set_extra_state(self, state: Any) -> None:
        saved = dict(state.get("teacher_sha256", {})) if isinstance(state, Mapping) else {}
        if saved != self.fingerprints:
            changed = sorted(
                m for m in set(saved) | set(self.fingerprints) if saved.get(m) != self.fingerprints.get(m)
            )
            raise CheckpointError(
                f"UMT: the teacher(s) of {', '.join(changed)} differ from those the run was trained with "
                "(their weights' fingerprints changed); restore the teacher checkpoints the run started "
                "with, or start again with --overwrite"
            )
