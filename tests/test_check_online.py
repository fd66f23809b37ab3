"""``mail2alert check --online``: one line per thing the running service needs, asked for real
over loopback, nothing sent or posted; exit 1 when one of them fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mail2alert import cli
from mail2alert.actions import mask
from mail2alert.gocd.testing import FakeGoCD, FakeMailServer
from mail2alert.testing import CaptureServer, FakeSlack, HookReceiver, free_port

#: An Apprise URL of a hosted service: only a post would tell whether it works.
HOSTED = "discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js"


def _config(
    tmp_path: Path, *, smtp_port: int, gocd: FakeGoCD, slack: FakeSlack, hook_url: str
) -> Path:
    document = {
        "remote-smtp": f"127.0.0.1:{smtp_port}",
        "data-dir": str(tmp_path / "data"),
        "slack-token": "$SLACK_TOKEN",
        "slack-api-url": slack.api_url,
        "managers": [
            {
                "name": "gocd",
                "url": gocd.url,
                "user": "olle",
                "passwd": "$GOPASS",
                "messages-we-want": {"to": "mail2alert@example.com"},
                "rules": [
                    {
                        "actions": ["slack:#builds", hook_url, HOSTED],
                        "filter": {"function": "pipelines.any", "events": ["BREAKS"]},
                    }
                ],
            }
        ],
    }
    path = tmp_path / "configuration.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOPASS", "pelle")
    monkeypatch.setenv("SLACK_TOKEN", FakeSlack().token)


@pytest.mark.usefixtures("restore_logging", "secrets")
def test_check_online_asks_everything_and_says_ok_line_by_line_with_nothing_sent(
    tmp_path: Path, upstream: CaptureServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        FakeGoCD({"my-group": ["app"]}, user="olle", password="pelle") as gocd,
        FakeSlack() as slack,
        HookReceiver() as hook,
    ):
        # GoCD set up as the README says, its mail server pointed at this local-smtp.
        gocd.account.mail_server = FakeMailServer("localhost", 1025)
        path = _config(tmp_path, smtp_port=upstream.port, gocd=gocd, slack=slack, hook_url=hook.url)
        code = cli.main(["check", "--online", "--config", str(path)])
        posted = [call.path for call in slack.calls]
        hooked = list(hook.calls)
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    lines = out.splitlines()
    # Last, GoCD's own setup for this mail2alert, as check --gocd says it.
    assert lines[-1].startswith('gocd#0: OK (user olle, "email me" on')
    assert lines[1:-1] == [
        f"remote-smtp 127.0.0.1:{upstream.port}: OK (may)",
        f"gocd#0: OK (GoCD {gocd.url} answered: 1 pipeline groups)",
        f"Slack Web API {slack.api_url}: OK (slack-token works for team {FakeSlack.TEAM})",
        f"{mask(HOSTED)}: OK (not asked: only a post would tell (send-test))",
        f"json://127.0.0.1:{hook.port}/***: OK (127.0.0.1:{hook.port} takes connections"
        " (nothing posted))",
    ]
    assert upstream.messages == []
    assert posted == ["/api/auth.test"]
    assert hooked == []


@pytest.mark.usefixtures("restore_logging")
def test_check_online_names_each_failure_on_stderr_and_exits_1_without_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GOPASS", "wrong-gocd-password")
    monkeypatch.setenv("SLACK_TOKEN", "xoxb-wrong-token")
    with (
        FakeGoCD({"my-group": ["app"]}, user="olle", password="pelle") as gocd,
        FakeSlack() as slack,
    ):
        hook = HookReceiver()  # never started: nothing listens on its port
        path = _config(tmp_path, smtp_port=free_port(), gocd=gocd, slack=slack, hook_url=hook.url)
        code = cli.main(["check", "--online", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 1
    failed = err.splitlines()
    # Last, GoCD's own setup, which it cannot be asked about with the wrong password.
    assert failed[-1].startswith("gocd#0: ")
    assert "401" in failed.pop()
    assert [line.split(": FAILED: ")[0] for line in failed] == [
        f"remote-smtp 127.0.0.1:{path.read_text().split('127.0.0.1:')[1].split()[0]}",
        "gocd#0",
        f"Slack Web API {slack.api_url}",
        f"json://127.0.0.1:{hook.port}/***",
    ]
    assert "401" in failed[1]
    assert "invalid_auth" in failed[2]
    assert "cannot connect" in failed[3]
    assert "wrong-gocd-password" not in out + err
    assert "xoxb-wrong-token" not in out + err
