"""``http:``: /metrics, /healthz and /readyz over real HTTP on loopback after real SMTP
traffic, the ``http`` key, a busy address, a reload that moves the listener, JSON logs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mail2alert import __version__, cli, config
from mail2alert.errors import ConfigError, StartupError
from mail2alert.gocd.testing import FakeGoCD
from mail2alert.logs import JsonFormatter
from mail2alert.settings import HostPort, Http
from mail2alert.testing import CaptureServer, free_port
from mail2alert.web import Monitoring
from tests.helpers import (
    ServeProcess,
    compose,
    example_managers,
    listening,
    relay,
    running,
    send,
    serve_command,
    wait_until,
    write_config,
)
from tests.test_e2e_faults import fill, small_disk  # noqa: F401 - small_disk is a fixture
from tests.test_metrics import samples

MINIMAL = "remote-smtp: localhost:8025\nmanagers: []\n"


def get(url: str) -> tuple[int, str, str]:
    """GET ``url``: status, Content-Type and body (a 503 is an answer, not an error)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def routed(subject: str = "Server Backup Completed Successfully") -> bytes:
    """A mail the example's mail manager wants (from go@example.com)."""
    return compose(subject=subject)


def served(
    tmp_path: Path, upstream: CaptureServer, port: int, *, workers: int, **keys: Any
) -> Path:
    """A configuration for ``serve`` with the example's mail manager on ``port`` and
    ``workers`` intake processes (other keys of :func:`write_config` in ``keys``)."""
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=example_managers("mail"),
        local=f"127.0.0.1:{port}",
        **keys,
    )
    path.write_text(path.read_text() + f"intake-workers: {workers}\n")
    return path


# -- the configuration key ----------------------------------------------------------------


def test_http_listens_on_localhost_9025_unless_the_file_says_otherwise() -> None:
    assert config.parse(MINIMAL, "c.yml", {}).http == Http(HostPort("localhost", 9025))
    assert config.parse(MINIMAL + "http: null\n", "c.yml", {}).http is None
    assert config.parse(MINIMAL + "http: 0.0.0.0:9100\n", "c.yml", {}).http == Http(
        HostPort("0.0.0.0", 9100)
    )
    mapping = config.parse(MINIMAL + "http:\n  address: '[::1]:9025'\n  admin: true\n", "c.yml", {})
    assert mapping.http == Http(HostPort("::1", 9025), admin=True)


def test_mistakes_in_http_are_reported_with_file_and_line(tmp_path: Path) -> None:
    text = MINIMAL + "http:\n  adress: localhost:9025\n  admin: maybe\n  users-file: nowhere\n"
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "c.yml", {})
    shown = [str(p) for p in caught.value.problems]
    assert shown[0] == "c.yml:4: http.adress: unknown key 'adress' (did you mean 'address'?)"
    assert any(s.startswith("c.yml:5: http.admin:") for s in shown), shown
    assert any(s.startswith("c.yml:6: http.users-file:") for s in shown), shown


# -- /metrics -----------------------------------------------------------------------------


