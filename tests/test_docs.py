"""What README.md and SECURITY.md promise about configuration is what the code does: each
smarthost example loads through the real validator, and the defaults SECURITY.md states are
the defaults in mail2alert.settings."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from mail2alert import cli, config
from mail2alert.session import COMMAND_LIMIT
from mail2alert.settings import PRIVATE_NETWORKS, HostPort, Upstream
from tests.test_config_smtp import MANAGERS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECURITY = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
SMTP_ENV = {"SMTP_USER": "alerts@example.com", "SMTP_PASSWD": "an app password"}


def section(text: str, heading: str) -> str:
    """From ``heading`` (a whole line) to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.splitlines().index(heading)
    lines = []
    for line in text.splitlines()[start + 1 :]:
        if re.match(rf"#{{1,{level}}} ", line):
            break
        lines.append(line)
    return "\n".join(lines)


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)


SMARTHOSTS = yaml_blocks(section(README, "#### Smarthosts"))


def defaults_row(setting: str) -> str:
    """The row of SECURITY.md's defaults table for ``setting`` (as written in its first cell)."""
    rows = [line for line in SECURITY.splitlines() if line.startswith(f"| {setting} |")]
    assert len(rows) == 1, f"SECURITY.md has {len(rows)} rows for {setting}"
    return rows[0]


@pytest.mark.parametrize("block", SMARTHOSTS, ids=lambda b: b.split("address: ")[1].split()[0])
def test_each_readme_smarthost_example_loads_with_its_variables_set(block: str) -> None:
    upstream = config.parse(block + MANAGERS, "README.md", SMTP_ENV).upstream
    assert upstream.user == SMTP_ENV["SMTP_USER"]
    assert upstream.passwd is not None
    assert upstream.passwd.reveal() == SMTP_ENV["SMTP_PASSWD"]
    assert upstream.sender is not None
    assert upstream.verify, "a smarthost that gets a password has its certificate checked"


def test_the_readme_shows_port_587_with_starttls_and_port_465_with_implicit_tls() -> None:
    shown = [config.parse(b + MANAGERS, "README.md", SMTP_ENV).upstream for b in SMARTHOSTS]
    assert [(u.address.port, u.tls) for u in shown] == [(587, "starttls"), (465, "implicit")]


def test_security_md_names_the_default_allowed_clients() -> None:
    named = re.findall(r"`([0-9a-f.:]+(?:/\d+)?)`", defaults_row("`allowed-clients`"))
    assert tuple(ipaddress.ip_network(n) for n in named) == PRIVATE_NETWORKS


def test_security_md_names_the_default_listener_and_its_limits() -> None:
    unset = config.parse("remote-smtp: mx.example.com:25\n" + MANAGERS, "c.yml", {})
    assert f"`{unset.local_smtp}`" in defaults_row("`local-smtp`")
    listener = unset.listener
    assert defaults_row("limits").split("|")[2].strip() == (
        f"{listener.max_message_size // 2**20} MiB, {listener.max_recipients} recipients,"
        f" {listener.max_sessions} sessions, {listener.timeout / 60:g} minutes,"
        f" {COMMAND_LIMIT}-byte commands"
    )


def test_security_md_names_the_default_upstream_tls() -> None:
    assert defaults_row("`remote-smtp.tls`").split("|")[2].strip() == (
        f"`{Upstream(HostPort('mx', 25)).tls}`"
    )


def test_security_md_names_the_monitors_default_address() -> None:
    assert f"`127.0.0.1:{cli.MONITOR_PORT}`" in defaults_row("debug console")
    assert cli.build_parser().parse_args(["serve", "--monitor"]).monitor == (
        f"127.0.0.1:{cli.MONITOR_PORT}"
    )


def test_the_readme_links_security_md() -> None:
    assert "(SECURITY.md)" in README
