"""Mixed precision of a training run: ``train.precision`` = ``32`` | ``bf16`` | ``16-mixed``.

* ``32``: everything in float32.
* ``bf16``: the forward pass, the loss and the balancing methods' loss-side hooks run under
  ``torch.autocast(device, torch.bfloat16)``, as does evaluation: matrix products and convolutions compute
  in bfloat16 (8 mantissa bits, float32's exponent range, so no loss scaling is needed), and torch's autocast
  lists keep numerically sensitive ops (cross-entropy, norms, ...) in float32. Parameters, gradients and the
  optimizer state stay float32; the backward pass runs outside autocast, in the dtypes the forward chose.
* ``16-mixed``: the same with float16 (CUDA only), plus a gradient scaler (Micikevicius et al., *Mixed
  Precision Training*, ICLR 2018): the loss is multiplied by a scale S before the backward pass, so that small
  gradients do not flush to zero in float16; :meth:`MixedPrecision.unscale` divides the gradients by S
  *before* anything reads them (callbacks' ``after_backward``, balancing methods, gradient clipping), and a
  step whose gradients hold inf or NaN is skipped while S is halved (S doubles after 2000 clean steps:
  ``torch.amp.GradScaler``'s defaults).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from harmonia.app.config import PrecisionKind
from harmonia.errors import ConfigError

_DTYPES = {PrecisionKind.BF16: torch.bfloat16, PrecisionKind.FP16_MIXED: torch.float16}


class MixedPrecision:
    """Autocast and (for ``16-mixed``) a gradient scaler for one device.

    Args:
        kind: the ``train.precision`` choice.
        device: the training device.
        allow_cpu_float16: build ``16-mixed`` on a CPU too (torch runs float16 autocast and its scaler
            there, slowly; the trainer refuses it, tests use it to exercise the scaler's code path).
    """

    def __init__(
        self, kind: PrecisionKind | str, device: torch.device, *, allow_cpu_float16: bool = False
    ) -> None:
        self.kind = PrecisionKind(kind)
        self.device_type = device.type
        self.dtype: torch.dtype | None = _DTYPES.get(self.kind)
        if self.kind is PrecisionKind.FP16_MIXED and device.type != "cuda" and not allow_cpu_float16:
            raise ConfigError(
                f"train.precision=16-mixed needs a CUDA device, got {device}; on CPU use train.precision=bf16"
            )
        if (
            self.kind is PrecisionKind.BF16
            and device.type == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)
        ):
            raise ConfigError(
                f"train.precision=bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 "
                "arithmetic; use train.precision=16-mixed (float16 with a gradient scaler)"
            )
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(device.type) if self.kind is PrecisionKind.FP16_MIXED else None
        )
        self.skipped_steps = 0  # steps the scaler skipped for inf/NaN gradients

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the forward pass and loss (a no-op context for ``32``)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Autocast switched off (for code that must run in float32 inside an autocast region)."""
        with torch.autocast(self.device_type, enabled=False):
            yield

    @property
    def loss_scale(self) -> float:
        """S: what the loss is multiplied by before the backward pass (1 without a scaler)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def scale(self, loss: Tensor) -> Tensor:
        """``S · loss`` (``loss`` itself without a scaler)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by S in place (once per step, before anything reads them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()``, through the scaler: returns False when it skipped the step (inf/NaN
        gradients; the scale is then lowered).

        The scaler looks for inf/NaN when it unscales; gradients a callback made non-finite after that
        (e.g. from an overflow in a method's own scaled backward pass) skip the step the same way."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        if not _all_finite([p.grad for group in optimizer.param_groups for p in group["params"]]):
            self.scaler.update(before * self.scaler.get_backoff_factor())
            self.skipped_steps += 1
            return False
        self.scaler.step(optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= before  # the scale only drops when inf/NaN was found
        self.skipped_steps += not taken
        return taken

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": self.kind.value, "skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = dict(self.scaler.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _all_finite(grads: list[Tensor | None]) -> bool:
    """Whether every gradient holds finite values only (one device synchronization)."""
    flags = [torch.isfinite(g).all() for g in grads if g is not None]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
