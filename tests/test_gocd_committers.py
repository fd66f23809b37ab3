"""Route to whoever broke it: ``committers:`` mails the authors of the changes a stage mail
names, and templates see them and who cancelled the stage.

The mails are GoCD's own (``tests/data/gocd-mails``, made by JavaMail as GoCD 26.1 sends
them). Fast tests read and route them without a socket; end-to-end tests send them over SMTP
to mail2alert and read what the upstream server got.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from mail2alert import cli, config, sendtest
from mail2alert.errors import ConfigError, UsageError
from mail2alert.gocd.manager import committers_in, read_gocd_alert
from mail2alert.managers.base import Context
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.message import RawMessage
from mail2alert.model import Alert, ChatTemplate, Decision, Envelope, Person
from mail2alert.planning import accept
from mail2alert.routing import Manager, Rule
from mail2alert.templates import render
from mail2alert.testing import CaptureServer
from tests.helpers import addresses, running, send, write_config

MAILS = Path(__file__).resolve().parent / "data" / "gocd-mails"
GOCD_TO = "mail2alert@example.com"
ENVELOPE = Envelope("go@example.com", (GOCD_TO,))
JANE = Person("Jane Doe", "jane@example.com")


def mail(name: str) -> bytes:
    return (MAILS / name).read_bytes()


def read(data: bytes) -> Alert:
    return read_gocd_alert(RawMessage.parse(data), ENVELOPE, Context())


def stage_mail(changes: str) -> bytes:
    """GoCD's ``failed`` mail with ``changes`` as its changes section."""
    head = mail("stage-failed.eml").split(b"\r\n\r\n", 1)[0]
    body = (
        "See details: https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1\n\n"
        f"-- CHANGES --\n\n{changes}\n\nSent by Go on behalf of mail2alert"
    )
    return head + b"\r\n\r\n" + body.encode("ascii")


def git(name: str, address: str, revision: str = "abc123") -> str:
    """One Git change as GoCD lists it."""
    return (
        f"Git: https://git.example.com/app.git\nrevision: {revision}, modified by"
        f" {name} <{address}> on 2024-03-15 16:31:40.0\nA commit message\nmodified README.md\n"
    )


# -- reading the authors from GoCD's mails ----------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["stage-broken.eml", "stage-failed.eml", "stage-cancelled.eml", "stage-broken-pre26.eml"],
)
def test_the_author_of_a_git_change_is_read_with_the_address_gocd_shows(name: str) -> None:
    assert read(mail(name)).committers == (JANE,)


def test_a_quoted_printable_utf8_author_is_read_decoded() -> None:
    assert read(mail("stage-utf8-qp.eml")).committers == (
        Person("J\u00f6rg M\u00fcller", "jm@example.com"),
    )


def test_authors_of_other_materials_are_named_without_an_address() -> None:
    """Mercurial and Subversion name a user; packages, plugins and upstream pipelines name
    no one."""
    assert read(mail("stage-materials.eml")).committers == (Person("bob"), Person("carol"))


def test_a_stage_mail_without_changes_names_no_committers() -> None:
    assert read(mail("stage-nochanges.eml")).committers == ()


def test_each_author_is_named_once_in_the_order_of_their_first_change() -> None:
    changes = "\n".join(
        [
            git("Jane Doe", "jane@example.com", "r1"),
            git("Jörg Müller", "jm@example.com", "r2"),
            git("Jane Doe", "Jane@Example.com", "r3"),
        ]
    )
    assert committers_in(changes) == (JANE, Person("Jörg Müller", "jm@example.com"))


@pytest.mark.parametrize(
    "address",
    ["eve@example.com>, <boss@example.com", "eve@example.com, boss@example.com", "eve", ""],
)
def test_an_author_address_that_is_not_one_plain_address_is_kept_as_no_address(
    address: str,
) -> None:
    """What a commit says of its author is anyone's to write: it never adds a recipient."""
    (person,) = committers_in(git("Eve", address))
    assert person.address == ""


def test_who_cancelled_the_stage_is_read_from_gocds_first_line() -> None:
    assert read(mail("stage-cancelled.eml")).facts["cancelled_by"] == "alice"
    assert read(mail("stage-broken.eml")).facts["cancelled_by"] == ""


def test_templates_see_the_committers_with_name_and_address_and_who_cancelled() -> None:
    template = ChatTemplate(
        title="{{ cancelled_by }}",
        body="{% for c in committers %}{{ c.name }}={{ c.address }};{% endfor %}",
    )
    rendered = render(template, read(mail("stage-cancelled.eml")))
    assert (rendered.title, rendered.body) == ("alice", "Jane Doe=jane@example.com;")


