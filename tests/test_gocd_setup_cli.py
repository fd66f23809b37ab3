"""``mail2alert check --gocd`` and the setup section of ``coverage``: the findings of
test_gocd_setup.py as the commands print them, with their exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mail2alert import cli
from mail2alert.gocd.testing import FakeGoCD
from tests.test_gocd_setup import PASSWORD, _config
from tests.test_gocd_setup import gocd as set_up_gocd

#: The same GoCD as test_gocd_setup.py's: set up right, its user an admin.
gocd = pytest.fixture(set_up_gocd.__wrapped__, name="gocd")  # type: ignore[attr-defined]


@pytest.mark.usefixtures("restore_logging")
def test_check_gocd_prints_one_ok_line_and_exits_0_for_a_gocd_set_up_right(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["check", "--gocd", "--config", str(_config(tmp_path, gocd))])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines()[1].startswith('gocd#0: OK (user mail2alert, "email me" on')


@pytest.mark.usefixtures("restore_logging")
def test_check_gocd_prints_each_finding_on_stderr_and_exits_1_without_the_password(
    tmp_path: Path,
    gocd: FakeGoCD,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GOPASS", "wrong-password")
    code = cli.main(["check", "--gocd", "--config", str(_config(tmp_path, gocd))])
    out, err = capsys.readouterr()
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(f"gocd#0: {gocd.url}/api/current_user answered HTTP 401")
    assert "wrong-password" not in out + err
    assert PASSWORD not in out + err


@pytest.mark.usefixtures("restore_logging")
def test_coverage_has_a_setup_section_in_text_and_json(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    gocd.account.email_me = False
    path = _config(tmp_path, gocd)
    assert cli.main(["coverage", "--config", str(path)]) == 0
    text = capsys.readouterr().out.splitlines()
    start = text.index("setup of gocd#0: 1 finding")
    assert text[start + 1].startswith('  user mail2alert has "email me" off')
    assert text[start + 2].startswith("  also checked: notification filters cover every")
    assert cli.main(["coverage", "--config", str(path), "--format", "json"]) == 0
    setup = json.loads(capsys.readouterr().out)["setup"]["gocd#0"]
    assert [f["change"] for f in setup["findings"]] == [
        'turn "email me" on in mail2alert\'s preferences in GoCD'
    ]


@pytest.mark.usefixtures("restore_logging")
def test_coverage_from_a_snapshot_file_asks_gocd_nothing(
    tmp_path: Path, gocd: FakeGoCD, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = tmp_path / "groups.json"
    snapshot.write_text(json.dumps(gocd.payload("dashboard")))
    path = _config(tmp_path, gocd)
    assert cli.main(["coverage", "--config", str(path), "--gocd-snapshot", str(snapshot)]) == 0
    assert "setup of" not in capsys.readouterr().out
    assert gocd.requests == []
