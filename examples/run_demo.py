"""``make run``: mail2alert on examples/configuration.yml, with everything it talks to.

- a capture SMTP sink on localhost:8025 that prints every message it receives (the
  configuration's ``remote-smtp``);
- a stand-in GoCD on localhost:8080 serving the pipeline groups of examples/gocd-snapshot.json
  (the configuration's ``url``, user olle, password pelle), so GoCD stage mails route by group;
- mail2alert itself on localhost:1025, with its web console, /metrics and its health checks
  on http://localhost:9025.

Each port can be chosen (``make run SMTP_PORT=2025 SINK_PORT=9026 GOCD_PORT=9080``, or
``--smtp-port`` and friends here); the configuration is then a copy of the example with those
ports. A busy port is said in one line before anything starts.

Send a sample from another terminal (see README.md) and watch where it goes. Ctrl-C stops all.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mail2alert.gocd.client import parse_groups
from mail2alert.gocd.testing import FakeGoCD

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configuration.yml"
#: What listens on each port, the option that moves it, and the make variable that sets it.
PORTS = {
    "smtp": (1025, "mail2alert's SMTP (local-smtp)", "SMTP_PORT"),
    "sink": (8025, "the capture sink (remote-smtp)", "SINK_PORT"),
    "gocd": (8080, "the stand-in GoCD (url)", "GOCD_PORT"),
    "http": (9025, "mail2alert's web console, /metrics and health checks (http)", "HTTP_PORT"),
}


def busy(port: int) -> str | None:
    """Why ``port`` cannot be listened on at localhost, or None when it can."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            return "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return None


def configuration(ports: dict[str, int], workdir: Path) -> Path:
    """The example configuration, as a copy with the chosen ports where they differ."""
    if all(ports[name] == default for name, (default, _, _) in PORTS.items()):
        return CONFIG
    text = CONFIG.read_text()
    for name, old in (("smtp", "localhost:1025"), ("sink", "localhost:8025")):
        text = text.replace(old, f"localhost:{ports[name]}")
    text = text.replace("http://localhost:8080/go", f"http://localhost:{ports['gocd']}/go")
    text += f"http: localhost:{ports['http']}\n"
    # The copy lives in a temporary directory: keep the outbox where the example's is.
    text += f"data-dir: {json.dumps(str(HERE / 'mail2alert-data'))}\n"
    path = workdir / "configuration.yml"
    path.write_text(text)
    return path


def arguments(argv: list[str] | None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    for name, (default, what, _) in PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=default, help=what)
    args = parser.parse_args(argv)
    return {name: int(getattr(args, f"{name}_port")) for name in PORTS}


def main(argv: list[str] | None = None) -> int:
    """Start the sink, the stand-in GoCD and mail2alert; stop them all when one ends."""
    ports = arguments(argv)
    for name, (_, what, variable) in PORTS.items():
        reason = busy(ports[name])
        if reason is not None:
            print(
                f"make run: port {ports[name]} for {what} is {reason}; stop what uses it, "
                f"or choose another port: make run {variable}=<port>",
                file=sys.stderr,
            )
            return 1
    # SIGTERM (from a service manager or `kill`) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    groups = parse_groups(json.loads((HERE / "gocd-snapshot.json").read_text()))
    gocd = FakeGoCD(
        {g: list(p) for g, p in groups.groups.items()},
        user="olle",
        password="pelle",
        port=ports["gocd"],
    )
    with tempfile.TemporaryDirectory(prefix="mail2alert-demo-") as workdir:
        config = configuration(ports, Path(workdir))
        try:
            gocd.start()
        except OSError as exc:
            print(f"make run: port {ports['gocd']}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(
            f"stand-in GoCD on localhost:{ports['gocd']} with groups:",
            ", ".join(groups.groups),
            flush=True,
        )
        mail2alert = [sys.executable, "-m", "mail2alert"]
        sink = subprocess.Popen([*mail2alert, "capture", "--listen", f"localhost:{ports['sink']}"])
        relay = subprocess.Popen([*mail2alert, "serve", "--config", str(config)])
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
    # The children print unbuffered, so their lines and the demo's show in the order they
    # happened.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
