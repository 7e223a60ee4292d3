"""Fixtures shared by the UI and API tests: a models folder with a tiny checkpoint, and training images. And the
suite's own temporary folder (suite_temp), set up first: before anything below imports torch."""

from __future__ import annotations

from pathlib import Path

import pytest
from suite_temp import pytest_sessionfinish  # noqa: F401 - the leftover check and the cleanup at the end
from ui_helpers import make_instance_images, make_models_dir


@pytest.fixture(scope="module")
def ui_models(tmp_path_factory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def ui_images(tmp_path_factory) -> Path:
    return make_instance_images(tmp_path_factory.mktemp("images") / "subject")
