"""The compiled training step: ``train.compile: true`` (docs/training.md#compiled-step).

``torch.compile`` (TorchDynamo capturing the Python forward into graphs, inductor generating fused kernels
for them, AOTAutograd generating their backward) is applied to what a training step runs forward:

* the model's training forward pass, through ``DistributedDataParallel`` when training data-parallel (the
  order PyTorch's DDP notes advise: its DDPOptimizer then splits the graph at the gradient buckets so that
  communication still overlaps the backward pass);
* for ``task: pretrain``, the contrastive loss as a graph of its own (single process only: data-parallel
  losses gather embeddings across ranks, which stays eager).

The trainer's ``model`` stays the original ``nn.Module``: checkpoints hold its ``state_dict`` (no
``_orig_mod.`` prefix, so a run resumes with or without compilation), and balancing methods, the gradient
harmonizer (``torch.autograd.grad``, ``torch.func``), evaluation and the linear probes use it eagerly.
Model and loss are two graphs, not one, because the harmonizer and several balancing methods differentiate
the loss with respect to the model's outputs (features, the video anchor): a single graph would make those
outputs and the loss outputs of one autograd node, between which no gradient can be taken. A classifier's
feature transform (balancing methods such as OPM: their random draws and state updates) runs eagerly
between the encoder and fusion graphs, so that a compiled run draws the same random numbers as an eager one.

Shapes are compiled static (``dynamic=False``): a run has the training batch shape and, at most, that of
a smaller last batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from harmonia.app.config import CompileModeKind
from harmonia.errors import ConfigError

#: the torch.compile backend (tests replace it by one that fails, to check the error)
BACKEND: str | Callable[..., Any] = "inductor"


class CompiledStep:
    """``fn`` compiled by ``torch.compile`` (``mode``, static shapes), called like ``fn``.

    A failure of the compiler (no C++ compiler for inductor, a Python or platform that TorchDynamo does
    not support, an operation it cannot capture) raises a :class:`~harmonia.errors.ConfigError` naming
    the fix, ``train.compile=false``; errors of the code itself (bad inputs) come through unchanged.

    Args:
        fn: a module or function.
        mode: ``train.compile_mode``.
        what: what ``fn`` is, for error messages ("model", "loss").
    """

    def __init__(self, fn: Callable[..., Any], mode: CompileModeKind | str, what: str) -> None:
        self.what = what
        self.mode = CompileModeKind(mode)
        try:
            self.compiled = torch.compile(fn, mode=self.mode.value, dynamic=False, backend=BACKEND)
        except RuntimeError as exc:  # e.g. a Python version TorchDynamo does not support yet
            raise _compile_error(what, exc) from exc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise _compile_error(self.what, exc) from exc


def _compile_error(what: str, exc: BaseException) -> ConfigError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    hint = ""
    if "compiler" in str(exc).lower() and ("c++" in str(exc).lower() or "cxx" in str(exc).lower()):
        hint = " (or install a C++ compiler, gcc or clang, which inductor needs on CPU)"
    return ConfigError(
        f"train.compile: torch {torch.__version__} could not compile the training {what} "
        f"({type(exc).__name__}: {first[:300]}); train without compiling: train.compile=false{hint}"
    )


def keep_features(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The identity feature transform (a module-level function: a compiled forward sees the same one
    every step, so its guards hold)."""
    return features


__all__ = ["BACKEND", "CompiledStep", "keep_features"]
