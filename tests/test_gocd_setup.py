"""``mail2alert check --gocd``: GoCD, asked over HTTP as the manager's user, is set up to mail
this mail2alert every stage event; each thing set up wrong is one line saying what to change
in GoCD, and the command exits 1. Under them, the pure judgements of what GoCD answered.
"""

from __future__ import annotations

import asyncio
import base64
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mail2alert import config, explain
from mail2alert.gocd.setup_check import (
    Filter,
    GocdUser,
    Judgement,
    MailServer,
    covered_events,
    judge_filters,
    judge_mail_server,
    judge_user,
    same_host,
)
from mail2alert.gocd.testing import EVERY_EVENT, FakeGoCD, FakeMailServer
from mail2alert.settings import HostPort, InboundTls, Listener
from mail2alert.testing import EndlessAnswer, free_port
from tests.helpers import write_config

PASSWORD = "s3cret-pelle"
LISTEN = "127.0.0.1:2525"


@pytest.fixture
def gocd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGoCD]:
    """A GoCD whose user mail2alert is set up as README "Setting up GoCD" says, an admin,
    with its mail server pointed at this mail2alert's local-smtp."""
    monkeypatch.setenv("GOPASS", PASSWORD)
    with FakeGoCD({"my-group": ["app"], "infra": []}, user="mail2alert", password=PASSWORD) as g:
        g.account.mail_server = FakeMailServer("127.0.0.1", 2525)
        yield g


def _config(
    tmp_path: Path, gocd: FakeGoCD, *, group: str = "my-group", local: Any = LISTEN
) -> Path:
    manager = {
        "name": "gocd",
        "url": gocd.url,
        "user": "mail2alert",
        "passwd": "$GOPASS",
        "messages-we-want": {"to": "mail2alert@example.com", "from": "go@example.com"},
        "rules": [
            {
                "actions": ["mailto:team@example.com"],
                "filter": {"function": "pipelines.in_group", "args": [group]},
            }
        ],
    }
    return write_config(
        tmp_path / "configuration.yml",
        remote_port=free_port(),
        data_dir=tmp_path / "data",
        managers=[manager],
        local=local,
    )


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    """What ``check --gocd`` prints: the exit code, the summary lines and the findings."""
    reports = asyncio.run(explain.setup_reports(config.load(path), ["gocd"]))
    out = [s for r in reports if (s := r.summary()) is not None]
    err = [line for r in reports for line in r.finding_lines()]
    return (1 if err else 0), out, err


