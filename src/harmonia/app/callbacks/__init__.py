"""Trainer callbacks: the hook points (:class:`Callback`) and the built-in users of them."""

from harmonia.app.callbacks.base import Callback, TrainerView

__all__ = ["Callback", "TrainerView"]
