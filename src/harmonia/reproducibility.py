"""What bitwise-reproducible training on CPU needs, and how much of it a run asks for.

The same config and seed give the same numbers only when every floating-point reduction is carried out in the
same order. On CPU two libraries choose that order by the number of threads they run on: MKL (torch's
matrix products) and oneDNN (its convolutions). The data order, augmentation and every method's randomness
depend only on (seed, epoch, step) already. So:

* ``same_threads`` (default): MKL in conditional numerical reproducibility mode
  (``MKL_CBWR=AUTO,STRICT``, which must be in the environment before torch's first matrix product: the
  ``harmonia`` command sets it before it imports torch), OpenMP's load-dependent thread adjustment off
  (``OMP_DYNAMIC=FALSE``), and the intra-op thread count set explicitly and recorded with the run. Runs on the
  same machine with the same thread count are bitwise identical, however loaded the machine is.
* ``any_threads``: in addition, oneDNN off (``torch.backends.mkldnn.enabled = False``, so convolutions take
  torch's own kernels) and ``torch.use_deterministic_algorithms(True)`` (which matters on GPU). Runs are also
  identical across thread counts; CPU convolutions run slower (not benchmarked yet).

Neither makes results equal across different CPUs (instruction sets change rounding), nor across torch builds.
"""

from __future__ import annotations

import enum
import os

#: environment the CPU libraries read once, when they are first used
CPU_ENVIRONMENT = {"MKL_CBWR": "AUTO,STRICT", "OMP_DYNAMIC": "FALSE", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


class Reproducibility(str, enum.Enum):
    """How far a run's numbers are promised to repeat (see the module docstring)."""

    SAME_THREADS = "same_threads"
    ANY_THREADS = "any_threads"


def set_reproducible_environment() -> None:
    """Put :data:`CPU_ENVIRONMENT` into ``os.environ`` (values already set are kept).

    Call it before ``import torch``: OpenMP reads ``OMP_DYNAMIC`` when torch loads it, MKL reads ``MKL_CBWR``
    at its first call. (This module does not import torch at import time.)
    """
    for key, value in CPU_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def apply_reproducibility(kind: Reproducibility, num_threads: int | None) -> int:
    """Set the thread count (``None``: keep torch's) and the switches ``kind`` needs; returns the count."""
    import torch  # here, so that importing this module first lets the environment be set before torch

    set_reproducible_environment()  # in time only when nothing has multiplied matrices yet
    torch.set_num_threads(num_threads or torch.get_num_threads())
    strict = kind is Reproducibility.ANY_THREADS
    torch.backends.mkldnn.enabled = not strict  # type: ignore[assignment]
    torch.use_deterministic_algorithms(strict, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return torch.get_num_threads()


__all__ = ["CPU_ENVIRONMENT", "Reproducibility", "apply_reproducibility", "set_reproducible_environment"]