# -- end to end, over HTTP -------------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
def test_a_gocd_set_up_as_the_readme_says_has_no_finding_and_exits_0(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _check(_config(tmp_path, gocd), capsys)
    assert (code, err) == (0, [])
    assert out == [
        'gocd#0: OK (user mail2alert, "email me" on, e-mail mail2alert@example.com; '
        "notification filters cover every pipeline, stage and event; "
        "GoCD's mail server 127.0.0.1:2525 is this mail2alert (compared with local-smtp "
        "127.0.0.1:2525); views every pipeline group (2, as an admin))"
    ]
    asked = [(path, accept) for path, accept, _ in gocd.requests]
    assert asked == [
        ("/go/api/current_user", "application/vnd.go.cd.v1+json"),
        ("/go/api/notification_filters", "application/vnd.go.cd.v2+json"),
        ("/go/api/config/mailserver", "application/vnd.go.cd.v1+json"),
        ("/go/api/admin/pipeline_groups", "application/vnd.go.cd.v1+json"),
    ]


def _no_email_me(g: FakeGoCD) -> None:
    g.account.email_me = False


def _other_email(g: FakeGoCD) -> None:
    g.account.email = "bob@example.com"


def _breaks_only(g: FakeGoCD) -> None:
    g.account.filters = [{**EVERY_EVENT, "event": "Breaks"}]


def _my_checkins(g: FakeGoCD) -> None:
    g.account.filters = [{**EVERY_EVENT, "match_commits": True}]


def _elsewhere(g: FakeGoCD) -> None:
    g.account.mail_server = FakeMailServer("127.0.0.1", 25)


def _smtps(g: FakeGoCD) -> None:
    g.account.mail_server = FakeMailServer("127.0.0.1", 2525, tls=True)


def _no_mail_server(g: FakeGoCD) -> None:
    g.account.mail_server = None


def _other_sender(g: FakeGoCD) -> None:
    g.account.mail_server = FakeMailServer("127.0.0.1", 2525, sender_email="ci@example.com")


def _security_off(g: FakeGoCD) -> None:
    g.account.security = False


MISCONFIGURED: dict[str, tuple[Callable[[FakeGoCD], None], str]] = {
    "email me off": (
        _no_email_me,
        'gocd#0: user mail2alert has "email me" off, so GoCD mails it nothing: '
        'turn "email me" on in mail2alert\'s preferences in GoCD',
    ),
    "another e-mail": (
        _other_email,
        "gocd#0: user mail2alert e-mail is 'bob@example.com', not mail2alert@example.com "
        "(messages-we-want: to:): set mail2alert's e-mail in GoCD to mail2alert@example.com",
    ),
    "a filter for one event": (
        _breaks_only,
        "gocd#0: user mail2alert's notification filters miss Passes, Fails, Fixed, Cancelled "
        "for some pipelines (it has: [Any Pipeline] [Any Stage] Breaks): add the filter "
        '[Any Pipeline] [Any Stage] All with "only if it contains my check-ins" off to '
        "mail2alert's preferences in GoCD",
    ),
    "a filter for its own check-ins": (
        _my_checkins,
        "gocd#0: user mail2alert's notification filters miss Passes, Fails, Breaks, Fixed, "
        "Cancelled for some pipelines (it has: [Any Pipeline] [Any Stage] All (my check-ins)) "
        '("only if it contains my check-ins" leaves out others\' changes): add the filter '
        '[Any Pipeline] [Any Stage] All with "only if it contains my check-ins" off to '
        "mail2alert's preferences in GoCD",
    ),
    "mail server elsewhere": (
        _elsewhere,
        "gocd#0: GoCD sends its mail to 127.0.0.1:25, not to this mail2alert (compared with "
        "local-smtp 127.0.0.1:2525): set GoCD's email server (Admin → Server Configuration) "
        "to host 127.0.0.1, port 2525",
    ),
    "SMTPS without implicit TLS": (
        _smtps,
        'gocd#0: GoCD\'s email server has "Use SMTPS" on, and local-smtp offers no implicit '
        'TLS: turn "Use SMTPS" off in GoCD\'s email server (Admin → Server Configuration) '
        "(or set local-smtp tls mode: implicit)",
    ),
    "no mail server": (
        _no_mail_server,
        "gocd#0: GoCD has no mail server set up, so it sends no mail at all: set GoCD's email "
        "server (Admin → Server Configuration) to host 127.0.0.1, port 2525",
    ),
    "another sender": (
        _other_sender,
        "gocd#0: GoCD sends as ci@example.com, not go@example.com (messages-we-want: from:): "
        "set the sender email of GoCD's email server (Admin → Server Configuration) to "
        "go@example.com",
    ),
    "security off": (
        _security_off,
        "gocd#0: GoCD answers /api/current_user with HTTP 403 (as it does when security is "
        "off): GoCD then sends no stage mails at all: enable security in GoCD (an "
        "authorization configuration) and give mail2alert a user of its own",
    ),
}


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("case", list(MISCONFIGURED))
def test_each_misconfiguration_is_one_line_saying_what_to_change_in_gocd_and_exit_1(
    case: str, tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    misconfigure, line = MISCONFIGURED[case]
    misconfigure(gocd)
    code, _, err = _check(_config(tmp_path, gocd), capsys)
    assert (code, err) == (1, [line])


@pytest.mark.usefixtures("restore_logging")
def test_a_rule_naming_a_group_gocd_does_not_have_is_a_finding_for_an_admin(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _check(_config(tmp_path, gocd, group="team-x"), capsys)
    assert code == 1
    [line] = err
    assert line.startswith("gocd#0: rule 1 (line ")
    assert line.endswith(
        "names pipeline group 'team-x', which GoCD does not have: create it in GoCD, or "
        "correct the rule (GoCD has: my-group, infra)"
    )


@pytest.mark.usefixtures("restore_logging")
def test_a_user_without_admin_rights_skips_the_mail_server_without_a_finding(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    gocd.admin_forbidden = True
    gocd.account.mail_server = FakeMailServer("smtp.example.com", 25)  # not readable: no finding
    code, out, err = _check(_config(tmp_path, gocd), capsys)
    assert (code, err) == (0, [])
    [summary] = out
    assert "mail server not checked: mail2alert is no GoCD admin (only admins may read it)" in (
        summary
    )
    assert "views 2 pipeline groups (GoCD shows no one the groups they cannot view" in summary
    assert ("/go/api/dashboard", "application/vnd.go.cd.v4+json", 200) in gocd.requests


@pytest.mark.usefixtures("restore_logging")
def test_a_group_a_non_admin_cannot_view_is_named_with_the_permission_to_give(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    gocd.admin_forbidden = True
    code, _, err = _check(_config(tmp_path, gocd, group="secret-team"), capsys)
    assert code == 1
    [line] = err
    assert line.endswith(
        "names pipeline group 'secret-team', which user mail2alert cannot view (or GoCD does "
        "not have): give mail2alert view permission on pipeline group secret-team in GoCD"
    )


@pytest.mark.usefixtures("restore_logging")
def test_wrong_credentials_are_one_line_with_401_after_one_login_and_no_password(
    tmp_path: Path,
    gocd: FakeGoCD,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GOPASS", "wrong-password")
    code, out_lines, err_lines = _check(_config(tmp_path, gocd), capsys)
    out, err = "\n".join(out_lines), "\n".join(err_lines)
    assert code == 1
    assert err.splitlines() == [
        f"gocd#0: {gocd.url}/api/current_user answered HTTP 401: GoCD does not accept the "
        "configured user and password (or token): set this manager's user and passwd (or "
        "token) to those of the GoCD user that gets the stage mails"
    ]
    assert len(gocd.requests) == 1, "one failed login, not one per endpoint"
    assert "wrong-password" not in out + err
    assert PASSWORD not in out + err


@pytest.mark.usefixtures("restore_logging")
def test_a_gocd_that_does_not_answer_is_one_line_naming_its_url(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, gocd)
    gocd.stop()
    code, _, err = _check(path, capsys)
    assert code == 1
    assert err == [
        f"gocd#0: GoCD not asked: {gocd.url}/api/current_user unreachable: "
        "ClientConnectorError: check this manager's url and GoCD"
    ]


@pytest.mark.usefixtures("restore_logging")
def test_a_url_that_answers_without_end_is_one_line_and_is_let_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOPASS", PASSWORD)
    with EndlessAnswer() as endless:
        code, _, err = _check(_config(tmp_path, endless), capsys)  # type: ignore[arg-type]
    assert code == 1
    assert err == [
        f"gocd#0: {endless.url}/api/current_user answered with more than 67,108,864 bytes;"
        " the rest was not read: check that this manager's url is GoCD's"
    ]
    assert endless.sent < 128 * 1024 * 1024


@pytest.mark.usefixtures("restore_logging")
def test_local_smtp_on_every_address_compares_the_port_only(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    gocd.account.mail_server = FakeMailServer("mail2alert.internal", 2525)
    code, out, err = _check(_config(tmp_path, gocd, local="0.0.0.0:2525"), capsys)
    assert (code, err) == (0, [])
    assert (
        "GoCD's mail server mail2alert.internal:2525 is this mail2alert (compared with port "
        "2525 (local-smtp 0.0.0.0:2525 listens on every address))"
    ) in out[0]


def test_the_fake_gocd_matches_the_accept_version_exactly_like_gocd(gocd: FakeGoCD) -> None:
    def status(path: str, accept: str) -> int:
        request = urllib.request.Request(f"{gocd.url}{path}", headers={"Accept": accept})
        request.add_header("Authorization", "Basic " + _basic("mail2alert", PASSWORD))
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("/api/current_user", "application/vnd.go.cd.v1+json") == 200
    assert status("/api/current_user", "application/vnd.go.cd.v2+json") == 404
    assert status("/api/notification_filters", "application/vnd.go.cd.v1+json") == 404
    assert status("/api/notification_filters", "application/vnd.go.cd.v2+json; q=1") == 404
    assert status("/api/config/mailserver", "application/vnd.go.cd+json") == 200


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# -- the judgements, without a server ---------------------------------------------------------


def _judged(fill: Callable[[Judgement], None]) -> Judgement:
    judged = Judgement()
    fill(judged)
    return judged


def test_an_address_list_that_holds_the_wanted_address_is_right() -> None:
    user = GocdUser("ci", "mail2alert@example.com, bob@example.com", email_me=True)
    judged = _judged(lambda j: judge_user(user, ("mail2alert@example.com",), j))
    assert judged.findings == []


def test_a_user_without_an_e_mail_is_told_to_set_the_wanted_one() -> None:
    user = GocdUser("ci", "", email_me=True)
    [finding] = _judged(lambda j: judge_user(user, ("mail2alert@example.com",), j)).findings
    assert (
        finding.wrong == "user ci has no e-mail, not mail2alert@example.com (messages-we-want: to:)"
    )


def test_one_filter_per_event_together_cover_everything() -> None:
    filters = [Filter("[Any Pipeline]", "[Any Stage]", e, False) for e in ("Passes", "Fails")]
    filters += [Filter("[Any Pipeline]", "[Any Stage]", e, False) for e in ("Breaks", "Fixed")]
    assert covered_events(filters) == {"Passes", "Fails", "Breaks", "Fixed"}
    filters.append(Filter("[Any Pipeline]", "[Any Stage]", "Cancelled", False))
    assert _judged(lambda j: judge_filters("ci", filters, j)).findings == []


def test_a_filter_for_one_pipeline_covers_no_other() -> None:
    filters = [Filter("app", "[Any Stage]", "All", False)]
    assert covered_events(filters) == set()
    [finding] = _judged(lambda j: judge_filters("ci", filters, j)).findings
    assert "(it has: app [Any Stage] All)" in finding.wrong


LISTENER = Listener(HostPort("10.0.0.5", 1025))
SERVER = MailServer("mail2alert.example.com", 1025, tls=False)


def test_a_mail_host_that_resolves_to_the_listening_address_is_this_mail2alert() -> None:
    resolved = {
        "mail2alert.example.com": frozenset({"10.0.0.5"}),
        "10.0.0.5": frozenset({"10.0.0.5"}),
    }
    judged = _judged(lambda j: judge_mail_server(SERVER, LISTENER, (), resolved, j))
    assert judged.findings == []


def test_a_mail_host_elsewhere_says_what_was_compared() -> None:
    resolved = {
        "mail2alert.example.com": frozenset({"10.0.0.9"}),
        "10.0.0.5": frozenset({"10.0.0.5"}),
    }
    [finding] = _judged(lambda j: judge_mail_server(SERVER, LISTENER, (), resolved, j)).findings
    assert finding.wrong == (
        "GoCD sends its mail to mail2alert.example.com:1025, not to this mail2alert (compared "
        "with local-smtp 10.0.0.5:1025)"
    )


def test_implicit_tls_on_local_smtp_wants_smtps_on_in_gocd() -> None:
    tls = InboundTls("implicit", Path("cert.pem"), Path("key.pem"))
    listener = replace(LISTENER, tls=tls)
    resolved = {
        "mail2alert.example.com": frozenset({"10.0.0.5"}),
        "10.0.0.5": frozenset({"10.0.0.5"}),
    }
    [finding] = _judged(lambda j: judge_mail_server(SERVER, listener, (), resolved, j)).findings
    assert (
        finding.change
        == 'turn "Use SMTPS" on in GoCD\'s email server (Admin → Server Configuration)'
    )


def test_loopback_on_both_sides_is_the_same_machine() -> None:
    resolved = {"localhost": frozenset({"127.0.0.1", "::1"}), "127.0.0.1": frozenset({"127.0.0.1"})}
    assert same_host("localhost", "127.0.0.1", resolved)
    assert not same_host("ci.example.com", "127.0.0.1", {"127.0.0.1": frozenset({"127.0.0.1"})})
