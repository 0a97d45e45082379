"""Declaring settings without a config framework: dataclass fields that carry a help text and bounds.

Library objects that are built from settings (a dataset recipe, a balancing method) declare them as plain
dataclasses whose fields come from :func:`setting`. The library itself only reads the values; the
application (``harmonia.app.config``) turns each such dataclass into a validating schema, so that a YAML
file or a ``key=value`` override is checked against the help text and bounds written here, once.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from harmonia.errors import ConfigError


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a help text and optional numeric bounds (checked by the application)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def coerce_enums(obj: Any) -> None:
    """Turn strings into the enum a field declares, so that ``Recipe(kind="text")`` works like a parsed
    config (call from ``__post_init__``)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if isinstance(tp, type) and issubclass(tp, enum.Enum) and not isinstance(value, tp):
            try:
                setattr(obj, f.name, tp(value))
            except ValueError:
                choices = ", ".join(repr(m.value) for m in tp)
                raise ConfigError(f"{f.name}: {value!r} is not one of {choices}") from None


def to_plain(obj: Any) -> Any:
    """Plain data (YAML/JSON-ready) of a settings dataclass: enums become their values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
