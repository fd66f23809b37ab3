"""Shared fixtures: real servers on loopback, fresh data dirs."""

from __future__ import annotations

import logging
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


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """cli.main() reconfigures the root logger (basicConfig force=True); undo that afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
