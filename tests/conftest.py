from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # the shared sequences in helpers.py assert too

from harmonia.app.config import AVDigitsRecipe  # noqa: E402
from helpers import TINY_RECIPE  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test builds datasets into a private cache, never the user's."""
    cache = tmp_path_factory.mktemp("harmonia-cache")
    old = os.environ.get("HARMONIA_CACHE")
    os.environ["HARMONIA_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("HARMONIA_CACHE", None)
    else:
        os.environ["HARMONIA_CACHE"] = old


@pytest.fixture
def tiny_recipe() -> AVDigitsRecipe:
    return AVDigitsRecipe(**TINY_RECIPE)
