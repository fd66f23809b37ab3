"""Chat destinations, specified end to end: Apprise URLs and Slack's Web API beside mail.

Every test goes smtplib -> mail2alert (in a thread) -> the capture server for mail, and
:class:`mail2alert.testing.FakeSlack` / :class:`mail2alert.testing.HookReceiver` for chat, all
on loopback. The commands (``check``, ``route``, ``queue``, ``send-test``) run through
:func:`mail2alert.cli.main`, as the operator's shell would. Nothing sleeps: tests wait for
what the fakes and the outbox record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from mail2alert import cli
from mail2alert.actions import action_id
from mail2alert.errors import OutboxFull
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.model import ChatPost, ChatSettings, ChatTemplate, Secret
from mail2alert.outbox import Item
from mail2alert.templates import check as check_template
from mail2alert.testing import CaptureServer, EndlessAnswer, FakeSlack, HookReceiver, free_port
from mail2alert.transports import Attempt
from mail2alert.transports.chat import ChatSender, ThreadStore
from mail2alert.transports.chat import _seconds as retry_after_seconds
from tests.helpers import (
    OutboxView,
    Relay,
    ServeProcess,
    field_value,
    running,
    send,
    wait_until,
)

GOCD_TO = "mail2alert@example.com"
TOKEN = "xoxb-test-token"
DETAILS = "https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1"

#: Chat retries come quickly here, so a Retry-After of one second stands out.
CHAT_DELIVERY: dict[str, Any] = {
    "retry-initial": "0.2s",
    "retry-max": "0.5s",
    "give-up-after": "1h",
    "timeout": "5s",
}

#: The parts of $SLACK_URL that are secret: its password and its path.
PASSWORD = "pa55w0rd-x9q"
SECRET_PATH = "s3cretpath-7f3a9c"
SECRETS = (PASSWORD, SECRET_PATH)

VERBS = {
    "BREAKS": "is broken",
    "FAILS": "failed",
    "FIXED": "is fixed",
    "PASSES": "passed",
    "CANCELLED": "is cancelled",
}
ALL_EVENTS = list(VERBS)


# -- set-up ----------------------------------------------------------------------------------


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    """Slack's Web API on loopback, accepting TOKEN."""
    with FakeSlack(TOKEN) as server:
        yield server


@pytest.fixture
def hook() -> Iterator[HookReceiver]:
    """A webhook for Apprise's json:// notifications."""
    with HookReceiver() as receiver:
        yield receiver


@pytest.fixture
def secret_url(hook: HookReceiver, monkeypatch: pytest.MonkeyPatch) -> str:
    """$SLACK_URL: a json:// URL to ``hook`` with a password and a secret path."""
    url = hook.json_url(f"/{SECRET_PATH}/hook", user="bot", password=PASSWORD)
    monkeypatch.setenv("SLACK_URL", url)
    return url


