"""``make run``: mail2alert on examples/configuration.yml plus a capture sink that prints mail.

mail2alert listens on localhost:1025 and delivers to localhost:8025, where a capture server
prints every message it receives. Send a sample from another terminal (see README.md) and
watch where it goes. Ctrl-C stops both.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    """Start the sink, then mail2alert; stop both when either ends or on Ctrl-C."""
    mail2alert = [sys.executable, "-m", "mail2alert"]
    sink = subprocess.Popen([*mail2alert, "capture", "--listen", "localhost:8025"])
    relay = subprocess.Popen(
        [*mail2alert, "serve", "--config", str(HERE / "configuration.yml")],
    )
    try:
        while True:
            for proc in (sink, relay):
                try:
                    code = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                return code
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in (relay, sink):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (relay, sink):
            proc.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
