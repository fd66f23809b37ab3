"""Settings records every layer may import: addresses and delivery policy.

They are parsed and validated by :mod:`mail2alert.config`, and read by the components that
use them (the intake, the dispatcher, the commands); they know nothing of YAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HOST_PORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]\s]+)):(\d{1,5})$")


@dataclass(frozen=True)
class HostPort:
    """A ``host:port`` address; IPv6 hosts are written ``[::1]:1025``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(
        cls, text: str, *, allow_zero: bool = False, default_host: str | None = None
    ) -> HostPort:
        """``host:port`` or ``[v6]:port``; ValueError with the expected form otherwise.

        Port 0 (any free port) only with ``allow_zero``; ``:port`` only with a
        ``default_host``.
        """
        text = text.strip()
        if default_host is not None and text.startswith(":"):
            text = f"[{default_host}]{text}" if ":" in default_host else default_host + text
        found = _HOST_PORT.match(text)
        port = int(found.group(3)) if found else -1
        if not found or not (0 if allow_zero else 1) <= port <= 65535:
            raise ValueError(
                f'expected host:port (e.g. localhost:1025 or "[::1]:1025"), got {text!r}'
            )
        return cls(found.group(1) or found.group(2), port)


@dataclass(frozen=True)
class Delivery:
    """How delivery to ``remote-smtp`` is retried (seconds), in the spirit of Postfix."""

    retry_initial: float = 60.0
    retry_max: float = 3600.0
    give_up_after: float = 5 * 86400.0
    timeout: float = 30.0
    connections: int = 4
