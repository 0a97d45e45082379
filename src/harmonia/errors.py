"""Exceptions harmonia raises. Each message names the problem and how to fix it."""

from __future__ import annotations


class HarmoniaError(Exception):
    """Base class of every error harmonia raises on purpose."""


class ConfigError(HarmoniaError, ValueError):
    """A configuration key, type or value is wrong."""


class InputError(HarmoniaError, ValueError):
    """A batch given to a model has missing or extra modalities, wrong shapes or wrong dtypes."""


class DataError(HarmoniaError, RuntimeError):
    """A dataset cannot be built or read."""


class NonFiniteLossError(HarmoniaError, FloatingPointError):
    """The training loss became NaN or infinite."""


class RunFolderExistsError(HarmoniaError, FileExistsError):
    """The output folder of a run already exists and neither resume nor overwrite was asked for."""


class CheckpointError(HarmoniaError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model."""
