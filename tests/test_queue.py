"""``mail2alert queue``: the operator's view of the outbox, and retry/delete, while it runs.

mail2alert runs for real (in a thread, or as a process); the capture server plays
``remote-smtp`` and is stopped or told to refuse, so items are really pending or dead. The
command is run through :func:`mail2alert.cli.main`, as the operator's shell would.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert import cli
from mail2alert.gocd.testing import FakeGoCD
from mail2alert.postqueue import data_lines, duration, next_try
from mail2alert.testing import CaptureServer, free_port
from tests.helpers import (
    FAST_DELIVERY,
    Relay,
    ServeProcess,
    compose,
    example_managers,
    relay,
    send,
    wait_until,
    write_config,
)

#: Retries far apart: an item stays pending until the test retries it.
SLOW_RETRY = {**FAST_DELIVERY, "retry-initial": "10m", "retry-max": "1h"}


def queue(config_path: Path | None, *args: str) -> int:
    """Run ``mail2alert queue [--config <path>] ...``; return its exit code.

    cli.main() reconfigures the root logger (basicConfig force=True) to write to the
    captured stderr; that is undone at once, not in a fixture's teardown, because the
    service threads of these tests still log while they stop, after capsys has closed.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        where = [] if config_path is None else ["--config", str(config_path)]
        return cli.main(["queue", *where, *args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def output(capsys: pytest.CaptureFixture[str], config_path: Path, *args: str) -> str:
    """Run ``mail2alert queue ...``; its stdout, asserting exit code 0."""
    capsys.readouterr()
    code = queue(config_path, *args)
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def line_of(out: str, queue_id: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(queue_id)]
    return line


def relayed(subject: str = "weekly report") -> bytes:
    """A message the example's mail manager does not want: relayed as it is."""
    return compose(sender="Someone <someone@example.net>", subject=subject)


def submit(mail2alert: Relay, subject: str = "weekly report", **envelope: Any) -> str:
    reply = mail2alert.send(relayed(subject), mail_from="someone@example.net", **envelope)
    return reply.queue_id


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """Where :func:`tests.helpers.relay` writes the configuration."""
    return tmp_path / "configuration.yml"


@pytest.fixture
def down(tmp_path: Path, upstream: CaptureServer) -> Iterator[Relay]:
    """mail2alert whose upstream is down, retrying only every 10 minutes."""
    upstream.stop()
    with relay(tmp_path, upstream, example_managers("mail"), delivery=SLOW_RETRY) as mail2alert:
        yield mail2alert


@pytest.fixture
def refusing(tmp_path: Path, upstream: CaptureServer) -> Iterator[Relay]:
    """mail2alert whose upstream refuses the next message with 550."""
    upstream.refuse_data("550 5.7.1 no")
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        yield mail2alert


# -- list ------------------------------------------------------------------------------------


def test_list_shows_a_pending_item_with_attempts_next_try_recipients_sender_and_error(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    queue_id = submit(down)
    down.outbox.wait_attempted(queue_id)

    out = output(capsys, config_path, "list")

    line = line_of(out, queue_id)
    assert re.match(
        # Waiting for the destination spends none of the item's own attempts.
        rf"{queue_id}\s+pending\s+\d+s\s+0\s+in \d+m\s+admin@example\.com\s+someone@example\.net"
        r"\s+cannot connect",
        line,
    )


def test_list_shows_a_refused_item_as_dead_with_no_next_try_and_the_server_answer(
    capsys: pytest.CaptureFixture[str], config_path: Path, refusing: Relay
) -> None:
    queue_id = submit(refusing)
    refusing.outbox.wait_state(queue_id, "dead")

    out = output(capsys, config_path)

    line = line_of(out, queue_id)
    assert re.fullmatch(
        rf"{queue_id}\s+dead\s+\d+s\s+1\s+—\s+admin@example\.com\s+someone@example\.net"
        r"\s+550 5\.7\.1 no",
        line,
    )
    assert out.splitlines()[-1] == "0 pending, 1 dead, 0 held"


def test_list_leaves_out_delivered_mail(
    capsys: pytest.CaptureFixture[str], config_path: Path, tmp_path: Path, upstream: CaptureServer
) -> None:
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        queue_id = submit(mail2alert)
        mail2alert.outbox.wait_state(queue_id, "done")

        out = output(capsys, config_path, "list")

    assert out == "0 pending, 0 dead, 0 held\n"


def test_list_puts_the_oldest_first_and_ends_with_a_count_per_state(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    first, second = submit(down, "first"), submit(down, "second")
    down.outbox.wait_attempted(second)

    lines = output(capsys, config_path).splitlines()

    assert lines[0].split()[:3] == ["QUEUE", "ID", "STATE"]
    assert [line.split()[0] for line in lines[1:-1]] == [first, second]
    assert lines[-1] == "2 pending, 0 dead, 0 held"


def test_list_shows_mail_held_for_gocd_data_as_held(
    capsys: pytest.CaptureFixture[str], config_path: Path, tmp_path: Path, upstream: CaptureServer
) -> None:
    gocd = FakeGoCD({"my-group": ["my-pipeline"]})  # never started: GoCD is down
    manager = {**example_managers("gocd")[0], "url": gocd.url, "poll-interval": 0.2}
    with relay(tmp_path, upstream, [manager]) as mail2alert:
        subject = "Stage [my-pipeline/6/my-stage/1] is broken"
        queue_id = mail2alert.send(
            compose(subject=subject, to="mail2alert@example.com"),
            rcpt_tos=["mail2alert@example.com"],
        ).queue_id
        wait_until(lambda: (mail2alert.outbox.message(queue_id) or {}).get("outcome") == "hold")

        out = output(capsys, config_path)

    assert line_of(out, queue_id).split()[1:5] == ["held", "0s", "0", "—"]
    assert "mail2alert@example.com" in line_of(out, queue_id)
    assert out.splitlines()[-1] == "0 pending, 0 dead, 1 held"


def test_list_json_has_one_object_per_item_with_the_whole_error(
    capsys: pytest.CaptureFixture[str], config_path: Path, refusing: Relay
) -> None:
    queue_id = submit(refusing)
    refusing.outbox.wait_state(queue_id, "dead")

    (entry,) = json.loads(output(capsys, config_path, "list", "--json"))

    assert entry["queue_id"] == queue_id
    assert entry["state"] == "dead"
    assert entry["attempts"] == 1
    assert entry["next_try"] is None
    assert entry["recipients"] == ["admin@example.com"]
    assert entry["sender"] == "someone@example.net"
    assert entry["last_error"] == refusing.outbox.item(queue_id)["last_error"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", entry["created"])


def test_list_works_against_mail2alert_running_as_its_own_process(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.stop()
    port = free_port()
    path = write_config(
        tmp_path / "configuration.yml",
        local=f"127.0.0.1:{port}",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=example_managers("mail"),
        delivery=SLOW_RETRY,
    )
    serve = ServeProcess(path, port, tmp_path / "serve.log").start()
    try:
        queue_ids = [
            send(port, relayed(f"report {n}"), mail_from="someone@example.net").queue_id
            for n in range(3)
        ]

        out = output(capsys, path, "list")
    finally:
        serve.terminate()

    assert [line.split()[0] for line in out.splitlines()[1:-1]] == queue_ids
    assert out.splitlines()[-1] == "3 pending, 0 dead, 0 held"


# -- show ------------------------------------------------------------------------------------


def test_show_prints_the_envelope_routing_items_recipients_and_headers(
    capsys: pytest.CaptureFixture[str], config_path: Path, refusing: Relay
) -> None:
    queue_id = submit(refusing, "nightly numbers")
    refusing.outbox.wait_state(queue_id, "dead")

    lines = output(capsys, config_path, "show", queue_id).splitlines()

    message = refusing.outbox.message(queue_id)
    assert message is not None
    assert lines[0] == f"queue id:  {queue_id}"
    assert re.fullmatch(
        r"received:  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} \(\d+s ago\)", lines[1]
    )
    assert lines[2:8] == [
        "from:      someone@example.net",
        "to:        admin@example.com",
        "subject:   nightly numbers",
        "manager:   —",
        "outcome:   relay",
        f"reason:    {message['reason']}",
    ]
    item = refusing.outbox.item(queue_id)
    assert lines[9] == f"item {item['id']} (smtp): dead, 1 attempt, next try —"
    assert lines[10] == "  sender:      someone@example.net"
    assert lines[11].startswith("  last error:  ")
    assert "550 5.7.1 no" in lines[11]
    assert lines[12:14] == [
        "  recipients:",
        "    admin@example.com  dead     " + item["last_error"],
    ]
    assert lines[14] == "  headers:"
    assert lines[15].startswith("    Received: from client.test")
    assert "    Subject: nightly numbers" in lines[16:]


def test_show_json_holds_the_message_its_items_and_their_recipients(
    capsys: pytest.CaptureFixture[str], config_path: Path, refusing: Relay
) -> None:
    queue_id = submit(refusing)
    refusing.outbox.wait_state(queue_id, "dead")

    shown = json.loads(output(capsys, config_path, "show", queue_id, "--json"))

    assert shown["queue_id"] == queue_id
    assert shown["outcome"] == "relay"
    (item,) = shown["items"]
    assert item["state"] == "dead"
    assert item["recipients"] == [
        {"rcpt": "admin@example.com", "state": "dead", "last_answer": item["last_error"]}
    ]
    assert "Subject: weekly report" in item["headers"]


def test_show_matches_the_queue_id_regardless_of_case(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    queue_id = submit(down)

    out = output(capsys, config_path, "show", queue_id.lower())

    assert out.startswith(f"queue id:  {queue_id}\n")


def test_show_does_not_pass_control_characters_from_a_mail_to_the_terminal(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    queue_id = submit(down, "\x1b[2J\x1b[31mred alert\x07")

    out = output(capsys, config_path, "show", queue_id)

    assert "\x1b" not in out
    assert "\x07" not in out
    assert "subject:   ?[2J?[31mred alert?" in out.splitlines()


def test_show_of_an_unknown_queue_id_exits_1_naming_it(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    code = queue(config_path, "show", "0000DEADBEEF")

    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert f"mail2alert: no message 0000DEADBEEF in the outbox {down.outbox.path}" in err


# -- retry -----------------------------------------------------------------------------------


def test_retry_of_a_dead_item_delivers_it_once_the_upstream_accepts_again(
    capsys: pytest.CaptureFixture[str], config_path: Path, refusing: Relay
) -> None:
    queue_id = submit(refusing)
    refusing.outbox.wait_state(queue_id, "dead")
    # The upstream's scripted 550 is used up: it accepts the next DATA.

    out = output(capsys, config_path, "retry", queue_id)

    assert out == f"{queue_id}: requeued 1 item (1 dead), due now; 1 recipient back to pending\n"
    (got,) = refusing.upstream.wait_for(1)
    assert got.rcpt_tos == ("admin@example.com",)
    item = refusing.outbox.wait_state(queue_id, "done")
    assert item["attempts"] == 2


def test_retry_all_makes_pending_items_due_now_instead_of_at_their_next_try(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    first, second = submit(down, "first"), submit(down, "second")
    down.outbox.wait_attempted(first)
    down.outbox.wait_attempted(second)
    down.upstream.start()

    out = output(capsys, config_path, "retry", "--all")

    assert out.splitlines() == [
        f"{first}: requeued 1 item (1 pending), due now",
        f"{second}: requeued 1 item (1 pending), due now",
    ]
    assert len(down.upstream.wait_for(2)) == 2


def test_retry_of_delivered_mail_does_nothing_and_says_so(
    capsys: pytest.CaptureFixture[str], config_path: Path, tmp_path: Path, upstream: CaptureServer
) -> None:
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        queue_id = submit(mail2alert)
        mail2alert.outbox.wait_state(queue_id, "done")

        out = output(capsys, config_path, "retry", queue_id)
        sentinel = mail2alert.sentinel()

    assert out == f"{queue_id}: nothing to retry\n"
    assert len(upstream.messages) == 2
    assert upstream.messages[-1] == sentinel


@pytest.mark.parametrize("args", [["retry"], ["retry", "--all", "0000DEADBEEF"]])
def test_retry_needs_either_queue_ids_or_all_else_exits_2(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay, args: list[str]
) -> None:
    code = queue(config_path, *args)

    assert code == 2
    assert "give queue ids or --all" in capsys.readouterr().err


# -- delete ----------------------------------------------------------------------------------


def test_delete_removes_a_pending_message_and_it_is_never_delivered(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    queue_id = submit(down)
    down.outbox.wait_attempted(queue_id)

    out = output(capsys, config_path, "delete", queue_id)
    down.upstream.start()
    output(capsys, config_path, "retry", "--all")
    sentinel = down.sentinel()

    assert out == f"{queue_id}: deleted 1 item (1 pending); 1 recipient will not get it\n"
    assert down.upstream.messages == [sentinel]
    assert down.outbox.message(queue_id) is None
    assert down.outbox.items(queue_id) == []
    assert down.outbox.recipients(queue_id) == {}


def test_delete_with_one_unknown_queue_id_deletes_nothing_and_exits_1(
    capsys: pytest.CaptureFixture[str], config_path: Path, down: Relay
) -> None:
    queue_id = submit(down)

    code = queue(config_path, "delete", queue_id, "0000DEADBEEF")

    assert code == 1
    assert "no message 0000DEADBEEF" in capsys.readouterr().err
    assert down.outbox.items(queue_id)[0]["state"] == "pending"


# -- the outbox itself -----------------------------------------------------------------------


def test_a_data_dir_without_an_outbox_is_an_error_and_none_is_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "nowhere"
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=free_port(),
        data_dir=data_dir,
        managers=example_managers("mail"),
    )

    code = queue(path, "list")

    assert code == 1
    assert f"mail2alert: no outbox in {data_dir}" in capsys.readouterr().err
    assert not data_dir.exists()


def test_the_configuration_is_found_through_the_environment_like_every_command(
    capsys: pytest.CaptureFixture[str],
    config_path: Path,
    down: Relay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue_id = submit(down)
    monkeypatch.setenv("MAIL2ALERT_CONFIGURATION", str(config_path))
    capsys.readouterr()

    code = queue(None)

    assert code == 0
    assert queue_id in capsys.readouterr().out


# -- formatting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.4, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (7200, "2h"), (86400 * 3.5, "3d")],
)
def test_ages_are_shown_in_the_largest_whole_unit(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


@pytest.mark.parametrize(
    ("when", "shown"), [(None, "—"), (999.0, "now"), (1000.0, "now"), (1044.2, "in 45s")]
)
def test_the_next_try_is_now_once_due_and_rounded_up_before(when: float | None, shown: str) -> None:
    assert next_try(when, 1000.0) == shown


def test_show_keeps_folded_header_lines_and_turns_their_tab_into_a_space() -> None:
    data = b"Subject: a long\r\n\tsubject\r\nTo: a@example.com\r\n\r\nbody\r\n"

    assert data_lines("smtp", data) == ("Subject: a long", " subject", "To: a@example.com")


def test_a_chat_items_data_is_shown_as_its_json_payload() -> None:
    data = b'{"action": "slack://***", "title": "my-pipeline is broken"}'

    assert data_lines("chat", data) == (
        "{",
        '  "action": "slack://***",',
        '  "title": "my-pipeline is broken"',
        "}",
    )
