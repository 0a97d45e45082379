"""On-the-fly gradient modulation, OGM and OGM-GE.

Peng, Wei, Deng, Wang, Hu, *Balanced Multimodal Learning via On-the-fly Gradient Modulation*, CVPR 2022, and
Wei, Hu, Du, Wen, *On-the-Fly Modulation for Balanced Multimodal Learning*, TPAMI 2025. After backward and
before the optimizer step, every gradient of modality m's encoder is scaled by

* ``form="tpami"`` (Eq. 11): ``k^m = clip(1 - α·tanh(ρ^m - 1), 0, 1)`` when ``ρ^m > 1``, else 1;
* ``form="cvpr"`` (Eq. 10, what both official code bases run): ``k^m = 1 - tanh(α·ρ^m)`` when ``ρ^m > 1``,
  else 1;

and with generalization enhancement (GE, Eq. 16-17) Gaussian noise with the unscaled gradient's standard
deviation is added: ``g <- k^m·g + h``, ``h ~ N(0, std(g)²)`` per parameter tensor. As in the official code,
noise is added to every modulated modality (also where ``k^m = 1``). The fusion head is never modulated.

As a :class:`~harmonia.balance.method.BalancingMethod`, OGM modulates in ``after_backward`` with the
step's shared ρ; its settings are :class:`OGMSettings` (config: ``balance: [{name: ogm, alpha: 0.8}]``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, in_epoch_window, step_generator
from harmonia.balance.scores import discrepancy_ratio
from harmonia.errors import ConfigError
from harmonia.settings import setting

ParamFilter = Callable[[str, nn.Parameter], bool]


class OGMForm(str, enum.Enum):
    TPAMI = "tpami"
    CVPR = "cvpr"


def conv_weights_only(name: str, param: nn.Parameter) -> bool:
    """The official code's choice: modulate only 4-D (conv kernel) gradients."""
    return param.dim() == 4


def ogm_coefficient(ratio: Tensor, alpha: float, form: OGMForm | str = OGMForm.TPAMI) -> Tensor:
    """Modulation coefficient ``k`` for a discrepancy ratio ``ρ`` (elementwise)."""
    ratio = torch.as_tensor(ratio, dtype=torch.float32)
    one = torch.ones_like(ratio)
    if OGMForm(form) is OGMForm.TPAMI:
        k = (1 - alpha * torch.tanh(ratio - 1)).clamp(0.0, 1.0)
    else:
        k = 1 - torch.tanh(alpha * ratio)
    return torch.where(ratio > 1, k, one)


@dataclass
class OGMSettings:
    """OGM hyper-parameters (defaults: TPAMI 2025 and its official code); ``ge: true`` is OGM-GE."""

    alpha: float = setting(0.8, help="modulation strength α (paper: 0.8 CREMA-D, 0.1 VGGSound)", ge=0)
    form: OGMForm = setting(OGMForm.TPAMI, help="coefficient: tpami (Eq. 11) or cvpr (Eq. 10, the code's)")
    ge: bool = setting(False, help="add noise with the gradient's std (generalization enhancement: OGM-GE)")
    start_epoch: int = setting(0, help="first epoch in which OGM modulates", ge=0)
    end_epoch: int | None = setting(None, help="OGM stops modulating at this epoch (null: never)", ge=1)
    warmup_epochs: int = setting(0, help="epochs without modulation at the start", ge=0)
    conv_only: bool = setting(False, help="modulate only conv kernels (4-D weights), as the official code")


@dataclass
class OGMStats:
    """What one :meth:`OGM.step` did: per-modality ratio ρ and coefficient k (1.0 when inactive)."""

    ratios: dict[str, float]
    coefficients: dict[str, float]
    active: bool


