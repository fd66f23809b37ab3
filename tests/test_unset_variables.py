"""Operator commands that send nothing work while a variable only the service needs is unset;
``check``, ``serve`` and ``send-test`` still refuse it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mail2alert import cli, config
from mail2alert.gocd.model import PipelineGroups
from mail2alert.gocd.poller import save_snapshot, snapshot_path
from mail2alert.gocd.testing import FakeGoCD
from mail2alert.outbox import Outbox

SECRET_NAMES = ("GOPASS", "SMTP_PASSWD", "CHAT_URL")


def _config(tmp_path: Path, gocd_url: str) -> Path:
    path = tmp_path / "configuration.yml"
    path.write_text(
        f"""\
remote-smtp:
  address: localhost:8025
  user: alerts
  passwd: $SMTP_PASSWD
managers:
  - name: gocd
    url: {gocd_url}
    user: olle
    passwd: $GOPASS
    messages-we-want:
      to: mail2alert@example.com
    rules:
      - actions:
          - mailto:cat@example.com
          - $CHAT_URL
        filter:
          events: [BREAKS]
          function: pipelines.in_group
          args: [my-group]
"""
    )
    return path


@pytest.fixture(autouse=True)
def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_a_lenient_load_lists_each_unset_variable_with_its_key(tmp_path: Path) -> None:
    loaded = config.load(_config(tmp_path, "http://localhost:8080/go"), unset_ok=True)

    assert [(u.name, u.path) for u in loaded.unset] == [
        ("SMTP_PASSWD", "remote-smtp.passwd"),
        ("GOPASS", "managers[0].passwd"),
        ("CHAT_URL", "managers[0].rules[0].actions[1]"),
    ]
    assert loaded.managers[0].manager.rules[0].actions == ("mailto:cat@example.com",)


@pytest.mark.usefixtures("restore_logging")
def test_route_says_what_is_unset_and_routes_by_the_kept_snapshot_without_asking_gocd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeGoCD({"my-group": ["app"]}, user="olle", password="pelle") as gocd:
        path = _config(tmp_path, gocd.url)
        data_dir = config.load(path, unset_ok=True).data_dir
        data_dir.mkdir()
        save_snapshot(
            snapshot_path(data_dir, gocd.url),
            PipelineGroups({"my-group": ("app",)}, fetched_at=time.time()),
        )
        code = cli.main(
            [
                "route",
                "--config",
                str(path),
                "--from",
                "go@example.com",
                "--to",
                "mail2alert@example.com",
                "--subject",
                "Stage [app/6/build/1] is broken",
                "--expect",
                "mailto:cat@example.com",
            ]
        )
        assert gocd.requests == []
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert err.splitlines() == [
        "note: remote-smtp.passwd names $SMTP_PASSWD, which is not set: only serve and check"
        " need it",
        "note: managers[0].passwd names $GOPASS, which is not set: gocd#0's live data is not"
        " read, the kept one is used",
        "note: managers[0].rules[0].actions[1] names $CHAT_URL, which is not set: that action"
        " is left out here",
    ]


@pytest.mark.usefixtures("restore_logging")
def test_queue_works_with_a_secret_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, "http://localhost:8080/go")
    Outbox(config.load(path, unset_ok=True).data_dir).close()

    assert cli.main(["queue", "list", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == "0 pending, 0 dead, 0 held\n"
    assert "$GOPASS, which is not set" in err


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    "argv", [["check"], ["send-test", "mailto:me@example.com"]], ids=["check", "send-test"]
)
def test_commands_that_need_the_secrets_still_refuse_an_unset_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path = _config(tmp_path, "http://localhost:8080/go")

    assert cli.main([*argv, "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "managers[0].passwd: environment variable 'GOPASS' is not set" in err
