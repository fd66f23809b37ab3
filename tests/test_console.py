"""The web console: every page over real HTTP after real SMTP traffic, Retry and Delete only
with ``admin: true`` and a valid token, basic auth with ``users-file`` (the monitoring
endpoints staying open), no secret on any page; and the pure parts (chart, tokens, logins,
the configuration shown, GoCD's tables) on their own."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import fnmatch
import http.client
import re
import threading
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from mail2alert import components, config
from mail2alert.console import own_name
from mail2alert.console.access import REMEMBERED, TOKEN_LIFE, Csrf, Logins, credentials
from mail2alert.console.views import HOURS, hour_of, hourly_chart, url_shown
from mail2alert.gocd.explaining import console_tables
from mail2alert.gocd.memory import HISTORY, RUNS
from mail2alert.gocd.model import PipelineGroups
from mail2alert.gocd.poller import GroupPoller, client_from_options
from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.managers.explaining import Kept
from mail2alert.metrics import config_hash
from mail2alert.model import Secret
from mail2alert.settings import HostPort, Http
from mail2alert.testing import CaptureServer, FakeClock
from mail2alert.users import hash_password
from tests.helpers import (
    Relay,
    compose,
    example_managers,
    relay,
    running,
    send,
    wait_until,
    write_config,
)

PAGES = ("/", "/outbox", "/managers/gocd", "/config", "/chart")


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: str


class _Stay(urllib.request.HTTPRedirectHandler):
    """Redirects are answers to look at, not to follow."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_Stay)


def fetch(
    url: str, *, form: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None
) -> Answer:
    """GET ``url`` (POST ``form``), with basic auth if given; every status is an answer."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data)
    if auth is not None:
        pair = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with _OPENER.open(request, timeout=15) as answer:
            return Answer(answer.status, dict(answer.headers), answer.read().decode())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, dict(exc.headers), exc.read().decode())


def token_in(page: str) -> str:
    """The CSRF token of the first form of a page."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no form with a token on the page"
    return found.group(1)


def with_http(**keys: Any) -> Any:
    """A relay ``adjust`` that sets ``http`` (on any free port) with these keys."""
    return lambda c: dataclasses.replace(c, http=Http(HostPort("127.0.0.1", 0), **keys))


@pytest.fixture
def dead(tmp_path: Path, upstream: CaptureServer) -> Iterator[tuple[Relay, str]]:
    """mail2alert with ``admin: true`` and one message whose only item is dead (the upstream
    refused it with 550 once; it takes mail again afterwards)."""
    upstream.refuse_data("550 5.7.1 not now")
    managers = example_managers("mail", "gocd")
    with relay(tmp_path, upstream, managers, adjust=with_http(admin=True)) as mail2alert:
        queue_id = mail2alert.send(compose()).queue_id
        mail2alert.outbox.wait_state(queue_id, "dead")
        yield mail2alert, queue_id


# -- every page after real traffic ----------------------------------------------------------


def test_every_page_answers_after_real_smtp_traffic(dead: tuple[Relay, str]) -> None:
    mail2alert, queue_id = dead
    mail2alert.send(gocd_stage_mail())
    mail2alert.sentinel()
    url = mail2alert.service.http_url
    answers = {path: fetch(url + path) for path in (*PAGES, f"/messages/{queue_id}")}
    for path, answer in answers.items():
        assert answer.status == 200, (path, answer.body)
        assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
        assert 'name="viewport"' in answer.body
        assert answer.headers["X-Frame-Options"] == "DENY"
    listed = answers["/"].body
    assert f'href="/messages/{queue_id}"' in listed
    assert "Server Backup Completed Successfully" in listed
    assert "Stage [my-pipeline/6/my-stage/1] is broken" in listed
    assert "sentinel" in listed
    shown = answers[f"/messages/{queue_id}"].body
    assert "550 5.7.1 not now" in shown
    assert "sys@example.com" in shown
    assert "mail#1" in shown
    outbox = answers["/outbox"].body
    assert 'class="entry-dead"' in outbox
    assert "Retry" in outbox
    assert "<svg" in answers["/chart"].body
    assert "gocd#0" in answers["/managers/gocd"].body


