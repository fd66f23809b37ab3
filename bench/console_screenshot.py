"""Make docs/console.png: the web console's message list after some traffic.

Runs mail2alert in this process with a stand-in GoCD and a capture server as its upstream
(which refuses one mail for good, so one item is dead), sends GoCD stage mails and other
mail over SMTP, and has headless Debian Chromium (``/usr/bin/chromium``, through Playwright)
take the screenshot. Everything listens on 127.0.0.1, on free ports.

    .venv/bin/python bench/console_screenshot.py [--out docs/console.png]
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import tempfile
import time
from pathlib import Path

import yaml
from playwright.sync_api import sync_playwright

from mail2alert import config
from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.outbox import Outbox
from mail2alert.testing import CHROMIUM, CHROMIUM_ARGS, CaptureServer, ServiceThread

ROOT = Path(__file__).resolve().parent.parent

STAGES = [
    "Stage [api-server/41/build/1] passed",
    "Stage [api-server/42/build/1] is broken",
    "Stage [web-frontend/17/test/1] failed",
    "Stage [api-server/43/build/1] is fixed",
    "Stage [payments-release-2/8/deploy/1] is broken",
    "Stage [web-frontend/18/test/1] is cancelled",
]


def configuration(data_dir: Path, upstream: int, gocd: str) -> str:
    """A gocd manager (pipeline groups from ``gocd``) and a mail manager."""
    return yaml.safe_dump(
        {
            "local-smtp": "127.0.0.1:0",
            "remote-smtp": f"127.0.0.1:{upstream}",
            "data-dir": str(data_dir),
            "delivery": {"retry-initial": "1m", "give-up-after": "1h"},
            "http": {"address": "127.0.0.1:0", "admin": True},
            "managers": [
                {
                    "name": "gocd",
                    "url": gocd,
                    "user": "olle",
                    "passwd": "pelle",
                    "messages-we-want": {"to": "mail2alert@example.com"},
                    "rules": [
                        {
                            "actions": ["mailto:team-core@example.com"],
                            "filter": {
                                "events": ["BREAKS", "FIXED", "FAILS"],
                                "function": "pipelines.in_group",
                                "args": ["core"],
                            },
                        },
                        {
                            "actions": ["mailto:releases@example.com"],
                            "filter": {
                                "events": ["BREAKS", "FIXED"],
                                "function": "pipelines.name_like_in_group",
                                "args": ["(.+)-release.*", "money"],
                            },
                        },
                    ],
                },
                {
                    "name": "mail",
                    "messages-we-want": {"from": "backup@example.com"},
                    "rules": [
                        {
                            "actions": ["mailto:ops@example.com"],
                            "filter": {"function": "mail.in_subject", "args": ["backup"]},
                        }
                    ],
                },
            ],
        },
        sort_keys=False,
    )


def plain(subject: str, sender: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: ops@example.com\r\nSubject: {subject}\r\n"
        "Content-Type: text/plain\r\n\r\nDone.\r\n"
    ).encode()


def traffic(port: int) -> None:
    """Stage mails for GoCD's manager, a backup report, and a mail no manager wants."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for subject in STAGES:
            smtp.sendmail("go@example.com", ["mail2alert@example.com"], gocd_stage_mail(subject))
        backup = plain("Nightly backup failed", "backup@example.com")
        smtp.sendmail("backup@example.com", ["ops@example.com"], backup)
        smtp.sendmail("someone@example.net", ["ops@example.com"], plain("Lunch?", "s@x"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    args = parser.parse_args()
    groups = {"core": ["api-server", "web-frontend"], "money": ["payments"]}
    with (
        tempfile.TemporaryDirectory() as tmp,
        CaptureServer() as upstream,
        FakeGoCD(groups, user="olle", password="pelle") as gocd,
    ):
        path = Path(tmp) / "configuration.yml"
        path.write_text(configuration(Path(tmp) / "data", upstream.port, gocd.url))
        upstream.refuse_data("550 5.2.2 team-core@example.com: mailbox full")
        with ServiceThread(config.load(path)) as mail2alert:
            gocd.wait_requests("pipeline_groups")
            traffic(mail2alert.port)
            _wait_settled(Path(tmp) / "data")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 820})
                page.goto(mail2alert.http_url + "/")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
    print(f"wrote {args.out}")
    return 0


def _wait_settled(data_dir: Path) -> None:
    """Until nothing is pending or held (each item delivered or dead), 30 s at most."""
    outbox = Outbox(data_dir, durable=False)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            gauges = outbox.gauges()
            if gauges.pending == 0 and gauges.held == 0:
                return
            time.sleep(0.05)
        raise SystemExit("delivery did not settle in 30 s")
    finally:
        outbox.close()


if __name__ == "__main__":
    sys.exit(main())