# -- routing ----------------------------------------------------------------------------------


def gocd_manager(*actions: str, fallback: tuple[str, ...] = ()) -> Manager:
    """A gocd manager with one rule: any stage mail goes to ``actions``."""
    gocd = MANAGER_TYPES["gocd"]
    any_stage = gocd.functions["pipelines.any"]
    rule = Rule(any_stage, (), any_stage.compile(()), actions)
    return Manager(gocd, 0, wants_to=(GOCD_TO,), rules=(rule,), fallback=fallback)


def decide(data: bytes, *actions: str, fallback: tuple[str, ...] = ()) -> Decision:
    manager = gocd_manager(*actions, fallback=fallback)
    return accept("Q", ENVELOPE, data, [manager], Context()).decision


def test_committers_get_the_mail_together_with_the_rules_mailto_recipients() -> None:
    manager = gocd_manager("committers:", "mailto:team@x.org")

    accepted = accept("Q", ENVELOPE, mail("stage-broken.eml"), [manager], Context())

    assert accepted.decision.actions == ("mailto:jane@example.com", "mailto:team@x.org")
    (item,) = accepted.items
    assert item.recipients == ("jane@example.com", "team@x.org")
    assert addresses(item.data, "to") == ["jane@example.com", "team@x.org"]


def test_a_domain_keeps_only_the_committers_of_that_domain() -> None:
    data = stage_mail(git("Jane Doe", "jane@Example.com", "r1") + "\n" + git("Ext", "x@other.org"))

    decision = decide(data, "committers:@example.com")

    assert decision.actions == ("mailto:jane@Example.com",)


def test_route_trace_shows_the_addresses_found() -> None:
    (trace,) = decide(mail("stage-utf8-qp.eml"), "committers:").trace

    assert trace.reason == "pipeline 'my-pipeline'; committers: jm@example.com"
    assert trace.actions == ("mailto:jm@example.com",)


def test_with_no_address_found_the_rules_other_actions_still_apply() -> None:
    decision = decide(
        mail("stage-materials.eml"),
        "committers:",
        "mailto:team@example.com",
        fallback=("mailto:ci-admins@example.com",),
    )

    assert decision.actions == ("mailto:team@example.com",)
    assert decision.trace[0].reason == "pipeline 'my-pipeline'; committers: none with an address"


def test_a_rule_with_only_committers_and_none_found_falls_back_to_the_managers_fallback() -> None:
    decision = decide(
        mail("stage-materials.eml"), "committers:", fallback=("mailto:ci-admins@example.com",)
    )

    assert (decision.outcome, decision.actions) == ("deliver", ("mailto:ci-admins@example.com",))
    assert decision.trace[0].reason.endswith("committers: none with an address: fallback actions")


def test_a_rule_with_only_committers_none_found_and_no_fallback_drops_and_says_why() -> None:
    decision = decide(mail("stage-utf8-qp.eml"), "committers:@example.org")

    assert (decision.outcome, decision.actions) == ("drop", ())
    assert decision.reason == "1 of 1 rules matched, with no one to send to"


@pytest.mark.usefixtures("restore_logging")
def test_route_trace_prints_the_committers_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=25,
        data_dir=tmp_path / "data",
        managers=[manager_config(["committers:", "mailto:team@example.com"])],
    )

    code = cli.main(["route", "--config", str(path), "--trace", str(MAILS / "stage-broken.eml")])

    out = capsys.readouterr().out
    assert code == 0
    assert (
        "pipelines.any(): pipeline 'my-pipeline'; committers: jane@example.com"
        " -> mailto:jane@example.com, mailto:team@example.com"
    ) in out


