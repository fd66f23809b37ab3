"""Who may send through mail2alert, over real sockets: allowed clients, STARTTLS, implicit
TLS and AUTH on the listener, with certificates made in the test and a client that really
connects from 127.0.0.2."""

from __future__ import annotations

import base64
import contextlib
import gc
import logging
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme

from mail2alert import session
from mail2alert.components import Intake
from mail2alert.session import AuthThrottle
from mail2alert.testing import CaptureServer, ServiceThread
from mail2alert.users import hash_password, read_users, verify
from tests.helpers import BACKUP_MANAGER, OutboxView, compose, running, write_config

OUTSIDER = ("127.0.0.2", 0)  # a client that is not 127.0.0.1


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, ca: trustme.CA) -> dict[str, str]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return {"cert": str(cert_path), "key": str(key_path)}


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"# who may send\nci:{hash_password('right horse')}\n")
    return path


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(autouse=True)
def quick_auth_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "AUTH_DELAY", 0.2)


@contextlib.contextmanager
def serving(
    tmp_path: Path, upstream: CaptureServer, local: dict[str, Any]
) -> Iterator[ServiceThread]:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[BACKUP_MANAGER],
        local={"address": "127.0.0.1:0", **local},
    )
    with running(path) as service:
        yield service


def test_a_client_outside_allowed_clients_is_refused_at_mail_and_nothing_is_queued(
    tmp_path: Path, upstream: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serving(tmp_path, upstream, {"allowed-clients": ["127.0.0.1/32"]}) as service:
        with smtplib.SMTP("127.0.0.1", service.port, source_address=OUTSIDER) as client:
            client.ehlo()
            for _ in range(2):
                code, text = client.mail("go@example.com")
                assert (code, text[:5]) == (554, b"5.7.1")
            assert client.rcpt("admin@example.com")[0] == 503
        with smtplib.SMTP("127.0.0.1", service.port) as insider:
            insider.sendmail("go@example.com", ["admin@example.com"], compose())
        upstream.wait_for(1)
        queued = OutboxView(tmp_path / "data").queue_ids()

    assert len(queued) == 1  # the insider's only
    refusals = [r for r in caplog.records if "not in allowed-clients" in r.getMessage()]
    assert len(refusals) == 1
    assert "127.0.0.2" in refusals[0].getMessage()


def test_auth_is_offered_only_after_starttls_and_lets_an_outsider_send(
    tmp_path: Path,
    upstream: CaptureServer,
    tls_files: dict[str, str],
    users_file: Path,
    client_context: ssl.SSLContext,
) -> None:
    local = {
        "allowed-clients": ["127.0.0.1/32"],
        "tls": {"mode": "starttls", **tls_files},
        "auth": {"users-file": str(users_file)},
    }
    with serving(tmp_path, upstream, local) as service:
        with smtplib.SMTP("localhost", service.port, source_address=OUTSIDER) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")
            code, text = client.mail("go@example.com")
            assert (code, text) == (530, b"5.7.0 Authentication required")
            client.rset()
            client.starttls(context=client_context)
            client.ehlo()
            assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login("ci", "wrong horse")
            assert refused.value.smtp_code == 535
            assert refused.value.smtp_error.startswith(b"5.7.8")
            client.login("ci", "right horse")
            client.sendmail("go@example.com", ["admin@example.com"], compose())
        (got,) = upstream.wait_for(1)
    assert got.rcpt_tos == ("ops@example.com",)


def test_each_mechanism_takes_its_first_answer_with_the_command_or_asked_for(
    tmp_path: Path,
    upstream: CaptureServer,
    tls_files: dict[str, str],
    users_file: Path,
    client_context: ssl.SSLContext,
) -> None:
    """AUTH PLAIN and AUTH LOGIN alike: the first answer given with the command, or asked
    for with a 334; one that is no base64 is a 501, and ``*`` abandons the login."""
    local = {"tls": {"mode": "starttls", **tls_files}, "auth": {"users-file": str(users_file)}}
    plain = base64.b64encode(b"\x00ci\x00right horse")
    user, password = base64.b64encode(b"ci"), base64.b64encode(b"right horse")
    ways = {
        "PLAIN given": [b"AUTH PLAIN " + plain],
        "PLAIN asked for": [b"AUTH PLAIN", plain],
        "LOGIN given": [b"AUTH LOGIN " + user, password],
        "LOGIN asked for": [b"AUTH LOGIN", user, password],
    }
    with serving(tmp_path, upstream, local) as service:
        for way, lines in ways.items():
            with smtplib.SMTP("localhost", service.port) as client:
                client.starttls(context=client_context)
                client.ehlo()
                codes = []
                for line in lines:
                    client.send(line + b"\r\n")
                    codes.append(client.getreply()[0])
                assert codes[-1] == 235, way
                assert set(codes[:-1]) <= {334}, way
        for command in (b"AUTH PLAIN not-base64!", b"AUTH LOGIN not-base64!"):
            with smtplib.SMTP("localhost", service.port) as client:
                client.starttls(context=client_context)
                client.ehlo()
                client.send(command + b"\r\n")
                assert client.getreply() == (501, b"5.5.2 Cannot decode the base64 answer")
        for command in (b"AUTH PLAIN", b"AUTH LOGIN"):
            with smtplib.SMTP("localhost", service.port) as client:
                client.starttls(context=client_context)
                client.ehlo()
                client.send(command + b"\r\n")
                assert client.getreply()[0] == 334
                client.send(b"*\r\n")
                assert client.getreply()[0] == 501


def test_a_failed_login_is_answered_after_a_delay(
    tmp_path: Path,
    upstream: CaptureServer,
    tls_files: dict[str, str],
    users_file: Path,
    client_context: ssl.SSLContext,
) -> None:
    local = {"tls": {"mode": "starttls", **tls_files}, "auth": {"users-file": str(users_file)}}
    with (
        serving(tmp_path, upstream, local) as service,
        smtplib.SMTP("localhost", service.port) as client,
    ):
        client.starttls(context=client_context)
        client.ehlo()
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("nobody", "guess")
        assert time.monotonic() - started >= session.AUTH_DELAY


def test_the_delay_doubles_per_failure_from_one_address_and_a_success_resets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session, "AUTH_DELAY", 1.0)
    throttle = AuthThrottle()
    assert [throttle.delay("10.0.0.9", float(t)) for t in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert throttle.delay("10.0.0.8", 4.0) == 1.0  # another address has its own count
    throttle.succeeded("10.0.0.9")
    assert throttle.delay("10.0.0.9", 5.0) == 1.0
    assert max(throttle.delay("10.0.0.7", float(t)) for t in range(20)) == 30.0
    assert throttle.delay("10.0.0.7", 20.0 + 3601) == 1.0  # forgotten after an hour


def test_starttls_required_refuses_mail_before_starttls(
    tmp_path: Path,
    upstream: CaptureServer,
    tls_files: dict[str, str],
    client_context: ssl.SSLContext,
) -> None:
    with serving(
        tmp_path, upstream, {"tls": {"mode": "starttls-required", **tls_files}}
    ) as service:
        with smtplib.SMTP("localhost", service.port) as client:
            client.ehlo()
            code, text = client.mail("go@example.com")
            assert (code, text[:5]) == (530, b"5.7.0")
            client.rset()
            client.starttls(context=client_context)
            client.sendmail("go@example.com", ["admin@example.com"], compose())
        upstream.wait_for(1)


def test_implicit_tls_is_tls_from_the_first_byte(
    tmp_path: Path,
    upstream: CaptureServer,
    tls_files: dict[str, str],
    users_file: Path,
    client_context: ssl.SSLContext,
) -> None:
    local = {
        "allowed-clients": ["127.0.0.1/32"],
        "tls": {"mode": "implicit", **tls_files},
        "auth": {"users-file": str(users_file)},
    }
    with serving(tmp_path, upstream, local) as service:
        with smtplib.SMTP_SSL(
            "localhost", service.port, context=client_context, source_address=OUTSIDER
        ) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            client.login("ci", "right horse")
            client.sendmail("go@example.com", ["admin@example.com"], compose())
        (got,) = upstream.wait_for(1)
    assert got.rcpt_tos == ("ops@example.com",)


def test_a_port_scan_of_the_implicit_tls_listener_leaves_no_session_behind(
    tmp_path: Path,
    upstream: CaptureServer,
    tls_files: dict[str, str],
    client_context: ssl.SSLContext,
) -> None:
    """A connection that never finishes its handshake makes no SMTP session, which would
    wait for the cyclic garbage collector (off here) once the connection is gone."""
    gc.collect()
    gc.disable()
    try:
        with serving(tmp_path, upstream, {"tls": {"mode": "implicit", **tls_files}}) as service:
            intake = service.service.component(Intake)
            for _ in range(3):
                socket.create_connection(("127.0.0.1", service.port)).close()
            # One listener accepts in order: this session comes after the three.
            with smtplib.SMTP_SSL("localhost", service.port, context=client_context) as client:
                assert client.noop()[0] == 250
            deadline = time.monotonic() + 5
            # Nothing signals that a session was freed: polling is the way.
            while len(intake._sessions) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(intake._sessions) == 0
    finally:
        gc.enable()


def test_a_connection_silent_in_its_implicit_tls_handshake_is_closed_at_the_timeout(
    tmp_path: Path, upstream: CaptureServer, tls_files: dict[str, str]
) -> None:
    """Until its handshake is done a connection is no session, which max-sessions and the
    session's timeout would hold: the handshake has the listener's timeout (at most 10 s),
    so that idle connections cannot pile up."""
    local = {"tls": {"mode": "implicit", **tls_files}, "max-sessions": 2, "timeout": "1s"}
    with serving(tmp_path, upstream, local) as service:
        idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(10)]
        started = time.monotonic()
        try:
            for connection in idle:
                connection.settimeout(8)
                assert connection.recv(1) == b""  # closed by mail2alert
        finally:
            for connection in idle:
                connection.close()
    assert time.monotonic() - started < 5


