"""The console in a real browser: headless Debian Chromium, driven by Playwright, against a
real ``mail2alert serve`` after real SMTP traffic. ``make test`` installs Chromium when it is
missing; this test never skips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.testing import CHROMIUM, CHROMIUM_ARGS, CaptureServer, free_port
from tests.helpers import (
    OutboxView,
    ServeProcess,
    compose,
    example_managers,
    send,
    write_config,
)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless (never a browser Playwright downloads)."""
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make test` installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def served(tmp_path: Path, upstream: CaptureServer) -> Iterator[tuple[ServeProcess, str]]:
    """``mail2alert serve`` with a mail and a gocd manager, ``admin: true``; its console URL."""
    port, http = free_port(), free_port()
    with FakeGoCD({"my-group": ["my-pipeline"]}, user="olle", password="pelle") as gocd:
        managers = example_managers("gocd", "mail")
        managers[0] = {**managers[0], "url": gocd.url, "poll-interval": 1}
        path = write_config(
            tmp_path / "configuration.yml",
            remote_port=upstream.port,
            data_dir=tmp_path / "data",
            managers=managers,
            local=f"127.0.0.1:{port}",
            http={"address": f"127.0.0.1:{http}", "admin": True},
        )
        server = ServeProcess(path, port, tmp_path / "serve.log")
        try:
            server.start()
            yield server, f"http://127.0.0.1:{http}"
        finally:
            server.close()


def test_a_dead_item_is_retried_from_the_browser_and_delivered(
    browser: Browser, served: tuple[ServeProcess, str], upstream: CaptureServer, tmp_path: Path
) -> None:
    server, console = served
    upstream.refuse_data("550 5.2.2 mailbox full")
    refused = send(server.port, compose()).queue_id
    upstream.wait_refused(1)
    to_gocd = ["mail2alert@example.com"]
    assert send(server.port, gocd_stage_mail(), rcpt_tos=to_gocd).code == 250
    assert send(server.port, compose(subject="Server backup done")).code == 250
    upstream.wait_for(2)
    OutboxView(tmp_path / "data").wait_state(refused, "dead")
    page: Page = browser.new_page(viewport={"width": 1100, "height": 900})

    page.goto(console + "/")
    assert page.title() == "Messages · mail2alert"
    row = page.locator("table.messages tr", has_text=refused)
    row.locator(".state-dead").wait_for()
    assert page.locator("table.messages tr").count() == 4  # the heading and three messages

    row.get_by_role("link", name=refused).click()
    page.wait_for_url(f"**/messages/{refused}")
    assert "550 5.2.2 mailbox full" in page.locator("main").inner_text()

    page.get_by_role("link", name="Outbox").click()
    page.wait_for_url("**/outbox")
    dead = page.locator("tr.entry-dead", has_text=refused)
    dead.get_by_role("button", name="Retry").click()
    page.wait_for_url("**/outbox?done=*")
    assert f"{refused}: requeued 1 item" in page.locator("p.note").inner_text()

    upstream.wait_for(3)  # the retried mail arrived upstream
    page.goto(f"{console}/messages/{refused}")
    page.locator("h1 .state-done").wait_for()
    screenshot = tmp_path / "console.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    page.close()
