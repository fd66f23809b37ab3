"""What ``serve`` says about where it listens, before any mail arrives."""

from __future__ import annotations

import logging

import pytest

from mail2alert.app import warn_if_unreachable


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_loopback_listener_inside_a_container_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, host: str
) -> None:
    monkeypatch.setenv("container", "docker")
    with caplog.at_level(logging.WARNING):
        warn_if_unreachable([(host, 1025)])
    assert "inside a container: only this container can connect" in caplog.text
    assert "set local-smtp: 0.0.0.0:1025" in caplog.text


def test_a_listener_on_every_address_is_not_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("container", "docker")
    with caplog.at_level(logging.WARNING):
        warn_if_unreachable([("0.0.0.0", 1025)])
    assert caplog.text == ""