def test_passwd_prints_a_users_file_line_for_a_password_read_from_stdin(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mail2alert", "passwd", "ci"],
        input="right horse\n",
        capture_output=True,
        text=True,
        check=True,
    )
    line = done.stdout.strip()
    assert "right horse" not in done.stdout + done.stderr
    (tmp_path / "users").write_text(line + "\n")
    users = read_users(tmp_path / "users")
    assert verify(users, "ci", "right horse")
    assert not verify(users, "ci", "wrong horse")


def test_a_name_that_is_no_users_costs_the_same_check_as_a_users_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bcrypt users file: a login as nobody is checked against a bcrypt hash of the same
    cost as the file's, not the cheaper argon2 of an empty file, so that how long the answer
    takes does not tell which names exist."""
    checked: list[bytes] = []
    real = bcrypt.checkpw

    def checkpw(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    alice = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=5)).decode("ascii")
    users = {"alice": alice}
    assert verify(users, "alice", "wonderland")
    assert not verify(users, "mallory", "wonderland")
    assert [h[:7] for h in checked] == [b"$2b$05$", b"$2b$05$"]
    assert checked[1] != alice.encode("ascii")  # not alice's own: no password of anyone's


def test_a_renewed_certificate_is_served_after_a_reload_on_an_implicit_tls_listener(
    tmp_path: Path, upstream: CaptureServer, ca: trustme.CA
) -> None:
    """certbot renews the files in place, then ``systemctl reload``: new connections get the
    new certificate, though the listener stays bound."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def issue() -> None:
        issued = ca.issue_cert("localhost", "127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))

    def served(port: int) -> bytes:
        client = ssl.create_default_context()
        ca.configure_trust(client)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    issue()
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[BACKUP_MANAGER],
        local={
            "address": "127.0.0.1:0",
            "tls": {"mode": "implicit", "cert": str(cert), "key": str(key)},
        },
    )
    with running(path) as service:
        before = served(service.port)
        issue()
        assert service.call(service.service.reload()) is True
        after = served(service.port)
    assert after != before
