"""Shared fixtures: real servers on loopback, fresh data dirs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from mail2alert.testing import CaptureServer

# The property tests (tests/test_fuzz.py) must give the same verdict on every run and in
# bounded time: derandomized, a fixed number of examples, and no example database written
# into the work tree. HYPOTHESIS_PROFILE=deep searches longer, by hand.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, database=None)
settings.register_profile("deep", max_examples=5000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def upstream() -> Iterator[CaptureServer]:
    """A real SMTP server on 127.0.0.1 playing ``remote-smtp``; it keeps what it receives."""
    with CaptureServer() as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data-dir for one test."""
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """cli.main() reconfigures the root logger (basicConfig force=True); undo that afterwards.

    For every test: a handler left on the root logger writes to the captured stderr of the
    test that called cli.main(), which is closed once that test ends, and a service thread
    of a later test logging through it prints "--- Logging error ---" tracebacks."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