def rule(*actions: str, events: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A gocd rule for any pipeline: these actions, on these events (default: all)."""
    return {
        "actions": list(actions),
        "filter": {"function": "pipelines.any", "events": events or ALL_EVENTS},
        **extra,
    }


def write(
    tmp_path: Path,
    upstream: CaptureServer,
    *rules: dict[str, Any],
    slack: FakeSlack | None = None,
    token: str = TOKEN,
) -> Path:
    """A configuration: one gocd manager (no GoCD needed) with ``rules``, chat retried fast."""
    document: dict[str, Any] = {
        "local-smtp": "127.0.0.1:0",
        "remote-smtp": f"127.0.0.1:{upstream.port}",
        "data-dir": str(tmp_path / "data"),
        "delivery": CHAT_DELIVERY,
        "http": "127.0.0.1:0",
    }
    if slack is not None:
        document.update({"slack-token": token, "slack-api-url": slack.api_url})
    document["managers"] = [
        {"name": "gocd", "messages-we-want": {"to": GOCD_TO}, "rules": list(rules)}
    ]
    path = tmp_path / "configuration.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def stage_mail(
    subject: str = "Stage [my-pipeline/6/my-stage/1] is broken", message_id: str | None = None
) -> bytes:
    """GoCD's stage mail, with its own Message-ID when given."""
    return gocd_stage_mail(subject, to=GOCD_TO, message_id=message_id)


def submit(
    port: int, subject: str = "Stage [my-pipeline/6/my-stage/1] is broken", **kw: Any
) -> str:
    """Send one stage mail to mail2alert; its queue id."""
    return send(port, stage_mail(subject, **kw), rcpt_tos=[GOCD_TO]).queue_id


def settled(outbox: OutboxView, queue_id: str, count: int) -> list[dict[str, Any]]:
    """Wait until the ``count`` items of ``queue_id`` are done or dead; return them."""

    def finished() -> list[dict[str, Any]] | None:
        rows = outbox.items(queue_id)
        done = len(rows) == count and all(r["state"] != "pending" for r in rows)
        return rows if done else None

    return wait_until(finished, what=f"{count} items of {queue_id} to settle")


def chat_items(outbox: OutboxView, queue_id: str) -> list[dict[str, Any]]:
    """The chat items of one message."""
    return [r for r in outbox.items(queue_id) if r["kind"] == "chat"]


def mailcli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``mail2alert ARGS``; (exit code, stdout, stderr).

    cli.main() reconfigures logging (the root logger's handlers, Apprise's propagation);
    that is undone at once, so the service threads of a test keep logging to caplog.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    propagate = logging.getLogger("apprise").propagate
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("apprise").propagate = propagate
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- mail and chat at once -------------------------------------------------------------------


def test_the_mail_goes_only_to_the_mailto_recipients_and_each_chat_destination_gets_one_post(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack, hook: HookReceiver
) -> None:
    path = write(
        tmp_path,
        upstream,
        rule("mailto:cat@example.com", "mailto:dog@example.com", hook.url, "slack:#builds"),
        slack=slack,
    )
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        queue_id = submit(service.port)
        items = settled(outbox, queue_id, 3)

    (mail,) = upstream.messages
    assert mail.rcpt_tos == ("cat@example.com", "dog@example.com")
    assert field_value(mail.data, "To") == "cat@example.com, dog@example.com"
    assert [i["kind"] for i in items] == ["smtp", "chat", "chat"]
    assert [i["state"] for i in items] == ["done", "done", "done"]
    assert len(hook.calls) == 1
    assert [c.body["channel"] for c in slack.calls] == ["#builds"]


def test_a_chat_destination_that_is_down_gets_its_post_exactly_once_when_it_is_back(
    tmp_path: Path, upstream: CaptureServer, hook: HookReceiver
) -> None:
    hook.fail_until_recovered(500)
    path = write(tmp_path, upstream, rule("mailto:cat@example.com", hook.url))
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        queue_id = submit(service.port)
        # The mail does not wait for the chat destination: it is upstream while the hook fails.
        upstream.wait_for(1)
        hook.wait_for(2)
        assert hook.succeeded == []
        hook.recover()
        hook.wait_for(1, ok=True)
        (chat,) = settled(outbox, queue_id, 2)[1:]
        Relay(service, upstream, outbox).sentinel()

    assert chat["state"] == "done"
    assert len(hook.succeeded) == 1
    assert [m.rcpt_tos for m in upstream.messages] == [("cat@example.com",), ("s@sentinel.test",)]


def test_one_failing_chat_destination_does_not_delay_or_repeat_another(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack, hook: HookReceiver
) -> None:
    hook.fail_until_recovered(500)
    path = write(tmp_path, upstream, rule(hook.url, "slack:#builds"), slack=slack)
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        queue_id = submit(service.port)
        slack.wait_for(1, ok=True)
        hook.wait_for(3)  # the hook failed and was retried twice more
        hook.recover()
        settled(outbox, queue_id, 2)

    assert len(slack.calls) == 1
    assert len(hook.succeeded) == 1


# -- Slack's answers -------------------------------------------------------------------------


def test_slacks_retry_after_is_honoured_when_it_rate_limits(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    slack.fail(1, status=429, retry_after=1)
    path = write(tmp_path, upstream, rule("slack:#builds"), slack=slack)
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        queue_id = submit(service.port)
        (item,) = settled(outbox, queue_id, 1)

    limited, posted = slack.calls
    assert (limited.status, posted.status) == (429, 200)
    # Without Retry-After the next try would come after retry-initial, 0.2 s.
    assert posted.at - limited.at >= 0.95
    assert item["next_try"] == pytest.approx(limited.at + 1, abs=0.5)
    assert (item["state"], item["attempts"]) == ("done", 2)


def test_a_slack_answering_500_is_retried_until_it_takes_the_post(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    slack.fail(2, status=500)
    path = write(tmp_path, upstream, rule("slack:#builds"), slack=slack)
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        queue_id = submit(service.port)
        (item,) = settled(outbox, queue_id, 1)

    assert [c.status for c in slack.calls] == [500, 500, 200]
    assert slack.calls[0].body == slack.calls[2].body
    assert (item["state"], item["attempts"]) == ("done", 3)


def test_a_slack_api_that_answers_without_end_is_let_go_at_the_limit_and_retried(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with EndlessAnswer() as endless:
        slack = SimpleNamespace(api_url=endless.url)  # slack-api-url points at it
        path = write(tmp_path, upstream, rule("slack:#builds"), slack=slack)  # type: ignore[arg-type]
        outbox = OutboxView(tmp_path / "data")
        with running(path) as service:
            queue_id = submit(service.port)
            item = outbox.wait_attempted(queue_id)
        assert endless.done.wait(15), "the client hung up"

    assert item["state"] == "pending"
    assert item["last_error"] == (
        f"Slack Web API at {endless.url}: answered with more than 1,048,576 bytes;"
        " the rest was not read"
    )
    # What was sent beyond 1 MiB sat in the sockets' buffers: far from the 512 MiB on offer.
    assert endless.sent < 48 * 1024 * 1024


def test_a_wrong_slack_token_makes_the_post_dead_at_once_with_slacks_reason(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    path = write(tmp_path, upstream, rule("slack:#builds"), slack=slack, token="xoxb-revoked")
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        queue_id = submit(service.port)
        item = outbox.wait_state(queue_id, "dead")

    assert item["last_error"] == "Slack: invalid_auth"
    assert item["attempts"] == 1
    assert len(slack.calls) == 1


# -- what a chat message says ----------------------------------------------------------------


def test_the_default_message_names_event_pipeline_and_stage_and_links_to_gocd(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack, hook: HookReceiver
) -> None:
    path = write(tmp_path, upstream, rule("slack:#builds", hook.url), slack=slack)
    with running(path) as service:
        submit(service.port, "Stage [my-pipeline/6/my-stage/1] is broken")
        (post,) = slack.wait_for(1, ok=True)
        (hooked,) = hook.wait_for(1, ok=True)

    assert post.body["text"] == "BREAKS: my-pipeline/6 my-stage"
    (attachment,) = post.body["attachments"]
    assert attachment["title"] == "BREAKS: my-pipeline/6 my-stage"
    assert attachment["title_link"] == DETAILS
    assert attachment["text"].startswith(f"Stage my-pipeline/6/my-stage/1 is broken\n{DETAILS}")
    assert hooked.body["title"] == "BREAKS: my-pipeline/6 my-stage"
    assert DETAILS in hooked.body["message"]
    assert hooked.body["type"] == "failure"


def test_the_colour_of_a_message_follows_the_event(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    path = write(tmp_path, upstream, rule("slack:#builds"), slack=slack)
    with running(path) as service:
        for event, verb in VERBS.items():
            submit(service.port, f"Stage [p-{event.lower()}/1/build/1] {verb}")
        posts = slack.wait_for(len(VERBS), ok=True)

    colours = {p.body["text"].split(":")[0]: p.body["attachments"][0]["color"] for p in posts}
    red, green, amber = "#d50200", "#2eb886", "#daa038"
    assert colours == {
        "BREAKS": red,
        "FAILS": red,
        "FIXED": green,
        "PASSES": green,
        "CANCELLED": amber,
    }


def test_a_brief_message_leaves_out_the_changes_that_a_full_one_shows(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    path = write(tmp_path, upstream, rule("slack:#brief:brief", "slack:#full:full"), slack=slack)
    with running(path) as service:
        submit(service.port)
        posts = {p.body["channel"]: p.body for p in slack.wait_for(2, ok=True)}

    brief = posts["#brief"]["attachments"][0]["text"]
    full = posts["#full"]["attachments"][0]["text"]
    assert brief == f"Stage my-pipeline/6/my-stage/1 is broken\n{DETAILS}"
    assert full.startswith(brief + "\n\n")
    assert "Fix flaky test in payment module" in full


def test_a_rules_style_brief_applies_to_its_chat_urls(
    tmp_path: Path, upstream: CaptureServer, hook: HookReceiver
) -> None:
    path = write(tmp_path, upstream, rule(hook.url, style="brief"))
    with running(path) as service:
        submit(service.port)
        (hooked,) = hook.wait_for(1, ok=True)

    assert hooked.body["message"] == f"Stage my-pipeline/6/my-stage/1 is broken\n{DETAILS}"


def test_a_rules_own_template_renders_the_facts_of_the_mail(
    tmp_path: Path, upstream: CaptureServer, hook: HookReceiver
) -> None:
    template = {
        "title": "{{ pipeline }} #{{ pipeline_counter }} {{ word }}",
        "body": "{{ event }} (GoCD: {{ gocd_event }}) in {{ stage }} run {{ stage_counter }}"
        " from {{ sender }}: {{ details_url }}",
    }
    path = write(tmp_path, upstream, rule(hook.url, template=template))
    with running(path) as service:
        submit(service.port)
        (hooked,) = hook.wait_for(1, ok=True)

    assert hooked.body["title"] == "my-pipeline #6 is broken"
    assert hooked.body["message"] == (
        f"BREAKS (GoCD: BREAKS) in my-stage run 1 from go@example.com: {DETAILS}"
    )


def test_a_template_given_as_text_is_the_body_under_the_default_title(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    path = write(tmp_path, upstream, rule("slack:#builds", template="{{ subject }}"), slack=slack)
    with running(path) as service:
        submit(service.port)
        (post,) = slack.wait_for(1, ok=True)

    assert post.body["text"] == "BREAKS: my-pipeline/6 my-stage"
    assert post.body["attachments"][0]["text"] == "Stage [my-pipeline/6/my-stage/1] is broken"


# -- threads ---------------------------------------------------------------------------------


def test_the_fixed_mail_answers_the_breaks_mail_and_its_slack_post_replies_in_the_thread(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    path = write(
        tmp_path,
        upstream,
        rule("mailto:cat@example.com", "slack:#builds", events=["BREAKS", "FIXED"]),
        slack=slack,
    )
    with running(path) as service:
        submit(service.port, message_id="<breaks-1@ci.example.com>")
        upstream.wait_for(1)
        slack.wait_for(1, ok=True)
        submit(
            service.port,
            "Stage [my-pipeline/7/my-stage/1] is fixed",
            message_id="<fixed-1@ci.example.com>",
        )
        broken, fixed = upstream.wait_for(2)
        first, reply = slack.wait_for(2, ok=True)

    breaks_id = field_value(broken.data, "Message-ID")
    assert breaks_id == "<breaks-1@ci.example.com>"
    assert field_value(fixed.data, "In-Reply-To") == breaks_id
    assert field_value(fixed.data, "References") == breaks_id
    assert "thread_ts" not in first.body
    assert reply.body["thread_ts"] == first.answer["ts"]
    assert reply.body["channel"] == first.answer["channel"]


def test_the_breaks_thread_is_kept_in_the_data_dir_across_a_restart(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    path = write(tmp_path, upstream, rule("slack:#builds", events=["BREAKS", "FIXED"]), slack=slack)
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        settled(outbox, submit(service.port), 1)
    with running(path) as service:
        submit(service.port, "Stage [my-pipeline/7/my-stage/1] is fixed")
        first, reply = slack.wait_for(2, ok=True)

    assert reply.body["thread_ts"] == first.answer["ts"]


# -- secrets ---------------------------------------------------------------------------------


def test_a_chat_url_from_the_environment_never_appears_in_the_log(
    tmp_path: Path,
    upstream: CaptureServer,
    hook: HookReceiver,
    secret_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hook.fail(1)
    path = write(tmp_path, upstream, rule("$SLACK_URL"))
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="mail2alert")
    with running(path) as service:
        queue_id = submit(service.port)
        settled(OutboxView(tmp_path / "data"), queue_id, 1)

    assert f"{queue_id}: deferred" in caplog.text
    assert f"{queue_id}: delivered to json://bot:****@127.0.0.1:{hook.port}/***" in caplog.text
    for secret in SECRETS:
        assert secret not in caplog.text


def test_at_debug_level_the_served_log_keeps_a_chat_url_out_of_urllib3s_request_lines(
    tmp_path: Path, upstream: CaptureServer, hook: HookReceiver, secret_url: str
) -> None:
    """urllib3 logs each request line (path included) at DEBUG; mail2alert keeps it out."""
    path = write(tmp_path, upstream, rule("$SLACK_URL"))
    port = free_port()
    path.write_text(path.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}", 1))
    process = ServeProcess(path, port, tmp_path / "serve.log")
    process.proc_args = ["--log-level", "DEBUG"]
    process.start()
    try:
        queue_id = submit(port)
        hook.wait_for(1, ok=True)
        settled(OutboxView(tmp_path / "data"), queue_id, 1)
    finally:
        process.terminate()

    assert f"{queue_id}: delivered to json://bot:****@127.0.0.1:{hook.port}/***" in process.log
    for secret in SECRETS:
        assert secret not in process.log


def test_route_shows_each_chat_message_as_it_would_be_posted(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, upstream, rule("slack:#builds:brief"), slack=slack)
    eml = tmp_path / "broken.eml"
    eml.write_bytes(stage_mail())

    code, out, err = mailcli(capsys, "route", "--config", str(path), str(eml))

    assert code == 0, err
    chat = out[out.index("chat:") :].splitlines()
    assert chat == [
        "chat:     slack:#builds:brief (#d50200)",
        "          BREAKS: my-pipeline/6 my-stage",
        "          | Stage my-pipeline/6/my-stage/1 is broken",
        f"          | {DETAILS}",
    ]
    assert slack.calls == []


def test_route_json_shows_the_chat_message_without_the_secrets_of_its_url(
    tmp_path: Path,
    upstream: CaptureServer,
    hook: HookReceiver,
    secret_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path, upstream, rule("mailto:cat@example.com", "$SLACK_URL"))
    code, out, err = mailcli(
        capsys,
        "route",
        "--config",
        str(path),
        "--json",
        "--from",
        "go@example.com",
        "--to",
        GOCD_TO,
        "--subject",
        "Stage [my-pipeline/6/my-stage/1] is broken",
    )

    assert code == 0, err
    shown = f"json://bot:****@127.0.0.1:{hook.port}/***"
    result = json.loads(out)
    assert result["actions"] == ["mailto:cat@example.com", shown]
    (post,) = result["chat"]
    assert (post["action"], post["title"], post["colour"]) == (
        shown,
        "BREAKS: my-pipeline/6 my-stage",
        "#d50200",
    )
    for secret in SECRETS:
        assert secret not in out + err


def test_the_queue_command_shows_a_pending_chat_post_without_the_secrets_of_its_url(
    tmp_path: Path,
    upstream: CaptureServer,
    hook: HookReceiver,
    secret_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hook.fail_until_recovered(500)
    path = write(tmp_path, upstream, rule("$SLACK_URL"))
    outbox = OutboxView(tmp_path / "data")
    with running(path) as service:
        queue_id = submit(service.port)
        outbox.wait_attempted(queue_id)
        outputs = [
            mailcli(capsys, "queue", "--config", str(path), *args)
            for args in (
                ["list"],
                ["list", "--json"],
                ["show", queue_id],
                ["show", queue_id, "--json"],
            )
        ]

    assert [code for code, _, _ in outputs] == [0, 0, 0, 0]
    text = "".join(out + err for _, out, err in outputs)
    assert f"json://bot:****@127.0.0.1:{hook.port}/***" in text
    assert "500" in text
    for secret in SECRETS:
        assert secret not in text


# -- configuration ---------------------------------------------------------------------------


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], rules: str) -> tuple[Path, int, str]:
    """Run ``mail2alert check`` on a gocd manager with ``rules`` (YAML from line 6 on)."""
    path = tmp_path / "configuration.yml"
    head = (
        "remote-smtp: localhost:8025\n"
        "managers:\n"
        "  - name: gocd\n"
        "    messages-we-want: {to: mail2alert@example.com}\n"
        "    rules:\n"
    )
    path.write_text(head + textwrap.indent(textwrap.dedent(rules), "      "), encoding="utf-8")
    code, _, err = mailcli(capsys, "check", "--config", str(path))
    return path, code, err


def test_check_reports_a_chat_url_of_an_unknown_scheme_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, code, err = check(
        tmp_path,
        capsys,
        """\
          - filter: {function: pipelines.any}
            actions:
              - nochat://host/x
        """,
    )

    assert code == 1
    assert err.splitlines() == [
        f"{path}:8: managers[0].rules[0].actions[0]: unknown notification scheme 'nochat://'"
        " (see Apprise's list of services)",
        f"{path}: invalid, 1 problem",
    ]


def test_check_reports_a_malformed_chat_url_with_its_line_and_without_its_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, code, err = check(
        tmp_path,
        capsys,
        f"""\
          - filter: {{function: pipelines.any}}
            actions:
              - json://bot:{PASSWORD}@host:notaport/{SECRET_PATH}
        """,
    )

    assert code == 1
    assert err.splitlines() == [
        f"{path}:8: managers[0].rules[0].actions[0]: 'json://***' is not a valid json:// URL",
        f"{path}: invalid, 1 problem",
    ]


def test_check_reports_a_template_that_cannot_render_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, code, err = check(
        tmp_path,
        capsys,
        """\
          - filter: {function: pipelines.any}
            actions: [json://localhost:8080/hook]
            template:
              title: "{{ pipeline }}"
              body: "{% if pipeline %}unclosed"
        """,
    )

    assert code == 1
    assert err.splitlines() == [
        f"{path}:9: managers[0].rules[0].template: template error (template line 1):"
        " Unexpected end of template. Jinja was looking for the following tags: 'elif' or"
        " 'else' or 'endif'. The innermost block that needs to be closed is 'if'.",
        f"{path}: invalid, 1 problem",
    ]


def test_check_reports_a_template_naming_an_unknown_fact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, code, err = check(
        tmp_path,
        capsys,
        """\
          - filter: {function: pipelines.any}
            actions: [json://localhost:8080/hook]
            template: "{{ pipline }} broke"
        """,
    )

    assert code == 1
    assert err.splitlines() == [
        f"{path}:8: managers[0].rules[0].template: template error: 'pipline' is undefined",
        f"{path}: invalid, 1 problem",
    ]


def test_check_reports_a_slack_channel_action_without_a_slack_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, code, err = check(
        tmp_path,
        capsys,
        """\
          - filter: {function: pipelines.any}
            actions:
              - mailto:cat@example.com
              - slack:#builds:brief
        """,
    )

    assert code == 1
    assert err.splitlines() == [
        f"{path}:9: managers[0].rules[0].actions[1]: slack: actions post with the top-level"
        " 'slack-token'; set it",
        f"{path}: invalid, 1 problem",
    ]


# -- send-test -------------------------------------------------------------------------------


def test_send_test_posts_one_labelled_notification_to_a_chat_url(
    tmp_path: Path, upstream: CaptureServer, hook: HookReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, upstream, rule("mailto:cat@example.com"))

    code, out, err = mailcli(capsys, "send-test", hook.url, "--config", str(path))

    assert (code, out, err) == (0, f"sent: json://127.0.0.1:{hook.port}/***\n", "")
    (posted,) = hook.calls
    assert posted.body["title"] == "[mail2alert test] BREAKS: my-pipeline/6 my-stage"


def test_send_test_posts_to_a_slack_channel_through_the_web_api(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, upstream, rule("slack:#builds"), slack=slack)

    code, out, err = mailcli(capsys, "send-test", "slack:#ops", "--config", str(path))

    assert (code, out, err) == (0, "sent: slack:#ops\n", "")
    (posted,) = slack.calls
    assert posted.body["channel"] == "#ops"
    assert posted.body["text"].startswith("[mail2alert test] ")


def test_send_test_to_a_rule_sends_to_each_of_its_actions(
    tmp_path: Path, upstream: CaptureServer, hook: HookReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, upstream, rule("mailto:cat@example.com", hook.url))

    code, out, err = mailcli(capsys, "send-test", "gocd#0:1", "--config", str(path))

    assert code == 0, err
    assert out.splitlines() == [
        f"sent: mailto:cat@example.com via 127.0.0.1:{upstream.port}",
        f"sent: json://127.0.0.1:{hook.port}/***",
    ]
    (mail,) = upstream.messages
    assert mail.rcpt_tos == ("cat@example.com",)
    assert field_value(mail.data, "Subject").startswith("[mail2alert test]")
    assert len(hook.calls) == 1


def test_send_test_that_fails_exits_1_with_the_reason_and_without_the_secrets(
    tmp_path: Path,
    upstream: CaptureServer,
    hook: HookReceiver,
    secret_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hook.fail_until_recovered(500)
    path = write(tmp_path, upstream, rule("$SLACK_URL"))

    code, out, err = mailcli(capsys, "send-test", "managers[0].rules[0]", "--config", str(path))

    assert code == 1
    assert out == ""
    assert err.startswith(f"FAILED: json://bot:****@127.0.0.1:{hook.port}/***: ")
    assert "500" in err
    for secret in SECRETS:
        assert secret not in err


# -- what a post must survive ----------------------------------------------------------------------


def test_a_template_that_fails_on_a_real_alert_posts_the_default_text_and_loses_nothing(
    tmp_path: Path, upstream: CaptureServer, slack: FakeSlack
) -> None:
    """The check at load renders samples; a real alert may take a branch they did not (a
    committer with no address: a Mercurial change). The mail is taken all the same, its
    mailto: recipient gets it, and the post goes out with the default text."""
    template = {
        "title": "{{ event }} {{ pipeline }}"
        "{% if committers %} ({{ committers[0].address.split('@')[1] }}){% endif %}"
    }
    body = (
        "See details: https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1\n\n"
        "-- CHANGES --\n\nHg: https://hg.example.com/app\n"
        "revision: 1f5557f8a1c3, modified by bob on 2024-03-15\n"
        "Fix flaky test\n\nSent by Go on behalf of ci-robot\n"
    )
    path = write(
        tmp_path,
        upstream,
        rule("mailto:team@example.com", "slack:#builds", template=template),
        slack=slack,
    )
    with running(path) as service:
        reply = send(service.port, gocd_stage_mail(to=GOCD_TO, body=body), rcpt_tos=[GOCD_TO])
        (mail,) = upstream.wait_for(1)
        (posted,) = slack.wait_for(1)
    assert reply.code == 250
    assert mail.rcpt_tos == ("team@example.com",)
    assert "my-pipeline" in json.dumps(posted.body)


async def _nothing(*args: Any) -> None:
    return None


def post_to(api_url: str, store: ThreadStore, *, thread: str | None = None) -> Attempt:
    """Send one BREAKS post for ``slack:#builds`` through a ChatSender to the Slack API at
    ``api_url``; what the sender made of Slack's answer."""

    async def scenario() -> Attempt:
        action = action_id("slack:#builds")
        settings = ChatSettings({action: "slack:#builds"}, Secret(TOKEN), api_url, 5.0)
        sender = ChatSender(settings, store)
        post = ChatPost(
            "slack:#builds",
            "BREAKS: p",
            "body",
            "#d50200",
            event="BREAKS",
            thread_key=("p", "s") if thread else None,
            thread=thread,
        )
        item = Item(1, "Q1", "chat", "", post.to_json().encode(), 0, 0.0, (action,))
        try:
            return await sender.send(item)
        finally:
            await sender.close()

    return asyncio.run(scenario())


def test_a_post_slack_took_is_not_sent_again_when_its_thread_cannot_be_kept(
    slack: FakeSlack,
) -> None:
    """Slack answered ok; keeping the thread's ts then failed (a full disk): the post is
    done, not retried (which would post it twice)."""

    async def fail(*args: Any) -> None:
        raise OutboxFull("cannot write to the outbox: database or disk is full")

    attempt = post_to(slack.api_url, ThreadStore(_nothing, fail, _nothing), thread="start")
    assert [r.state for r in attempt.recipients] == ["done"]
    assert len(slack.succeeded) == 1


@pytest.mark.parametrize("error", ["token_expired", "access_denied", "not_allowed_token_type"])
def test_a_slack_error_no_retry_cures_is_permanent(error: str) -> None:
    class Refusing(FakeSlack):
        def _answer(self, path: str, call_headers: dict[str, str], body: Any) -> tuple[int, Any]:
            return 200, {"ok": False, "error": error}

    with Refusing(TOKEN) as refusing:
        attempt = post_to(refusing.api_url, ThreadStore(_nothing, _nothing, _nothing))
    assert attempt.permanent
    assert attempt.error == f"Slack: {error}"


@pytest.mark.parametrize(
    ("said", "taken"),
    [
        ("30", 30.0),
        ("0", 1.0),
        ("1e9", 3600.0),
        ("inf", 3600.0),
        ("nan", 30.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30.0),
        (None, 1.0),
    ],
)
def test_retry_after_is_taken_in_seconds_within_an_hour(said: str | None, taken: float) -> None:
    """A proxy may say anything: a retry is never put off for more than an hour."""
    assert retry_after_seconds(said) == taken


def test_a_template_that_raises_a_python_error_is_a_problem_at_its_line() -> None:
    assert check_template(ChatTemplate(title="{{ '%s #%s'|format(pipeline) }}")) == (
        "template error: TypeError: not enough arguments for format string"
    )
