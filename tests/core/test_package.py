"""The installed package: what it was built against, its metadata, and where the suite imports it from."""

import importlib.metadata
import json
import os
from pathlib import Path

import torch

import mmloss
from mmloss import extension
from tests.repo import REPO


def test_extension_built_against_another_torch_names_both(tmp_path, monkeypatch):
    record = tmp_path / "_C_build.json"
    record.write_text(json.dumps({"torch": "1.0.0+other"}))
    monkeypatch.setattr(extension, "BUILD_RECORD", record)
    module, error = extension.load.__wrapped__()
    assert module is None
    assert "torch 1.0.0+other" in error and f"torch {torch.__version__}" in error


def test_extension_records_the_torch_it_was_built_against():
    assert extension.built_against() == torch.__version__
    assert extension.load()[1] is None


def test_metadata():
    meta = importlib.metadata.metadata("mmloss")
    assert meta["Version"] == mmloss.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert set(meta.get_all("Provides-Extra")) >= {"triton", "train", "integrations"}


def test_suite_imports_the_installed_package():
    """scripts/test.sh installs mmloss (not editable) and sets MMLOSS_TEST_INSTALLED=1: the
    suite must then test that copy, not the source tree."""
    if os.environ.get("MMLOSS_TEST_INSTALLED") != "1":
        import pytest

        pytest.skip("the suite runs against an editable or source-tree mmloss (MMLOSS_TEST_INSTALLED unset)")
    assert REPO / "src" not in Path(mmloss.__file__).resolve().parents