@pytest.mark.usefixtures("restore_logging")
def test_coverage_shows_committers_as_written_and_what_goes_when_none_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A made-up stage mail names no committer: without this, a rule that sends only to
    committers would look like no route at all."""
    manager = {
        "name": "gocd",
        "messages-we-want": {"to": GOCD_TO},
        "fallback": ["mailto:ci-admins@example.com"],
        "rules": [
            {
                "actions": ["committers:@example.com"],
                "filter": {"function": "pipelines.any", "events": ["BREAKS"]},
            },
            {
                "actions": ["committers:", "mailto:team@example.com"],
                "filter": {"function": "pipelines.any", "events": ["FIXED"]},
            },
        ],
    }
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=25,
        data_dir=tmp_path / "data",
        managers=[manager],
    )
    snapshot = Path(__file__).resolve().parents[1] / "examples" / "gocd-snapshot.json"

    code = cli.main(["coverage", "--config", str(path), "--gocd-snapshot", str(snapshot)])

    lines = capsys.readouterr().out.splitlines()
    start = lines.index("    my-pipeline")
    assert code == 0
    assert lines[start + 1 : start + 6] == [
        "      PASSES    mailto:ci-admins@example.com",
        "      FAILS     mailto:ci-admins@example.com",
        "      BREAKS    committers:@example.com, mailto:ci-admins@example.com",
        "      FIXED     committers:, mailto:team@example.com",
        "      CANCELLED mailto:ci-admins@example.com",
    ]
    assert "  pipelines with no route for BREAKS: 0" in lines


# -- validation -------------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.parse(textwrap.dedent(text), "configuration.yml", {})
    return [str(p) for p in caught.value.problems]


def committers_config(*actions: str) -> config.Config:
    text = f"""\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            messages-we-want: {{to: mail2alert@example.com}}
            rules:
              - actions: {list(actions)}
                filter: {{function: pipelines.any}}
        """
    return config.parse(textwrap.dedent(text), "configuration.yml", {})


def test_committers_and_committers_of_a_domain_load_for_a_gocd_manager() -> None:
    loaded = committers_config("committers:", "committers:@example.com")

    assert loaded.routing[0].rules[0].actions == ("committers:", "committers:@example.com")
    assert loaded.chat_settings().actions == {}


def test_a_malformed_committers_action_is_reported_with_its_line() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            messages-we-want: {to: mail2alert@example.com}
            rules:
              - actions:
                  - committers:example.com
                filter: {function: pipelines.any}
        """
    ) == [
        "configuration.yml:7: managers[0].rules[0].actions[0]: 'committers:example.com': write"
        " committers: (every committer with an address) or committers:@example.com (only the"
        " addresses of that domain)"
    ]


def test_committers_for_a_manager_that_reads_none_is_reported_with_its_line() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want: {from: go@example.com}
            rules:
              - actions: ["committers:"]
                filter: {function: mail.in_subject, args: [backup]}
        """
    ) == [
        "configuration.yml:6: managers[0].rules[0].actions[0]: the mail manager reads no"
        " committers from its mails (committers: works with gocd)"
    ]


def test_committers_in_a_fallback_is_reported_with_its_line() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            messages-we-want: {to: mail2alert@example.com}
            fallback: ["committers:"]
        """
    ) == [
        "configuration.yml:5: managers[0].fallback[0]: the fallback is for mail no one else is"
        " found for: give mailto: or chat actions, not committers:"
    ]


def test_send_test_of_a_rule_tests_its_other_actions_and_leaves_committers_out() -> None:
    loaded = committers_config("committers:", "mailto:team@example.com")

    assert sendtest.targets(loaded, "gocd#0:1") == ("mailto:team@example.com",)


def test_send_test_of_committers_alone_says_there_is_no_address_to_test() -> None:
    loaded = committers_config("committers:@example.com")

    with pytest.raises(UsageError, match="committers: has no address of its own"):
        sendtest.targets(loaded, "managers[0].rules[0]")


# -- end to end -------------------------------------------------------------------------------


def manager_config(actions: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": "gocd",
        "messages-we-want": {"to": GOCD_TO},
        **extra,
        "rules": [{"actions": actions, "filter": {"function": "pipelines.any"}}],
    }


def test_gocds_mail_goes_to_its_git_authors_and_the_rules_recipients_over_smtp(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=data_dir,
        managers=[manager_config(["committers:@example.com", "mailto:team@example.org"])],
    )
    with running(path) as service:
        send(service.port, mail("stage-utf8-qp.eml"), rcpt_tos=[GOCD_TO])
        send(service.port, mail("stage-broken.eml"), rcpt_tos=[GOCD_TO])
        got = upstream.wait_for(2)

    assert [m.rcpt_tos for m in got] == [
        ("jm@example.com", "team@example.org"),
        ("jane@example.com", "team@example.org"),
    ]
    assert addresses(got[0].data, "to") == ["jm@example.com", "team@example.org"]


def test_a_mail_naming_no_address_goes_to_the_fallback_over_smtp(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=data_dir,
        managers=[manager_config(["committers:"], fallback=["mailto:ci-admins@example.com"])],
    )
    with running(path) as service:
        send(service.port, mail("stage-materials.eml"), rcpt_tos=[GOCD_TO])
        (got,) = upstream.wait_for(1)

    assert got.rcpt_tos == ("ci-admins@example.com",)
