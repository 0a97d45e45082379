"""Turning an out-of-memory error while a model is built into an error that names the sizes to lower."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from harmonia.errors import ConfigError


@contextlib.contextmanager
def model_allocation(sizes: str) -> Iterator[None]:
    """Turn an out-of-memory error while a model is built into a :class:`ConfigError` naming the sizes."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
            raise
        raise ConfigError(
            f"the model does not fit in memory ({str(exc).splitlines()[0][:200]}); lower its sizes ({sizes})"
        ) from None