def _named_parameters(source: nn.Module | Iterable[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    if isinstance(source, nn.Module):
        return list(source.named_parameters())
    return [(str(i), p) for i, p in enumerate(source)]


class OGM(BalancingMethod):
    """Gradient modulation of each modality's encoder; call :meth:`step` between backward and optimizer step.

    Args:
        encoders: modality name -> the encoder module (or a list of its parameters) to modulate. The user
            names the parameters; nothing is matched by name.
        alpha: modulation strength (paper: 0.8 on CREMA-D, 0.1 on VGGSound).
        form: ``"tpami"`` (default) or ``"cvpr"`` coefficient.
        ge: add generalization-enhancement noise (OGM-GE).
        start_epoch, end_epoch: modulate in epochs ``start_epoch <= epoch < end_epoch`` (``None``: no end).
        warmup_epochs: epochs at the start with no modulation (applied on top of ``start_epoch``).
        param_filter: ``f(name, param) -> bool`` selecting parameters (default all; see
            :func:`conv_weights_only`).
        seed: seed of the GE noise; the generator is re-seeded with (seed, step) at every step, so all
            data-parallel ranks add identical noise and a resumed run continues the same sequence (the step
            counter is a buffer, saved with ``state_dict``).
    """

    Settings: ClassVar[type[Any]] = OGMSettings
    num_steps: Tensor

    def __init__(
        self,
        encoders: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        alpha: float = 0.8,
        form: OGMForm | str = OGMForm.TPAMI,
        ge: bool = False,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        warmup_epochs: int = 0,
        param_filter: ParamFilter | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ConfigError(f"OGM balances modalities: give at least 2 encoders, got {list(encoders)}")
        if alpha < 0:
            raise ConfigError(f"OGM alpha must be >= 0, got {alpha}")
        try:
            self.form = OGMForm(form)
        except ValueError:
            raise ConfigError(f"OGM form must be 'tpami' or 'cvpr', got {form!r}") from None
        self.alpha = alpha
        self.ge = ge
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.warmup_epochs = warmup_epochs
        self.seed = seed
        self.params: dict[str, list[nn.Parameter]] = {}
        for m, source in encoders.items():
            chosen = [p for n, p in _named_parameters(source) if param_filter is None or param_filter(n, p)]
            if not chosen:
                raise ConfigError(f"OGM: the parameter filter selects no parameter of modality '{m}'")
            self.params[m] = chosen
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def build(cls, model: nn.Module, settings: OGMSettings | None = None, seed: int = 0) -> OGM:
        """OGM of every encoder of ``model`` (a :class:`~harmonia.models.MultimodalClassifier`)."""
        s = settings or cls.Settings()
        return cls(
            dict(model.encoders),  # type: ignore[arg-type]
            alpha=s.alpha,
            form=s.form,
            ge=s.ge,
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
            warmup_epochs=s.warmup_epochs,
            param_filter=conv_weights_only if s.conv_only else None,
            seed=seed,
        )

    def after_backward(self, step: BalanceStep, output: Any) -> None:
        """Modulate with the step's shared ρ; logs ``balance/k/<m>``."""
        stats = self.modulate(step.ratios(output.unimodal_logits), step.epoch)
        step.metrics.update({f"balance/k/{m}": k for m, k in stats.coefficients.items()})

    def coefficients(self, ratios: Mapping[str, Tensor | float]) -> dict[str, Tensor]:
        return {m: ogm_coefficient(torch.as_tensor(r), self.alpha, self.form) for m, r in ratios.items()}

    def is_active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, max(self.start_epoch, self.warmup_epochs), self.end_epoch)

    @torch.no_grad()
    def step(self, unimodal_logits: Mapping[str, Tensor], labels: Tensor, epoch: int) -> OGMStats:
        """Compute ρ and k on the (global) batch and modulate the encoders' ``.grad`` in place."""
        missing = set(self.params) - set(unimodal_logits)
        if missing:
            raise ConfigError(f"OGM.step: no unimodal logits for {sorted(missing)}")
        return self.modulate(discrepancy_ratio({m: unimodal_logits[m] for m in self.params}, labels), epoch)

    @torch.no_grad()
    def modulate(self, ratios: Mapping[str, Tensor | float], epoch: int) -> OGMStats:
        """Modulate with ratios computed elsewhere (e.g. shared with OPM in the same step)."""
        coefficients = self.coefficients({m: ratios[m] for m in self.params})
        active = self.is_active(epoch)
        if active:
            self._modulate(coefficients)
        self.num_steps = self.num_steps + 1  # a new tensor: a saved state_dict is not mutated
        return OGMStats(
            ratios={m: float(r) for m, r in ratios.items()},
            coefficients={m: float(k) if active else 1.0 for m, k in coefficients.items()},
            active=active,
        )

    def _modulate(self, coefficients: Mapping[str, Tensor]) -> None:
        generators: dict[torch.device, torch.Generator] = {}
        for m, params in self.params.items():
            k = float(coefficients[m])
            for p in params:
                if p.grad is None:
                    continue
                if not self.ge:
                    p.grad.mul_(k)
                    continue
                if p.grad.device not in generators:
                    generators[p.grad.device] = step_generator(self.seed, self.num_steps, p.grad.device)
                std = p.grad.std() if p.grad.numel() > 1 else p.grad.new_zeros(())
                noise = torch.randn(
                    p.grad.shape,
                    generator=generators[p.grad.device],
                    device=p.grad.device,
                    dtype=p.grad.dtype,
                )
                p.grad.mul_(k).add_(noise * std)


@dataclass
class OGMGESettings(OGMSettings):
    """OGM-GE: OGM with generalization enhancement (Peng et al., CVPR 2022, Eq. 16-17) on by default."""

    ge: bool = setting(True, help="add noise with the gradient's std (generalization enhancement)")


class OGMGE(OGM):
    """OGM-GE as a method of its own (config ``balance: [ogm_ge]``): :class:`OGM` whose settings default to
    ``ge: true``. ``balance: [ogm]`` is OGM without the noise unless ``ge: true`` is given."""

    Settings: ClassVar[type[Any]] = OGMGESettings
