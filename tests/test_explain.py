"""``route``, ``test`` and ``coverage``: operators see and test exactly what ``serve`` runs."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mail2alert import cli
from mail2alert.gocd.testing import FakeGoCD
from tests.helpers import BACKUP_MANAGER, compose, write_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CONFIG = EXAMPLES / "configuration.yml"
SNAPSHOT = EXAMPLES / "gocd-snapshot.json"
SUITE = EXAMPLES / "routing-tests.yml"


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """cli.main() configures logging for the process; give the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from an empty directory so no stray data-dir history is read."""
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


ROUTE = ("route", "--config", str(CONFIG), "--gocd-snapshot", str(SNAPSHOT))


def test_the_facts_name_the_pipelines_group_or_say_why_there_is_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = str(EXAMPLES / "mail" / "stage-broken.eml")
    _, known, _ = run(capsys, *ROUTE, broken)
    _, unknown, _ = run(capsys, "route", "--config", str(CONFIG), broken)
    assert "event BREAKS, group my-group\n" in known
    assert "event BREAKS, group unknown (no GoCD data)\n" in unknown


def test_route_shows_facts_manager_every_rule_and_the_outcome(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, *ROUTE, "--trace", str(EXAMPLES / "mail" / "release-fixed.eml"))
    assert code == 0
    assert (
        "facts:    pipeline ppp-release-1.2.3 #12, stage deploy #2, event FIXED,"
        " ppp-release-1.2.3 is in no group GoCD knows\n"
    ) in out
    assert "manager:  gocd#0" in out
    assert "✗ rule 1 (line 15): pipelines.in_group('my-group') events BREAKS" in out
    assert "event FIXED is not one of BREAKS" in out
    assert "✓ rule 2 (line 23): pipelines.name_like_in_group('(.+)-release.*', 'my-group')" in out
    assert "outcome:  deliver to mailto:cat@example.com" in out


def test_route_without_trace_does_not_list_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *ROUTE, str(EXAMPLES / "mail" / "stage-broken.eml"))
    assert code == 0
    assert "rules:" not in out
    assert "group my-group" in out


def test_route_of_a_made_up_message_says_relay_when_no_manager_wants_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, *ROUTE, "--from", "x@example.com", "--to", "y@example.com", "--subject", "hi"
    )
    assert code == 0
    assert "manager:  none wants it" in out
    assert "outcome:  relay unchanged" in out


@pytest.mark.parametrize(
    ("expect", "code"),
    [
        ("mailto:cat@example.com", 0),
        ("mailto:dog@example.com", 1),
        ("drop", 1),
    ],
)
def test_route_expect_exits_1_with_a_one_line_diff_on_a_mismatch(
    capsys: pytest.CaptureFixture[str], expect: str, code: int
) -> None:
    got, _, err = run(
        capsys, *ROUTE, "--expect", expect, str(EXAMPLES / "mail" / "stage-broken.eml")
    )
    assert got == code
    if code:
        assert len(err.strip().splitlines()) == 1
        assert err.startswith(f"FAIL: expected {expect}; got mailto:cat@example.com")


def test_route_json_has_the_facts_and_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *ROUTE, "--json", str(EXAMPLES / "mail" / "stage-broken.eml"))
    doc = json.loads(out)
    assert code == 0
    assert doc["facts"]["pipeline"] == "my-pipeline"
    assert doc["facts"]["group"] == "my-group"
    assert doc["facts"]["event"] == "BREAKS"
    assert [r["matched"] for r in doc["rules"]] == [True, False]
    assert doc["outcome"] == "deliver"
    assert doc["actions"] == ["mailto:cat@example.com"]


def test_route_without_gocd_data_says_the_message_would_be_held(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(
        capsys, "route", "--config", str(CONFIG), str(EXAMPLES / "mail" / "stage-broken.eml")
    )
    assert code == 0
    assert "outcome:  hold" in out
    assert "note: gocd#0: GoCD not read" in err
    assert "pelle" not in err


def test_route_reads_groups_from_a_live_gocd(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with FakeGoCD({"my-group": ["my-pipeline"]}, user="olle", password="pelle") as gocd:
        text = CONFIG.read_text().replace("http://localhost:8080/go", gocd.url)
        config = tmp_path / "configuration.yml"
        config.write_text(text)
        code, out, _ = run(
            capsys, "route", "--config", str(config), str(EXAMPLES / "mail" / "stage-broken.eml")
        )
    assert code == 0
    assert "outcome:  deliver to mailto:cat@example.com" in out


def test_route_needs_a_file_or_a_made_up_message(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *ROUTE)
    assert code == 2
    assert "give FILE.eml, or --from, --to and --subject" in err


def test_the_example_suite_passes_and_exercises_every_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys,
        "test",
        str(SUITE),
        "--config",
        str(CONFIG),
        "--gocd-snapshot",
        str(SNAPSHOT),
        "--fail-under",
        "100",
    )
    assert code == 0
    assert out.count("PASS ") == 6
    assert "6 passed, 0 failed; 3 of 3 rules exercised (100%)" in out


def test_a_failing_case_is_reported_with_its_diff_and_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    suite = tmp_path / "suite.yml"
    suite.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "wrong on purpose",
                    "from": "go@example.com",
                    "to": "admin@example.com",
                    "subject": "Server backup done",
                    "expect": ["mailto:sys@example.com"],
                },
            ]
        )
    )
    code, out, _ = run(capsys, "test", str(suite), "--config", str(CONFIG))
    assert code == 1
    assert (
        "FAIL wrong on purpose: expected mailto:sys@example.com; got mailto:sys@example.com, "
        "mailto:op@example.com (unexpected mailto:op@example.com)"
    ) in out
    assert "0 passed, 1 failed" in out


def test_fail_under_fails_a_suite_that_leaves_rules_unexercised(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    suite = tmp_path / "suite.yml"
    suite.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "relay",
                    "from": "a@example.com",
                    "to": "b@example.com",
                    "subject": "x",
                    "expect": "relay",
                }
            ]
        )
    )
    code, out, err = run(capsys, "test", str(suite), "--config", str(CONFIG), "--fail-under", "50")
    assert code == 1
    assert "0 of 3 rules exercised (0%)" in out
    assert "rule coverage 0% is under 50%" in err


def test_a_malformed_suite_is_a_usage_error_naming_the_case(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    suite = tmp_path / "suite.yml"
    suite.write_text(yaml.safe_dump([{"name": "no message", "expect": "drop"}]))
    code, _, err = run(capsys, "test", str(suite), "--config", str(CONFIG))
    assert code == 2
    assert "case 'no message': give 'eml', or 'from', 'to' and 'subject'" in err


def test_coverage_lists_routes_per_group_pipeline_and_event(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, "coverage", "--config", str(CONFIG), "--gocd-snapshot", str(SNAPSHOT)
    )
    assert code == 0
    lines = out.splitlines()
    start = lines.index("    my-pipeline")
    assert lines[start + 1 : start + 6] == [
        "      PASSES    -",
        "      FAILS     -",
        "      BREAKS    mailto:cat@example.com",
        "      FIXED     -",
        "      CANCELLED -",
    ]
    assert "  pipelines with no route for BREAKS: 1" in lines
    assert "    infra/deploy-infra" in lines


def test_coverage_names_rules_that_match_no_known_pipeline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, "coverage", "--config", str(CONFIG), "--gocd-snapshot", str(SNAPSHOT)
    )
    assert code == 0
    assert "  rules that match no known pipeline: 1" in out
    assert "rule 2 (line 23): pipelines.name_like_in_group('(.+)-release.*', 'my-group')" in out


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_coverage_as_json_or_yaml_is_the_same_data(
    capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    code, out, _ = run(
        capsys,
        "coverage",
        "--config",
        str(CONFIG),
        "--gocd-snapshot",
        str(SNAPSHOT),
        "--format",
        fmt,
    )
    doc = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert code == 0
    assert doc["routes"]["gocd#0"]["my-group"]["ppp"]["BREAKS"] == ["mailto:cat@example.com"]
    assert doc["orphans_for_BREAKS"] == {"gocd#0": ["infra/deploy-infra"]}


@pytest.mark.parametrize("shape", ["admin", "dashboard", "legacy"])
def test_any_of_gocds_three_payloads_works_as_a_snapshot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shape: str
) -> None:
    snapshot = tmp_path / "groups.json"
    snapshot.write_text(json.dumps(FakeGoCD({"my-group": ["my-pipeline"]}).payload(shape)))
    code, out, _ = run(
        capsys,
        "route",
        "--config",
        str(CONFIG),
        "--gocd-snapshot",
        str(snapshot),
        str(EXAMPLES / "mail" / "stage-broken.eml"),
    )
    assert code == 0
    assert "group my-group" in out


def test_a_bad_snapshot_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    snapshot = tmp_path / "groups.json"
    snapshot.write_text('{"nothing": "here"}')
    code, _, err = run(
        capsys, "coverage", "--config", str(CONFIG), "--gocd-snapshot", str(snapshot)
    )
    assert code == 2
    assert "not a pipeline-groups payload" in err


def test_route_of_a_file_takes_the_envelope_from_the_options_when_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys,
        *ROUTE,
        "--from",
        "x@example.com",
        "--to",
        "someone@example.com",
        str(EXAMPLES / "mail" / "stage-broken.eml"),
    )
    assert code == 0
    assert "envelope: from=<x@example.com> to=<someone@example.com>" in out
    assert "outcome:  relay unchanged" in out


def test_route_of_a_file_whose_from_is_a_thousand_nested_comments_routes_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The envelope is read from the file's From: and To:; parseaddr raised RecursionError."""
    eml = tmp_path / "nested-comments.eml"
    eml.write_bytes(
        b"From: " + b"(" * 3000 + b"\r\nTo: mail2alert@example.com\r\n"
        b"Subject: Stage [my-pipeline/6/my-stage/1] is broken\r\n\r\nbody\r\n"
    )

    code, out, _ = run(capsys, *ROUTE, str(eml))

    assert code == 0
    assert "outcome:  deliver to mailto:cat@example.com" in out


@pytest.mark.usefixtures("restore_logging")
def test_route_shows_control_characters_of_the_mail_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subject decoded from RFC 2047 may carry escape sequences: the terminal must not
    obey them (as ``queue show`` and the log make them harmless)."""
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=25,
        data_dir=tmp_path / "data",
        managers=[BACKUP_MANAGER],
    )
    evil = "backup \x1b]2;owned\x07\x1b[2J done"
    encoded = "=?utf-8?b?" + base64.b64encode(evil.encode()).decode() + "?="
    mail = tmp_path / "m.eml"
    mail.write_bytes(compose(subject=encoded))
    code = cli.main(["route", "--config", str(path), "--to", "admin@example.com", str(mail)])
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b" not in out
    assert "subject:  backup \\x1b]2;owned\\x07\\x1b[2J done" in out
