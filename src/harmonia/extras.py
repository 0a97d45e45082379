"""Optional dependencies: the core library needs torch and numpy only.

Everything else is imported where it is used, through :func:`require`, which names the ``pip`` extra
that provides it when it is missing:

* ``harmonia[data]``: PyAV (video decoding), espeakng-loader (AV-Digits speech), scipy, scikit-learn,
  webdataset (reading shards);
* ``harmonia[train]``: the application (pydantic, PyYAML, tqdm, TensorBoard, matplotlib);
* ``harmonia[mlflow]``: MLflow logging (mlflow-skinny; SQLAlchemy and Alembic for a local SQLite store);
* ``harmonia[lightning]``: PyTorch Lightning, for :mod:`harmonia.integrations.lightning`;
* ``harmonia[all]``: data and train.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

#: import name -> (pip package, extra)
PROVIDERS = {
    "av": ("av", "data"),
    "espeakng_loader": ("espeakng-loader", "data"),
    "scipy": ("scipy", "data"),
    "sklearn": ("scikit-learn", "data"),
    "webdataset": ("webdataset", "data"),
    "braceexpand": ("webdataset", "data"),
    "pydantic": ("pydantic", "train"),
    "yaml": ("pyyaml", "train"),
    "tqdm": ("tqdm", "train"),
    "tensorboard": ("tensorboard", "train"),
    "matplotlib": ("matplotlib", "train"),
    "lightning": ("lightning", "lightning"),
    "mlflow": ("mlflow-skinny", "mlflow"),
    "sqlalchemy": ("sqlalchemy", "mlflow"),
    "alembic": ("alembic", "mlflow"),
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but is broken: show the real error
        package, extra = PROVIDERS.get(top, (top, "all"))
        need = f" for {purpose}" if purpose else ""
        raise ImportError(
            f"harmonia needs the package '{package}'{need}; install it with "
            f"`pip install 'harmonia[{extra}]'` (or `pip install {package}`)"
        ) from exc


def check_installed(modules: Iterable[str], purpose: str) -> None:
    """Raise the :func:`require` error for the first of ``modules`` that is not installed, without
    importing any of them."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            require(module, purpose)


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A tqdm progress bar when tqdm is installed, else the plain iterable (or a do-nothing bar)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent(iterable)
    return tqdm(iterable, **kwargs)


class _Silent:
    """What :func:`progress_bar` returns without tqdm: iterates, and ignores bar updates."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
