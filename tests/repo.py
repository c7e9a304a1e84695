"""Paths of the repository the tests run in (its sources, scripts and bundled data)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
