"""``make run``: mail2alert on examples/configuration.yml, with everything it talks to.

- a capture SMTP sink on localhost:8025 that prints every message it receives (the
  configuration's ``remote-smtp``);
- a stand-in GoCD on localhost:8080 serving the pipeline groups of examples/gocd-snapshot.json
  (the configuration's ``url``, user olle, password pelle), so GoCD stage mails route by group;
- mail2alert itself on localhost:1025.

Send a sample from another terminal (see README.md) and watch where it goes. Ctrl-C stops all.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from mail2alert.gocd.client import parse_groups
from mail2alert.gocd.testing import FakeGoCD

HERE = Path(__file__).resolve().parent


def main() -> int:
    """Start the sink, the stand-in GoCD and mail2alert; stop them all when one ends."""
    # SIGTERM (from a service manager or `kill`) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    groups = parse_groups(json.loads((HERE / "gocd-snapshot.json").read_text()))
    gocd = FakeGoCD(
        {g: list(p) for g, p in groups.groups.items()}, user="olle", password="pelle", port=8080
    )
    try:
        gocd.start()
        print("stand-in GoCD on localhost:8080 with groups:", ", ".join(groups.groups), flush=True)
    except OSError as exc:
        print(f"no stand-in GoCD (port 8080: {exc.strerror}); GoCD mails will be held", flush=True)
    mail2alert = [sys.executable, "-m", "mail2alert"]
    sink = subprocess.Popen([*mail2alert, "capture", "--listen", "localhost:8025"])
    relay = subprocess.Popen([*mail2alert, "serve", "--config", str(HERE / "configuration.yml")])
    try:
        while sink.poll() is None and relay.poll() is None:
            time.sleep(0.2)
        return relay.returncode or sink.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in (relay, sink):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (relay, sink):
            proc.wait(timeout=30)
        gocd.stop()


if __name__ == "__main__":
    raise SystemExit(main())
