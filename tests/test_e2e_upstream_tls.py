"""Delivery to a real smarthost over loopback: STARTTLS and implicit TLS, AUTH, a sender of
our own, and every way the setup can fail leaving the mail pending with the reason, never
sent in clear text and never showing the password."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mail2alert import cli
from mail2alert.testing import CaptureServer
from tests.helpers import BACKUP_MANAGER, OutboxView, compose, running, send, write_config

PASSWORD = "s3cret-smtp-pass"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PASSWD", PASSWORD)


def smarthost(**options: Any) -> Iterator[CaptureServer]:
    with CaptureServer(**options) as server:
        yield server


def config(tmp_path: Path, port: int, **remote: Any) -> Path:
    return write_config(
        tmp_path / "configuration.yml",
        remote_port=port,
        data_dir=tmp_path / "data",
        managers=[BACKUP_MANAGER],
        remote=remote,
    )


def test_starttls_and_auth_deliver_with_the_configured_sender_and_no_password_in_the_log(
    tmp_path: Path,
    server_tls: ssl.SSLContext,
    ca_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = CaptureServer(tls=server_tls, require_starttls=True, users={"alerts": PASSWORD})
    path = config(
        tmp_path,
        upstream.port,
        tls="starttls",
        **{"ca-file": str(ca_file)},
        user="alerts",
        passwd="$SMTP_PASSWD",
        sender="alerts@example.com",
    )
    with upstream, running(path) as service:
        send(service.port, compose(subject="Server Backup Failed"))
        (got,) = upstream.wait_for(1)
    assert upstream.logins == ["alerts"]
    assert got.mail_from == "alerts@example.com"
    assert got.rcpt_tos == ("ops@example.com",)
    assert b"\r\nFrom: alerts@example.com\r\n" in got.data
    assert b"\r\nReply-To: Go Server <go@example.com>\r\n" in got.data
    assert PASSWORD not in caplog.text


def test_implicit_tls_delivers(tmp_path: Path, server_tls: ssl.SSLContext, ca_file: Path) -> None:
    upstream = CaptureServer(tls=server_tls, implicit=True, users={"alerts": PASSWORD})
    path = config(
        tmp_path,
        upstream.port,
        tls="implicit",
        **{"ca-file": str(ca_file)},
        user="alerts",
        passwd="$SMTP_PASSWD",
    )
    with upstream, running(path) as service:
        send(service.port, compose(subject="Server Backup Failed"))
        (got,) = upstream.wait_for(1)
    assert got.rcpt_tos == ("ops@example.com",)


def test_may_uses_starttls_when_offered_without_checking_the_certificate(
    tmp_path: Path, server_tls: ssl.SSLContext
) -> None:
    # The server takes nothing before STARTTLS, and its CA is not one mail2alert knows.
    upstream = CaptureServer(tls=server_tls, require_starttls=True)
    with upstream, running(config(tmp_path, upstream.port)) as service:
        send(service.port, compose(subject="Server Backup Failed"))
        (got,) = upstream.wait_for(1)
    assert got.rcpt_tos == ("ops@example.com",)


def pending_reason(tmp_path: Path, path: Path, upstream: CaptureServer) -> dict[str, Any]:
    """Send one message; once delivery was tried, its item as ``queue`` would show it."""
    with upstream, running(path) as service:
        reply = send(service.port, compose(subject="Server Backup Failed"))
        item = OutboxView(tmp_path / "data").wait_attempted(reply.queue_id)
    assert upstream.messages == []
    return item


def test_a_certificate_that_does_not_verify_leaves_the_mail_pending_with_the_reason(
    tmp_path: Path, server_tls: ssl.SSLContext
) -> None:
    upstream = CaptureServer(tls=server_tls, users={"alerts": PASSWORD})
    path = config(tmp_path, upstream.port, tls="starttls", user="alerts", passwd="$SMTP_PASSWD")
    item = pending_reason(tmp_path, path, upstream)
    assert item["state"] == "pending"
    assert "certificate verify failed" in item["last_error"].lower()
    assert upstream.logins == []


def test_a_refused_login_leaves_the_mail_pending_and_never_shows_the_password(
    tmp_path: Path,
    server_tls: ssl.SSLContext,
    ca_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMTP_PASSWD", "not-the-password")
    upstream = CaptureServer(tls=server_tls, users={"alerts": PASSWORD})
    path = config(
        tmp_path,
        upstream.port,
        tls="starttls",
        **{"ca-file": str(ca_file)},
        user="alerts",
        passwd="$SMTP_PASSWD",
    )
    item = pending_reason(tmp_path, path, upstream)
    assert item["state"] == "pending"
    assert "refused the login as alerts: 535" in item["last_error"]
    assert "not-the-password" not in item["last_error"] + caplog.text


def test_a_server_without_starttls_gets_nothing_when_tls_is_required(tmp_path: Path) -> None:
    upstream = CaptureServer()
    path = config(tmp_path, upstream.port, tls="starttls")
    item = pending_reason(tmp_path, path, upstream)
    assert item["state"] == "pending"
    assert "does not offer STARTTLS" in item["last_error"]


def test_a_password_never_goes_to_a_server_that_offers_no_starttls(tmp_path: Path) -> None:
    upstream = CaptureServer(users={"alerts": PASSWORD})  # AUTH without TLS: never used
    path = config(tmp_path, upstream.port, user="alerts", passwd="$SMTP_PASSWD")
    item = pending_reason(tmp_path, path, upstream)
    assert "never sent in clear text" in item["last_error"]
    assert upstream.logins == []


def test_check_smtp_logs_in_sends_nothing_and_says_what_failed(
    tmp_path: Path,
    server_tls: ssl.SSLContext,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = CaptureServer(tls=server_tls, require_starttls=True, users={"alerts": PASSWORD})
    path = config(
        tmp_path,
        upstream.port,
        tls="starttls",
        **{"ca-file": str(ca_file)},
        user="alerts",
        passwd="$SMTP_PASSWD",
    )
    with upstream:
        assert cli.main(["check", "--smtp", "--config", str(path)]) == 0
        assert f"remote-smtp 127.0.0.1:{upstream.port}: OK (starttls, logged in as alerts)" in (
            capsys.readouterr().out
        )
        assert upstream.logins == ["alerts"]
        monkeypatch.setenv("SMTP_PASSWD", "wrong-one")
        assert cli.main(["check", "--smtp", "--config", str(path)]) == 1
        err = capsys.readouterr().err
    assert "FAILED:" in err
    assert "refused the login as alerts: 535" in err
    assert "wrong-one" not in err
    assert upstream.messages == []
