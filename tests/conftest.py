"""Shared fixtures: real servers on loopback, fresh data dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mail2alert.testing import CaptureServer


@pytest.fixture
def upstream() -> Iterator[CaptureServer]:
    """A real SMTP server on 127.0.0.1 playing ``remote-smtp``; it keeps what it receives."""
    with CaptureServer() as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data-dir for one test."""
    return tmp_path / "data"
