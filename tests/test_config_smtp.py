"""``local-smtp`` and ``remote-smtp`` as mappings: access, TLS, AUTH and limits, each key
checked with its line (the ``host:port`` strings keep loading as before)."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
import trustme

from mail2alert import cli
from mail2alert.settings import PRIVATE_NETWORKS, HostPort, Listener, Upstream
from mail2alert.users import hash_password
from tests.test_config import parse, problems

MANAGERS = """\
managers:
  - name: mail
    messages-we-want:
      to: alerts@example.com
"""


def with_managers(text: str) -> str:
    return textwrap.dedent(text) + MANAGERS


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert = trustme.CA().issue_cert("mail2alert.example.com")
    cert.cert_chain_pems[0].write_to_path(str(where / "tls.crt"))
    cert.private_key_pem.write_to_path(str(where / "tls.key"))
    return where / "tls.crt", where / "tls.key"


def test_host_port_strings_give_the_defaults() -> None:
    loaded = parse(f"local-smtp: 0.0.0.0:1025\nremote-smtp: mx.example.com:25\n{MANAGERS}")
    assert loaded.listener == Listener(HostPort("0.0.0.0", 1025))
    assert loaded.listener.allowed_clients == PRIVATE_NETWORKS
    assert loaded.upstream == Upstream(HostPort("mx.example.com", 25))
    assert loaded.upstream.tls == "may"


def test_the_private_ranges_may_send_and_the_internet_may_not() -> None:
    listener = Listener(HostPort("0.0.0.0", 1025))
    for inside in ("127.0.0.1", "10.1.2.3", "172.20.0.5", "192.168.1.9", "::1", "fd00::5"):
        assert listener.allows(inside), inside
    for outside in ("8.8.8.8", "172.32.0.1", "2001:db8::1", "not an address"):
        assert not listener.allows(outside), outside
    assert listener.allows("::ffff:10.0.0.1")  # an IPv4 client on a dual-stack socket


def test_a_full_local_smtp_mapping_loads(tls_pair: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = tls_pair
    users = tmp_path / "users"
    users.write_text(f"ci:{hash_password('pw')}\n")
    loaded = parse(
        with_managers(f"""\
        local-smtp:
          address: 0.0.0.0:1025
          allowed-clients: [127.0.0.0/8, "::1", 10.20.0.0/16, 192.0.2.7]
          tls:
            mode: starttls-required
            cert: {cert}
            key: {key}
          auth:
            users-file: {users}
            required: true
          max-message-size: 10MiB
          max-recipients: 100
          max-sessions: 50
          timeout: 5m
        remote-smtp: mx.example.com:25
        """)
    )
    listener = loaded.listener
    assert listener.address == HostPort("0.0.0.0", 1025)
    assert listener.allowed_clients[-1] == ipaddress.ip_network("192.0.2.7/32")
    assert listener.tls is not None
    assert listener.tls.mode == "starttls-required"
    assert listener.auth is not None
    assert listener.auth.required
    assert (listener.max_message_size, listener.max_recipients) == (10 * 1024 * 1024, 100)
    assert (listener.max_sessions, listener.timeout) == (50, 300.0)
    assert loaded.local_smtp == HostPort("0.0.0.0", 1025)


def test_a_full_remote_smtp_mapping_loads_and_keeps_the_password_secret() -> None:
    loaded = parse(
        with_managers("""\
        remote-smtp:
          address: smtp.example.com:587
          tls: starttls
          user: $SMTP_USER
          passwd: $SMTP_PASSWD
          verify: false
          helo: mail2alert.example.com
          sender: alerts@example.com
        """),
        {"SMTP_USER": "alerts", "SMTP_PASSWD": "s3cret-smtp"},
    )
    upstream = loaded.upstream
    assert (upstream.address, upstream.tls, upstream.user) == (
        HostPort("smtp.example.com", 587),
        "starttls",
        "alerts",
    )
    assert upstream.passwd is not None
    assert upstream.passwd.reveal() == "s3cret-smtp"
    assert (upstream.verify, upstream.helo, upstream.sender) == (
        False,
        "mail2alert.example.com",
        "alerts@example.com",
    )
    assert "s3cret-smtp" not in repr(loaded) + str(loaded)
    assert loaded.remote_smtp == HostPort("smtp.example.com", 587)


def test_every_mistake_in_local_smtp_is_reported_with_its_line(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("ci:$2b$12$abcdefghijklmnopqrstuv\nbob\nann:plaintext\n")
    assert problems(
        with_managers(f"""\
        local-smtp:
          address: 0.0.0.0:1025
          allowed-clients: [10.0.0.0/33, "example.com"]
          tls:
            mode: sometimes
            cert: /nonexistent/tls.crt
            key: /nonexistent/tls.key
          auth:
            users-file: {users}
          max-message-size: 10 MB
          max-sessions: 0
        remote-smtp: mx.example.com:25
        """)
    ) == [
        "configuration.yml:3: local-smtp.allowed-clients: expected an address or a CIDR like"
        " 10.0.0.0/8, got '10.0.0.0/33'",
        "configuration.yml:3: local-smtp.allowed-clients: expected an address or a CIDR like"
        " 10.0.0.0/8, got 'example.com'",
        "configuration.yml:5: local-smtp.tls.mode: expected starttls, starttls-required or"
        " implicit, got 'sometimes'",
        f"configuration.yml:9: local-smtp.auth.users-file: {users}:2: expected name:hash",
        f"configuration.yml:9: local-smtp.auth.users-file: {users}:3: the hash of 'ann' is not"
        " bcrypt ($2b$) or argon2",
        "configuration.yml:10: local-smtp.max-message-size: expected a size like 10MiB, 512KiB"
        " or a number of bytes, got '10 MB'",
        "configuration.yml:11: local-smtp.max-sessions: expected a whole number of at least 1,"
        " got '0'",
    ]


def test_missing_certificate_files_and_an_unreadable_users_file_are_reported(
    tmp_path: Path,
) -> None:
    assert problems(
        with_managers(f"""\
        local-smtp:
          address: 0.0.0.0:1025
          tls:
            cert: {tmp_path}/none.crt
            key: {tmp_path}/none.key
          auth:
            users-file: {tmp_path}/no-users
        remote-smtp: mx.example.com:25
        """)
    ) == [
        f"configuration.yml:4: local-smtp.tls.cert: cannot read '{tmp_path}/none.crt':"
        " No such file or directory",
        f"configuration.yml:5: local-smtp.tls.key: cannot read '{tmp_path}/none.key':"
        " No such file or directory",
        f"configuration.yml:7: local-smtp.auth.users-file: cannot read '{tmp_path}/no-users':"
        " No such file or directory",
    ]


def test_a_key_that_does_not_fit_the_certificate_is_reported(
    tls_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = tls_pair
    other = tmp_path / "other.key"
    trustme.CA().issue_cert("x.example.com").private_key_pem.write_to_path(str(other))
    (problem,) = problems(
        with_managers(f"""\
        local-smtp:
          address: 0.0.0.0:1025
          tls: {{cert: {cert}, key: {other}}}
        remote-smtp: mx.example.com:25
        """)
    )
    assert problem.startswith(
        "configuration.yml:3: local-smtp.tls: the certificate and key cannot be used:"
    )


def test_every_mistake_in_remote_smtp_is_reported_with_its_line() -> None:
    assert problems(
        with_managers("""\
        remote-smtp:
          address: smtp.example.com:587
          tls: sometimes
          user: alerts
          sender: nobody
        """)
    ) == [
        "configuration.yml:3: remote-smtp.tls: expected may, none, starttls or implicit,"
        " got 'sometimes'",
    ]
    assert problems(
        with_managers("""\
        remote-smtp:
          address: smtp.example.com:587
          user: alerts
          sender: nobody
        """)
    ) == [
        "configuration.yml:3: remote-smtp.user: 'user' needs 'passwd' too",
        "configuration.yml:4: remote-smtp.sender: 'nobody' is not a mail address",
    ]


def test_a_password_is_never_configured_for_clear_text() -> None:
    assert problems(
        with_managers("""\
        remote-smtp:
          address: smtp.example.com:25
          tls: none
          user: alerts
          passwd: secret-one
        """)
    ) == [
        "configuration.yml:5: remote-smtp.passwd: a password is never sent in clear text:"
        " use tls: starttls or implicit",
    ]


@pytest.mark.parametrize(
    ("tls", "warned"),
    [
        ("", "tls: may (the default) does not check"),
        ("  tls: may\n", "tls: may (the default) does not check"),
        ("  tls: starttls\n  verify: false\n", "verify: false"),
        ("  tls: starttls\n", None),
    ],
)
def test_check_warns_of_a_password_sent_where_the_certificate_is_not_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tls: str, warned: str | None
) -> None:
    path = tmp_path / "configuration.yml"
    remote = "remote-smtp:\n  address: smtp.example.com:587\n  user: alerts\n  passwd: s3cret\n"
    path.write_text(remote + tls + textwrap.dedent(MANAGERS), encoding="utf-8")

    code = cli.main(["check", "--config", str(path)])

    _, err = capsys.readouterr()
    assert code == 0  # a warning, not a problem: the file is valid
    assert "s3cret" not in err
    if warned is None:
        assert "warning" not in err
    else:
        assert f"{path}: warning: remote-smtp: the password of alerts goes to whoever" in err
        assert warned in err