def test_metrics_count_what_a_known_sequence_of_mail_did(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """3 routed, 1 relayed, 1 dropped; the first delivery fails once, then succeeds."""
    upstream.refuse_data("451 4.3.0 try again")
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        queue_ids = [mail2alert.send(routed()).queue_id for _ in range(3)]
        queue_ids.append(
            mail2alert.send(
                compose(sender="someone@example.net", subject="hello"),
                mail_from="someone@example.net",
            ).queue_id
        )
        dropped = mail2alert.send(routed("Nothing to see"))
        for queue_id in queue_ids:
            mail2alert.outbox.wait_state(queue_id, "done")
        status, content_type, text = get(mail2alert.service.http_url + "/metrics")
        source = Path(mail2alert.service.config.path).read_text(encoding="utf-8")
    assert dropped.code == 250
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    got = samples(text)
    manager = (("manager", "mail#0"),)
    assert got[("mail2alert_messages_total", (*manager, ("outcome", "deliver")))] == 3
    assert got[("mail2alert_messages_total", (("manager", ""), ("outcome", "relay")))] == 1
    assert got[("mail2alert_messages_total", (*manager, ("outcome", "drop")))] == 1
    assert got[("mail2alert_rule_matches_total", (*manager, ("rule", "0")))] == 3
    assert got[("mail2alert_deliveries_total", (("channel", "smtp"), ("result", "sent")))] == 4
    assert got[("mail2alert_deliveries_total", (("channel", "smtp"), ("result", "retry")))] == 1
    assert ("mail2alert_deliveries_total", (("channel", "smtp"), ("result", "dead"))) not in got
    assert got[("mail2alert_delivery_seconds_count", ())] == 4
    assert got[("mail2alert_delivery_seconds_bucket", (("le", "+Inf"),))] == 4
    assert got[("mail2alert_delivery_seconds_sum", ())] > 0
    for state in ("pending", "dead", "held"):
        assert got[("mail2alert_outbox_items", (("state", state),))] == 0
    assert got[("mail2alert_outbox_oldest_pending_seconds", ())] == 0
    assert got[("mail2alert_config_reloads_total", (("result", "ok"),))] == 0
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    assert got[("mail2alert_config_info", (("hash", digest),))] == 1
    assert got[("mail2alert_build_info", (("version", __version__),))] == 1


def test_mail_refused_for_good_counts_as_rejected(tmp_path: Path, upstream: CaptureServer) -> None:
    """A loop (554 5.4.6) and a message over max-message-size (552 5.3.4) are rejected."""
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[],
        local={"address": "127.0.0.1:0", "max-message-size": "20KiB"},
    )
    looping = compose(headers=[f"Received: from hop{n}.example.com" for n in range(31)])
    with running(path) as mail2alert:
        loop = send(mail2alert.port, looping)
        big = send(mail2alert.port, compose(body="x" * 30_000))
        wait_until(lambda: _rejected(mail2alert.http_url) == 2, what="both refusals counted")
    assert (loop.code, big.code) == (554, 552)


def _rejected(url: str) -> float | None:
    got = samples(get(url + "/metrics")[2])
    return got.get(("mail2alert_messages_total", (("manager", ""), ("outcome", "rejected"))))


def test_metrics_name_no_address_and_no_subject(tmp_path: Path, upstream: CaptureServer) -> None:
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        mail2alert.send(routed("Server backup secret-subject"))
        mail2alert.sentinel()
        _, _, text = get(mail2alert.service.http_url + "/metrics")
    assert "@" not in text
    assert "secret-subject" not in text


