"""Losses and statistics compute in float32, also under ``torch.autocast``.

Under autocast (bfloat16 or float16 mixed precision) matrix products run in the low precision, and on the
CPU so do softmaxes of low-precision inputs. bfloat16 keeps 8 significant bits: a contrastive logit
a·b/τ = a·b/0.07 of unit vectors reaches ±14 and then carries an error of up to 2⁻⁸·14 ≈ 0.05 before the
softmax over the batch; a fraction or a divergence accumulated in bfloat16 is off in its third digit. The
contrastive losses (:mod:`harmonia.losses`) and the balancing methods' losses and statistics are therefore
wrapped in :func:`in_float32`: their bfloat16/float16 tensor arguments are cast to float32 and autocast is
switched off inside them (gradients flow back to the low-precision inputs through the cast). float32 and
float64 inputs are left as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

_LOW = (torch.bfloat16, torch.float16)


def upcast(value: Any) -> Any:
    """``value`` with its bfloat16/float16 tensors in float32 (also inside a dict, list or tuple)."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in _LOW else value
    if isinstance(value, dict):
        return {k: upcast(v) for k, v in value.items()}
    if isinstance(value, list | tuple) and any(isinstance(v, Tensor) for v in value):
        return type(value)(upcast(v) for v in value)
    return value


def _device_type(values: Iterable[Any]) -> str:
    for value in values:
        if isinstance(value, Tensor):
            return value.device.type
        if isinstance(value, dict | list | tuple):
            inner = _device_type(value.values() if isinstance(value, dict) else value)
            if inner:
                return inner
    return ""


def in_float32(fn: F) -> F:
    """Run ``fn`` with autocast off and its bfloat16/float16 tensor arguments (also those in a dict, list or
    tuple argument) cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = _device_type((*args, *kwargs.values())) or "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*map(upcast, args), **{k: upcast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
