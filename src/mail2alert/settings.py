"""Settings records every layer may import: addresses, the listener, the upstream, delivery.

They are parsed and validated by :mod:`mail2alert.config`, and read by the components that
use them (the intake, the dispatcher, the commands); they know nothing of YAML.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mail2alert.model import Secret

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
    connections: int = 8


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Who may send without authenticating, unless ``allowed-clients`` says otherwise: loopback
#: and the private ranges, so a container network works and the internet is refused.
PRIVATE_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)

InboundTlsMode = Literal["starttls", "starttls-required", "implicit"]
OutboundTlsMode = Literal["may", "none", "starttls", "implicit"]

#: aiosmtpd's own default: what mail2alert took before the limit could be set.
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024


@dataclass(frozen=True)
class InboundTls:
    """TLS on the listener: STARTTLS offered, required before MAIL, or from the first byte."""

    mode: InboundTlsMode
    cert: Path
    key: Path


@dataclass(frozen=True)
class InboundAuth:
    """SMTP AUTH on the listener, against a users file (``name:hash`` lines)."""

    users_file: Path
    required: bool = False
    """True: every client must authenticate, wherever it connects from."""


@dataclass(frozen=True)
class Listener:
    """``local-smtp``: where mail2alert listens, who may send, and the session limits."""

    address: HostPort
    allowed_clients: tuple[Network, ...] = PRIVATE_NETWORKS
    tls: InboundTls | None = None
    auth: InboundAuth | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_recipients: int = 1000
    max_sessions: int = 200
    timeout: float = 300.0

    def allows(self, peer: str) -> bool:
        """Whether a client at ``peer`` (an IP address) may send without authenticating."""
        try:
            address = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return False  # a Unix socket or something stranger: not on any allowed network
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed_clients)


@dataclass(frozen=True)
class Upstream:
    """``remote-smtp``: the smarthost everything goes out through, and how to talk to it."""

    address: HostPort
    tls: OutboundTlsMode = "may"
    """``may``: STARTTLS when offered, certificate not checked (Postfix's ``may``);
    ``starttls`` / ``implicit``: always TLS, certificate verified; ``none``: clear text."""
    user: str | None = None
    passwd: Secret | None = None
    ca_file: Path | None = None
    verify: bool = True
    helo: str | None = None
    sender: str | None = None
    """The envelope sender of everything sent upstream, and the From: of routed mail."""

    def risks(self) -> list[str]:
        """What this setting risks that is valid but an operator should know: a password
        sent over TLS whose certificate is not checked (anyone in the path can take it)."""
        if self.user is None or self.passwd is None:
            return []
        if self.tls == "may":
            why = "tls: may (the default) does not check the smarthost's certificate"
        elif not self.verify:
            why = "verify: false"
        else:
            return []
        return [
            f"remote-smtp: the password of {self.user} goes to whoever answers at"
            f" {self.address}: {why}; set tls: starttls (or implicit) and, for a private"
            " CA, ca-file"
        ]


@dataclass(frozen=True)
class Http:
    """``http``: where the web console, ``/metrics``, ``/healthz`` and ``/readyz`` are served
    (main process only)."""

    address: HostPort = HostPort("localhost", 9025)
    admin: bool = False
    """Whether the web console may retry and delete queued mail."""
    users_file: Path | None = None
    """Basic auth users of the web console (``name:hash`` lines, as SMTP AUTH); None: no
    login."""


@dataclass(frozen=True)
class History:
    """``history``: how long the decision history keeps a finished message, and how many."""

    keep: float = 7 * 86400.0
    """Seconds a finished message (nothing pending, dead or held) is kept after it came."""
    max_messages: int = 100_000
    """At most this many messages; the oldest finished ones go first."""