def test_the_counts_of_two_intake_processes_add_up_and_survive_a_restart(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    port, http = free_port(), free_port()
    path = served(tmp_path, upstream, port, workers=2, http=f"127.0.0.1:{http}")
    server = ServeProcess(path, port, tmp_path / "serve.log")
    try:
        server.start()
        # Each on a connection of its own: the kernel spreads them over both workers.
        for _ in range(6):
            assert send(port, routed()).code == 250
        first = wait_until(lambda: _delivered(http, 6), what="6 messages counted and delivered")
        assert server.terminate() == 0
        server.start()
        assert send(port, routed()).code == 250
        again = wait_until(lambda: _delivered(http, 7), what="7 messages counted")
        ready = get(f"http://127.0.0.1:{http}/readyz")
    finally:
        server.close()
    assert (
        first[("mail2alert_messages_total", (("manager", "mail#0"), ("outcome", "deliver")))] == 6
    )
    assert (
        again[("mail2alert_messages_total", (("manager", "mail#0"), ("outcome", "deliver")))] == 7
    )
    assert ready[0] == 200, ready
    assert "intake workers listen" in json.loads(ready[2])["checks"]["listening"]["detail"]


def _delivered(http: int, count: int) -> dict[Any, float] | None:
    got = samples(get(f"http://127.0.0.1:{http}/metrics")[2])
    sent = got.get(("mail2alert_deliveries_total", (("channel", "smtp"), ("result", "sent"))))
    return got if sent == count else None


# -- /healthz and /readyz -------------------------------------------------------------------


def test_healthz_and_readyz_answer_json_with_each_check(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with relay(tmp_path, upstream, []) as mail2alert:
        mail2alert.sentinel()
        health = get(mail2alert.service.http_url + "/healthz")
        ready = get(mail2alert.service.http_url + "/readyz")
    assert health == (200, "application/json; charset=utf-8", '{\n "status": "ok"\n}\n')
    status, content_type, body = ready
    assert (status, content_type) == (200, "application/json; charset=utf-8")
    answer = json.loads(body)
    assert answer["status"] == "ready"
    assert answer["failing"] == []
    checks = answer["checks"]
    assert set(checks) == {"listening", "config", "outbox"}
    assert checks["listening"] == {
        "ok": True,
        "detail": f"listening on 127.0.0.1:{mail2alert.port}",
    }
    assert checks["outbox"]["ok"] is True
    assert checks["config"]["ok"] is True


def test_readyz_is_503_naming_the_outbox_while_data_dir_is_full(
    tmp_path: Path,
    upstream: CaptureServer,
    small_disk: Path,  # noqa: F811 - the fixture imported above
) -> None:
    with relay(tmp_path, upstream, [], data_dir=small_disk) as mail2alert:
        filler = fill(small_disk)
        full = get(mail2alert.service.http_url + "/readyz")
        health = get(mail2alert.service.http_url + "/healthz")
        filler.unlink()
        again = get(mail2alert.service.http_url + "/readyz")
    status, _, body = full
    answer = json.loads(body)
    assert status == 503
    assert answer["status"] == "not ready"
    assert answer["failing"] == ["outbox"]
    assert "full" in answer["checks"]["outbox"]["detail"], answer
    assert health[0] == 200
    assert again[0] == 200, again


def test_readyz_is_503_while_data_dir_has_room_for_a_row_but_not_for_mail(
    tmp_path: Path,
    upstream: CaptureServer,
    small_disk: Path,  # noqa: F811 - the fixture imported above
) -> None:
    """A row still fits, but less than READY_FREE is left: no room for the next message."""
    with relay(tmp_path, upstream, [], data_dir=small_disk) as mail2alert:
        room = os.statvfs(small_disk)
        left = 64 * 1024
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (room.f_bavail * room.f_frsize - left))
        nearly = get(mail2alert.service.http_url + "/readyz")
        filler.unlink()
        again = get(mail2alert.service.http_url + "/readyz")
    status, _, body = nearly
    answer = json.loads(body)
    assert status == 503, answer
    assert answer["failing"] == ["outbox"]
    assert "KiB left" in answer["checks"]["outbox"]["detail"], answer
    assert again[0] == 200, again


def test_readyz_says_so_when_the_last_reload_failed_but_stays_ready(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        path = Path(mail2alert.service.config.path)
        path.write_text(path.read_text().replace("mail.in_subject", "mail.in_subjekt"))
        assert mail2alert.service.call(mail2alert.service.service.reload()) is False
        status, _, body = get(mail2alert.service.http_url + "/readyz")
        _, _, text = get(mail2alert.service.http_url + "/metrics")
    assert status == 200
    assert "the last reload failed" in json.loads(body)["checks"]["config"]["detail"]
    assert samples(text)[("mail2alert_config_reloads_total", (("result", "failed"),))] == 1


# -- the listener: start-up and reload ------------------------------------------------------


def test_a_busy_http_address_stops_serve_at_start_with_one_line(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        path = write_config(
            tmp_path / "configuration.yml",
            remote_port=upstream.port,
            data_dir=tmp_path / "data",
            managers=[],
            http=f"127.0.0.1:{busy}",
        )
        done = subprocess.run(
            serve_command(path), capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"mail2alert: http: cannot listen on 127.0.0.1:{busy}: Address already in use"
    ]


def test_a_reload_moves_the_listener_or_keeps_it_when_the_new_address_is_busy(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[],
    )
    with running(path) as mail2alert, socket.socket() as holder:
        old = mail2alert.http_url
        moved = free_port()
        path.write_text(path.read_text().replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{moved}"))
        assert mail2alert.call(mail2alert.service.reload()) is True
        new = mail2alert.http_url
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        path.write_text(path.read_text().replace(f"127.0.0.1:{moved}", f"127.0.0.1:{busy}"))
        assert mail2alert.call(mail2alert.service.reload()) is False
        still = get(new + "/healthz")
        path.write_text(path.read_text().replace(f"http: 127.0.0.1:{busy}", "http: null"))
        assert mail2alert.call(mail2alert.service.reload()) is True
        with pytest.raises(urllib.error.URLError):
            get(new + "/healthz")
        with pytest.raises(urllib.error.URLError):
            get(old + "/healthz")
    assert new == f"http://127.0.0.1:{moved}"
    assert still[0] == 200


# -- JSON logs ------------------------------------------------------------------------------


def test_json_logs_have_a_line_per_decision_and_per_delivery_with_the_queue_id(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    port = free_port()
    path = served(tmp_path, upstream, port, workers=1)
    server = ServeProcess(path, port, tmp_path / "serve.log")
    server.proc_args = ["--log-format", "json"]
    try:
        server.start()
        queue_id = send(port, routed()).queue_id
        upstream.wait_for(1)
        wait_until(lambda: '"result": "sent"' in server.log, what="the delivery's line")
        assert server.terminate() == 0
    finally:
        server.close()
    lines = [json.loads(line) for line in server.log.splitlines()]
    about = [line for line in lines if line.get("queue_id") == queue_id]
    assert [(a["event"], a.get("outcome"), a.get("result")) for a in about] == [
        ("decision", "deliver", None),
        ("delivery", None, "sent"),
    ]
    assert about[0]["logger"] == "mail2alert.server"
    assert about[0]["message"].startswith(f"{queue_id}: from=<go@example.com>")
    assert {"time", "level", "logger", "message"} <= set(lines[0])


def test_log_format_json_comes_from_the_environment_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "json")
    cli.setup_logging(None)
    assert all(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    cli.setup_logging(None)
    assert not any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
    # Said once, as a text line (basicConfig writes to the stderr of the moment: captured).
    assert capsys.readouterr().err.endswith(
        "WARNING mail2alert: unknown $LOG_FORMAT 'yaml' (use text or json); logging as text\n"
    )


def test_with_http_null_nothing_serves_http(tmp_path: Path, upstream: CaptureServer) -> None:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[],
        http=None,
    )
    with running(path) as mail2alert:
        assert mail2alert.service.component(Monitoring).addresses == []
        with pytest.raises(RuntimeError, match=r"no http listener \(http: null\)"):
            mail2alert.http_url  # noqa: B018 - the property raises


def test_a_busy_http_address_stops_the_service_before_intake_listens(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        port = free_port()
        path = served(tmp_path, upstream, port, workers=1, http=f"127.0.0.1:{busy}")
        with pytest.raises(StartupError) as caught, running(path):
            pass
    assert str(caught.value) == f"http: cannot listen on 127.0.0.1:{busy}: Address already in use"
    assert not listening(port)


def test_gocd_polls_and_trouble_are_in_metrics_and_readyz_without_failing_it(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """gocd#0 polls a GoCD that answers; gocd#1 has the wrong password (401): readyz is
    still 200, and says which manager is in trouble."""
    good, bad = ({**example_managers("gocd")[0], "poll-interval": 0.2} for _ in range(2))
    bad["passwd"] = "wrong"
    with FakeGoCD({"my-group": ["my-pipeline"]}, user="olle", password="pelle") as gocd:
        good["url"] = bad["url"] = gocd.url
        path = write_config(
            tmp_path / "configuration.yml",
            remote_port=upstream.port,
            data_dir=tmp_path / "data",
            managers=[good, bad],
        )
        with running(path) as mail2alert:

            def polled() -> dict[Any, float] | None:
                got = samples(get(mail2alert.http_url + "/metrics")[2])
                ok = ("mail2alert_gocd_polls_total", (("manager", "gocd#0"), ("result", "ok")))
                failed = (
                    "mail2alert_gocd_polls_total",
                    (("manager", "gocd#1"), ("result", "failed")),
                )
                return got if got.get(ok, 0) >= 2 and got.get(failed, 0) >= 1 else None

            got = wait_until(polled, what="both GoCD managers polled")
            status, _, body = get(mail2alert.http_url + "/readyz")
    age = got[("mail2alert_gocd_snapshot_age_seconds", (("manager", "gocd#0"),))]
    assert 0 <= age < 5
    assert ("mail2alert_gocd_snapshot_age_seconds", (("manager", "gocd#1"),)) not in got
    assert status == 200
    managers = json.loads(body)["managers"]
    assert managers["gocd#0"]["ok"] is True
    assert managers["gocd#0"]["state"].startswith("ok via ")
    assert managers["gocd#1"]["ok"] is False
    assert managers["gocd#1"]["state"].startswith("failing: ")
    assert "401" in managers["gocd#1"]["state"]
    assert "wrong" not in body