def test_the_message_list_filters_by_manager_and_state(dead: tuple[Relay, str]) -> None:
    mail2alert, queue_id = dead
    mail2alert.sentinel()
    url = mail2alert.service.http_url
    by_manager = fetch(url + "/?manager=mail%231").body
    by_none = fetch(url + "/?manager=-").body
    relayed = fetch(url + "/?state=done").body
    dead_ones = fetch(url + "/?state=dead").body
    assert f"/messages/{queue_id}" in by_manager
    assert "sentinel" not in by_manager
    assert "sentinel" in relayed
    assert "sentinel" in by_none
    assert f"/messages/{queue_id}" not in by_none
    assert f"/messages/{queue_id}" not in relayed
    assert f"/messages/{queue_id}" in dead_ones


def test_the_message_page_shows_facts_rules_every_attempt_and_the_headers_received(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.refuse_data("451 4.3.0 try later")
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        queue_id = mail2alert.send(compose(headers=["X-Build: 1234"])).queue_id
        mail2alert.outbox.wait_state(queue_id, "done")
        page = fetch(f"{mail2alert.service.http_url}/messages/{queue_id}").body
    assert "none beyond the subject" in page  # the facts line of the mail manager's type
    assert re.search(r"✓ rule 1 \(line \d+\): mail.in_subject\(&#39;server&#39;", page)
    attempts = re.findall(r"<tr><td[^>]*>[^<]*UTC</td>.*?</tr>", page)
    assert len(attempts) == 2
    assert "state-retry" in attempts[0]
    assert "451 4.3.0 try later" in attempts[0]
    assert "state-sent" in attempts[1]
    assert "250 2.0.0 OK captured" in attempts[1]
    assert "X-Build: 1234" in page


def test_the_message_list_filters_by_facts_and_links_them(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    to_gocd = {"rcpt_tos": ["mail2alert@example.com"]}
    with relay(tmp_path, upstream, example_managers("gocd", "mail")) as mail2alert:
        broken = mail2alert.send(gocd_stage_mail(), **to_gocd).queue_id
        fixed = mail2alert.send(
            gocd_stage_mail("Stage [other-pipeline/7/my-stage/1] is fixed"), **to_gocd
        ).queue_id
        other = mail2alert.send(compose()).queue_id
        url = mail2alert.service.http_url
        everything = fetch(url + "/").body
        breaks = fetch(url + "/?event=BREAKS").body
        pipeline = fetch(url + "/?pipeline=other-pipeline&manager=gocd%230").body
        both = fetch(url + "/?pipeline=other-pipeline&event=BREAKS").body
        page = fetch(f"{url}/messages/{broken}").body
        chart = fetch(url + "/chart").body
    assert all(f"/messages/{q}" in everything for q in (broken, fixed, other))
    assert '<a class="fact" href="/?event=BREAKS">event=BREAKS</a>' in everything
    assert f"/messages/{broken}" in breaks
    assert f"/messages/{fixed}" not in breaks
    assert f"/messages/{other}" not in breaks
    assert f"/messages/{fixed}" in pipeline
    assert f"/messages/{broken}" not in pipeline
    assert "No message matches these filters" in both
    assert 'value="other-pipeline"' in pipeline  # the filter stays filled in
    assert "pipeline my-pipeline #6, stage my-stage #1, event BREAKS" in page
    assert "Jane Doe jane@example.com" in page
    assert re.search(r"BREAKS 1</li>", chart)
    assert re.search(r"FIXED 1</li>", chart)
    assert re.search(r"deliver 1</li>", chart)  # the mail manager's, which has no event


def test_a_message_that_is_not_there_is_404(dead: tuple[Relay, str]) -> None:
    mail2alert, _ = dead
    answer = fetch(mail2alert.service.http_url + "/messages/NOSUCHID")
    assert answer.status == 404
    assert "No message NOSUCHID" in answer.body


def test_text_from_the_mail_is_escaped(tmp_path: Path, upstream: CaptureServer) -> None:
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        subject = "Server backup <script>alert(1)</script>"
        queue_id = mail2alert.send(compose(subject=subject)).queue_id
        mail2alert.outbox.wait_state(queue_id, "done")
        url = mail2alert.service.http_url
        pages = [fetch(url + "/").body, fetch(f"{url}/messages/{queue_id}").body]
    for page in pages:
        assert "<script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# -- Retry and Delete ----------------------------------------------------------------------


def test_retry_with_a_valid_token_delivers_a_dead_item(dead: tuple[Relay, str]) -> None:
    mail2alert, queue_id = dead
    url = mail2alert.service.http_url
    token = token_in(fetch(url + "/outbox").body)
    answer = fetch(url + "/outbox/retry", form={"csrf": token, "queue_id": queue_id})
    assert answer.status == 303
    assert answer.headers["Location"].startswith("/outbox?done=")
    mail2alert.outbox.wait_state(queue_id, "done")
    assert mail2alert.upstream.wait_for(1)[0].rcpt_tos == ("sys@example.com", "op@example.com")
    after = fetch(url + answer.headers["Location"]).body
    assert f"{queue_id}: requeued 1 item (1 dead), due now" in after


def test_a_retry_wakes_delivery_at_once_rather_than_at_its_next_look(
    dead: tuple[Relay, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mail2alert, queue_id = dead
    woken = threading.Event()
    wake = components.Delivery.wake

    def recorded(self: components.Delivery) -> None:
        woken.set()
        wake(self)

    monkeypatch.setattr(components.Delivery, "wake", recorded)
    url = mail2alert.service.http_url
    token = token_in(fetch(url + "/outbox").body)
    answer = fetch(url + "/outbox/retry", form={"csrf": token, "queue_id": queue_id})
    assert answer.status == 303
    assert woken.is_set()


def test_delete_with_a_valid_token_removes_the_message(dead: tuple[Relay, str]) -> None:
    mail2alert, queue_id = dead
    url = mail2alert.service.http_url
    token = token_in(fetch(f"{url}/messages/{queue_id}").body)
    form = {"csrf": token, "queue_id": queue_id, "next": "/"}
    answer = fetch(url + "/outbox/delete", form=form)
    assert answer.status == 303
    assert answer.headers["Location"].startswith("/?done=")
    assert mail2alert.outbox.message(queue_id) is None


@pytest.mark.parametrize("back", ["//evil.example/x", "/\\evil.example", "https://evil.example/"])
def test_after_a_change_the_browser_goes_back_only_to_a_page_of_the_console(
    dead: tuple[Relay, str], back: str
) -> None:
    mail2alert, queue_id = dead
    url = mail2alert.service.http_url
    token = token_in(fetch(url + "/outbox").body)
    form = {"csrf": token, "queue_id": queue_id, "next": back}
    answer = fetch(url + "/outbox/retry", form=form)
    assert answer.status == 303
    assert answer.headers["Location"].startswith("/outbox?done=")


@pytest.mark.parametrize("token", [None, "", "123.abc", "stale"])
@pytest.mark.parametrize("action", ["retry", "delete"])
def test_a_post_without_a_valid_token_is_403_and_changes_nothing(
    dead: tuple[Relay, str], action: str, token: str | None
) -> None:
    mail2alert, queue_id = dead
    form = {"queue_id": queue_id}
    if token == "stale":
        issued = int(token_in(fetch(mail2alert.service.http_url + "/outbox").body).split(".")[0])
        token = f"{issued - int(TOKEN_LIFE) - 10}.{'0' * 64}"
    if token is not None:
        form["csrf"] = token
    answer = fetch(f"{mail2alert.service.http_url}/outbox/{action}", form=form)
    assert answer.status == 403
    assert mail2alert.outbox.item(queue_id)["state"] == "dead"


def by_host(url: str, host: str, form: Mapping[str, str] | None = None) -> tuple[int, str]:
    """GET (or POST ``form`` to) ``url`` with another ``Host`` header, as a page of another
    site whose name resolves to 127.0.0.1 (DNS rebinding) sends it."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    body = urllib.parse.urlencode(form) if form is not None else None
    headers = {"Host": host}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    connection.request("POST" if form is not None else "GET", parts.path, body, headers)
    answer = connection.getresponse()
    text = answer.read().decode()
    connection.close()
    return answer.status, text


def test_without_a_users_file_another_sites_name_gets_nothing_and_changes_nothing(
    dead: tuple[Relay, str],
) -> None:
    """A page of another site whose name is made to resolve to 127.0.0.1 would be of the
    console's own origin: it could read a form's token and use it. Without logins the
    console answers only at localhost, an IP address or http's own host name."""
    mail2alert, queue_id = dead
    url = mail2alert.service.http_url
    port = urllib.parse.urlsplit(url).port
    status, page = by_host(url + "/outbox", f"rebind.attacker.example:{port}")
    assert status == 421
    assert "DNS rebinding" in page
    token = token_in(fetch(url + "/outbox").body)  # as if it had got one all the same
    form = {"csrf": token, "queue_id": queue_id}
    assert by_host(url + "/outbox/delete", f"rebind.attacker.example:{port}", form)[0] == 421
    assert mail2alert.outbox.item(queue_id)["state"] == "dead"
    assert by_host(url + "/outbox", f"localhost:{port}")[0] == 200


@pytest.mark.parametrize(
    ("host", "ours"),
    [
        ("127.0.0.1:9025", True),
        ("[::1]:9025", True),
        ("::1", True),
        ("10.0.0.5", True),
        ("localhost:9025", True),
        ("LocalHost", True),
        ("console.localhost:9025", True),
        ("mail2alert.example.com:9025", True),  # http's own host name
        ("rebind.attacker.example:9025", False),
        ("", False),
    ],
)
def test_the_names_a_console_without_logins_answers_at(host: str, ours: bool) -> None:
    assert own_name(host, "mail2alert.example.com") is ours


def test_with_admin_false_a_post_is_403_even_with_a_valid_token(
    dead: tuple[Relay, str],
) -> None:
    mail2alert, queue_id = dead
    url = mail2alert.service.http_url
    token = token_in(fetch(url + "/outbox").body)
    # The file says http: 127.0.0.1:0, so admin is false once it is loaded again.
    assert mail2alert.service.call(mail2alert.service.service.reload()) is True
    answers = [
        fetch(f"{url}/outbox/{a}", form={"csrf": token, "queue_id": queue_id})
        for a in ("retry", "delete")
    ]
    page = fetch(url + "/outbox").body
    assert [a.status for a in answers] == [403, 403]
    assert mail2alert.outbox.item(queue_id)["state"] == "dead"
    assert 'name="csrf"' not in page
    assert "Read-only" in page


# -- basic auth ----------------------------------------------------------------------------


def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"# console users\nalice:{hash_password('wonderland')}\n", encoding="utf-8")
    return path


def test_with_a_users_file_every_console_page_needs_a_login_and_monitoring_stays_open(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    users = users_file(tmp_path)
    with relay(
        tmp_path,
        upstream,
        example_managers("mail", "gocd"),
        adjust=with_http(admin=True, users_file=users),
    ) as mail2alert:
        queue_id = mail2alert.send(compose()).queue_id
        url = mail2alert.service.http_url
        paths = (*PAGES, f"/messages/{queue_id}")
        anonymous = {p: fetch(url + p) for p in paths}
        # Each failure from an address waits longer (1 s, 2 s...): one of each kind.
        wrong = {"/config": fetch(url + "/config", auth=("alice", "looking-glass"))}
        nobody = fetch(url + "/", auth=("mallory", "wonderland"))
        right = {p: fetch(url + p, auth=("alice", "wonderland")) for p in paths}
        post = fetch(url + "/outbox/retry", form={"queue_id": queue_id})
        monitoring = {p: fetch(url + p).status for p in ("/healthz", "/readyz", "/metrics")}
    for answers in (anonymous, wrong):
        for path, answer in answers.items():
            assert answer.status == 401, path
            assert answer.headers["WWW-Authenticate"].startswith('Basic realm="mail2alert"')
    assert nobody.status == 401
    assert {p: a.status for p, a in right.items()} == dict.fromkeys(paths, 200)
    assert "alice" in right["/"].body
    assert post.status == 401
    assert monitoring == {"/healthz": 200, "/readyz": 200, "/metrics": 200}


def test_nobody_is_let_in_while_the_users_file_cannot_be_read(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    users = users_file(tmp_path)
    adjust = with_http(users_file=users)
    with relay(tmp_path, upstream, example_managers("mail"), adjust=adjust) as mail2alert:
        url = mail2alert.service.http_url
        users.unlink()
        gone = fetch(url + "/", auth=("alice", "wonderland"))
        health = fetch(url + "/healthz")
    assert gone.status == 503
    assert "users file" in gone.body
    assert health.status == 200


def test_a_post_naming_no_message_or_one_that_is_not_there_changes_nothing(
    dead: tuple[Relay, str],
) -> None:
    mail2alert, queue_id = dead
    url = mail2alert.service.http_url
    token = token_in(fetch(url + "/outbox").body)
    unnamed = fetch(url + "/outbox/retry", form={"csrf": token})
    unknown = fetch(url + "/outbox/delete", form={"csrf": token, "queue_id": "NOSUCHID"})
    assert unnamed.status == 400
    assert unknown.status == 404
    assert mail2alert.outbox.item(queue_id)["state"] == "dead"


def test_the_message_list_pages_fifty_at_a_time(tmp_path: Path, upstream: CaptureServer) -> None:
    with relay(tmp_path, upstream, []) as mail2alert:
        for n in range(51):
            mail2alert.send(compose(subject=f"number {n:02}"))
        url = mail2alert.service.http_url
        first = fetch(url + "/?page=nonsense").body
        second = fetch(url + "/?page=2").body
    assert first.count('<a href="/messages/') == 50
    assert "number 50" in first
    assert "number 00" not in first
    assert 'href="/?page=2"' in first
    assert second.count('<a href="/messages/') == 1
    assert "number 00" in second
    assert 'href="/?page=1"' in second


def test_a_login_is_checked_off_the_event_loop_and_remembered_briefly(tmp_path: Path) -> None:
    users = users_file(tmp_path)
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        pass

    logins = Logins(clock=clock, sleep=sleep)
    good = "Basic " + base64.b64encode(b"alice:wonderland").decode()
    bad = "Basic " + base64.b64encode(b"alice:looking-glass").decode()

    async def check(header: str | None) -> str | None:
        return await logins.check(users, header, "192.0.2.1")

    assert asyncio.run(check(good)) == "alice"
    assert asyncio.run(check(bad)) is None
    assert asyncio.run(check(None)) is None
    # Remembered: the hash is not checked again (a users file without alice would say no).
    users.write_text(f"bob:{hash_password('builder')}\n", encoding="utf-8")
    assert asyncio.run(check(good)) is None  # the file changed: checked against it again
    users.write_text(f"alice:{hash_password('wonderland')}\n", encoding="utf-8")
    assert asyncio.run(check(good)) == "alice"
    clock.advance(REMEMBERED + 1)
    assert asyncio.run(check(good)) == "alice"


def test_each_wrong_password_from_an_address_is_answered_later_than_the_last(
    tmp_path: Path,
) -> None:
    users = users_file(tmp_path)
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    logins = Logins(clock=FakeClock(), sleep=sleep)
    bad = "Basic " + base64.b64encode(b"alice:looking-glass").decode()
    good = "Basic " + base64.b64encode(b"alice:wonderland").decode()

    async def check(header: str | None, peer: str = "192.0.2.1") -> str | None:
        return await logins.check(users, header, peer)

    for _ in range(3):
        assert asyncio.run(check(bad)) is None
    assert asyncio.run(check(bad, "192.0.2.2")) is None
    assert asyncio.run(check(None)) is None  # no password given: nothing failed
    assert asyncio.run(check(good)) == "alice"
    assert asyncio.run(check(bad)) is None  # a login forgives the address's failures
    assert waited == [1.0, 2.0, 4.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("Bearer abc", None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"no-colon").decode(), None),
        ("Basic " + base64.b64encode(b"a:b:c").decode(), ("a", "b:c")),
        ("basic " + base64.b64encode("jörg:pä".encode()).decode(), ("jörg", "pä")),
        ("Basic \xe9\xe9\xe9", None),  # not base64: a 401, not a 500 and a traceback
    ],
)
def test_basic_credentials_are_read_from_the_authorization_header(
    header: str | None, expected: tuple[str, str] | None
) -> None:
    assert credentials(header) == expected


def test_a_token_is_valid_for_its_user_until_it_is_stale() -> None:
    clock = FakeClock()
    csrf = Csrf(clock=clock)
    token = csrf.token("alice")
    assert csrf.valid(token, "alice")
    assert not csrf.valid(token, "bob")
    assert not csrf.valid(token + "0", "alice")
    assert not Csrf(clock=clock).valid(token, "alice")  # another process's key
    clock.advance(TOKEN_LIFE + 1)
    assert not csrf.valid(token, "alice")


# -- secrets -------------------------------------------------------------------------------

SECRETS = {
    "gocd-passwd": "gocd-passwd-s3cret",
    "gocd-token": "gocd-token-s3cret",
    "url-password": "url-pa55word",
    "smtp-passwd": "smtp-passwd-s3cret",
    "slack-token": "xoxb-slack-token-s3cret",
    "apprise-token": "tgramBotTokenS3cret",
    "webhook-path": "webhook-path-s3cret",
    "webhook-password": "webhookpa55",
    "discord-token": "discordTokenS3cret",
}


def secret_config(tmp_path: Path, upstream: CaptureServer, gocd_port: int) -> Path:
    """A configuration with every kind of secret mail2alert knows."""
    s = SECRETS
    gocd = {**example_managers("gocd")[0], "poll-interval": 0.2}
    by_password = {**gocd, "passwd": s["gocd-passwd"]}
    by_password["url"] = f"http://olle:{s['url-password']}@127.0.0.1:{gocd_port}/go"
    by_token = {k: v for k, v in gocd.items() if k not in ("user", "passwd")}
    by_token["token"] = s["gocd-token"]
    by_token["url"] = f"http://127.0.0.1:{gocd_port}/go"
    by_token["rules"] = [
        {
            "actions": [
                f"tgram://123456789:{s['apprise-token']}/987654",
                f"json://bot:{s['webhook-password']}@127.0.0.1:9/{s['webhook-path']}",
            ],
            "filter": {"function": "pipelines.any", "args": []},
        }
    ]
    by_token["fallback"] = [f"discord://112233/{s['discord-token']}"]
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[by_password, by_token],
        remote={"tls": "starttls", "user": "relay", "passwd": s["smtp-passwd"]},
    )
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document["slack-token"] = s["slack-token"]
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def test_no_page_shows_a_secret(tmp_path: Path, upstream: CaptureServer) -> None:
    """Passwords, tokens, a URL's password and chat URLs are masked on every page, also in
    the GoCD page's errors (a GoCD that refuses with 401 answers every poll)."""
    with FakeGoCD({"my-group": ["my-pipeline"]}, user="olle", password="pelle") as gocd:
        path = secret_config(tmp_path, upstream, gocd.port)
        with running(path) as mail2alert:
            send(mail2alert.port, gocd_stage_mail(), rcpt_tos=["mail2alert@example.com"])
            gocd.wait_requests("pipeline_groups", 4)
            url = mail2alert.http_url
            pages = {p: fetch(url + p) for p in PAGES}
    assert {p: a.status for p, a in pages.items()} == dict.fromkeys(PAGES, 200)
    shown = "\n".join(a.body for a in pages.values())
    for name, secret in SECRETS.items():
        assert secret not in shown, name
    config_page = pages["/config"].body
    assert config_page.count("***") >= 5
    assert "tgram://" in config_page
    assert f"http://olle:***@127.0.0.1:{gocd.port}/go" in config_page


def test_a_url_is_shown_without_its_password() -> None:
    assert url_shown("https://u:p4ss@host/x") == "https://u:***@host/x"
    assert url_shown("https://host/x") == "https://host/x"
    assert url_shown("http://[::1") == "***"


# -- configuration, reload, GoCD -----------------------------------------------------------


def test_the_config_page_shows_the_hash_and_the_last_reload(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        source = Path(mail2alert.service.config.path).read_text(encoding="utf-8")
        before = fetch(mail2alert.service.http_url + "/config").body
        Path(mail2alert.service.config.path).write_text(source + "managers: [\n")
        assert mail2alert.service.call(mail2alert.service.service.reload()) is False
        after = fetch(mail2alert.service.http_url + "/config").body
    assert config_hash(source) in before
    assert re.search(r"<th>keep</th><td[^>]*>7d</td>", before)  # history.keep's default
    assert "loaded at start" in before
    assert "failed" in after
    assert "is invalid" in after
    assert config_hash(source) in after  # the running configuration is still the old one


def test_the_gocd_page_shows_groups_polls_and_the_stage_history(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    manager = {**example_managers("gocd")[0], "poll-interval": 0.2}
    with FakeGoCD({"my-group": ["my-pipeline", "other"]}, user="olle", password="pelle") as gocd:
        manager["url"] = gocd.url
        path = write_config(
            tmp_path / "configuration.yml",
            remote_port=upstream.port,
            data_dir=tmp_path / "data",
            managers=[manager],
        )
        with running(path) as mail2alert:
            url = mail2alert.http_url
            wait_until(lambda: "my-group" in fetch(url + "/managers/gocd").body, what="groups")
            to_gocd = ["mail2alert@example.com"]
            assert send(mail2alert.port, gocd_stage_mail(), rcpt_tos=to_gocd).code == 250
            page = wait_until(
                lambda: (b := fetch(url + "/managers/gocd").body) and "6/1" in b and b,
                what="the stage in the history",
            )
            missing = fetch(url + "/managers/nothing")
    assert "my-pipeline, other" in page
    assert 'href="/?manager=gocd%230">its messages</a>' in page
    assert "last poll" in page
    assert re.search(r"<td[^>]*>my-stage</td>", page)
    assert re.search(r"<td[^>]*>failed</td>", page)
    assert missing.status == 404


def test_the_gocd_poller_keeps_its_last_poll_and_its_last_error_after_recovering(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with FakeGoCD({"g": ["p"]}, user="olle", password="pelle") as gocd:
        options = {"url": gocd.url, "user": "olle", "passwd": Secret("pelle")}
        poller = GroupPoller(
            "gocd#0", client_from_options(options), interval=1, data_dir=tmp_path, clock=clock
        )
        before = poller.health()
        gocd.failing = 500
        asyncio.run(poller.poll_once())
        failed_at = clock()
        clock.advance(60)
        gocd.failing = None
        asyncio.run(poller.poll_once())
    after = poller.health()
    assert (before.last_poll, before.last_error, before.last_error_at) == (None, "", None)
    assert after.ok
    assert after.last_poll == clock()
    assert "500" in after.last_error
    assert after.last_error_at == failed_at


def kept(snapshot: object | None, notes: Mapping[str, Mapping[tuple[str, ...], str]]) -> Kept:
    text = yaml.safe_dump({"remote-smtp": "localhost:25", "managers": example_managers("gocd")})
    manager = config.parse(text, "c.yml", {}).routing[0]
    return Kept(manager, snapshot, notes)


def test_gocd_tables_list_the_groups_and_this_managers_stages() -> None:
    groups = PipelineGroups({"g": ("Build", "deploy")}, fetched_at=0.0)
    notes = {
        HISTORY: {("build", "test"): "failed", ("elsewhere", "x"): "passed"},
        RUNS: {("build", "test"): "7/2"},
    }
    snapshot, history = console_tables(kept(groups, notes))
    assert snapshot.rows == (("g", "Build, deploy"),)
    assert "1970-01-01 00:00:00 UTC" in snapshot.caption
    assert history.rows == (("Build", "test", "g", "7/2", "failed"),)


def test_without_a_snapshot_gocd_tables_show_every_stage_known() -> None:
    snapshot, history = console_tables(kept(None, {HISTORY: {("a", "b"): "passed"}}))
    assert snapshot.rows == ()
    assert "none from GoCD yet" in snapshot.caption
    assert history.rows == (("a", "b", "", "", "passed"),)


# -- the chart -----------------------------------------------------------------------------


def test_the_chart_stacks_the_last_24_hours_by_kind() -> None:
    now = 1_000_000 * 3600 + 1800.0
    hour = hour_of(now)
    counts = {(hour, "BREAKS"): 2, (hour - 3600, "FIXED"): 1, (hour - 25 * 3600, "X"): 4}
    chart = hourly_chart(counts, now)
    assert chart.total == 3
    assert [(kind, count) for kind, _, count in chart.legend] == [("BREAKS", 2), ("FIXED", 1)]
    assert chart.svg.count("<rect") == 2
    assert "X:" not in chart.svg
    assert hour_of(now) == now - 1800
    assert HOURS == 24


def test_the_chart_escapes_its_kinds() -> None:
    chart = hourly_chart({(hour_of(0.0), "<b>"): 1}, 0.0)
    assert "<b>" not in chart.svg
    assert "&lt;b&gt;" in chart.svg


def test_every_template_is_package_data() -> None:
    """A wheel (the Docker image's) carries what ``pip install .`` takes: the package data."""
    root = Path(__file__).resolve().parent.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mail2alert"]
    package = root / "src" / "mail2alert"
    templates = sorted((package / "console" / "templates").iterdir())
    assert templates
    for template in templates:
        shown = template.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(shown, p) for p in patterns), shown
