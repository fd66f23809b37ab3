"""The keys of a gocd manager: declared once, with their defaults, and read as one record."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from mail2alert.managers.base import Option
from mail2alert.model import Secret

OPTIONS: Mapping[str, Option] = {
    "url": Option("url", "GoCD's base URL, e.g. https://ci.example.com/go"),
    "user": Option("text", "user for HTTP basic auth"),
    "passwd": Option("secret", "password for HTTP basic auth"),
    "token": Option("secret", "access token (Authorization: bearer)"),
    "poll-interval": Option("seconds", "how often to read pipeline groups", 30.0),
    "ca-file": Option("ca-file", "CA bundle for GoCD's TLS certificate"),
    "verify": Option("bool", "verify GoCD's TLS certificate", True),
    "hold-max": Option("seconds", "how long to hold mail while GoCD data is missing", 600.0),
    "duplicate-window": Option(
        "seconds",
        "how long the same stage event is delivered only once (0: no de-duplication)",
        600.0,
        zero_means_off=True,
    ),
    "reconcile": Option(
        "bool",
        "make the alert of a stage run GoCD sent no mail for, from GoCD's API",
        True,
    ),
    "reconcile-after": Option(
        "seconds", "how long a completed stage run waits for its mail before it is made", 300.0
    ),
    "reconcile-window": Option(
        "seconds",
        "only runs that completed this recently are made (after downtime: no flood)",
        7200.0,
    ),
}


def _seconds(options: Mapping[str, object], key: str) -> float:
    value = options.get(key, OPTIONS[key].default)
    default = OPTIONS[key].default
    assert isinstance(default, float)
    return float(value) if isinstance(value, int | float) else default


def _text(options: Mapping[str, object], key: str) -> str | None:
    value = options.get(key)
    return None if value is None else str(value)


def _secret(options: Mapping[str, object], key: str) -> Secret | None:
    value = options.get(key)
    return value if isinstance(value, Secret) else None


def _without_login(url: str) -> tuple[str, tuple[str, Secret] | None]:
    """``url`` without the user and password written into it, and those (None: none)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    login = (
        urllib.parse.unquote(parts.username),
        Secret(urllib.parse.unquote(parts.password or "")),
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), login


@dataclass(frozen=True)
class GocdSettings:
    """A gocd manager's validated keys; what is not set has its declared default."""

    url: str | None
    user: str | None
    passwd: Secret | None
    token: Secret | None
    poll_interval: float
    ca_file: str | None
    verify: bool
    hold_max: float
    duplicate_window: float
    """0: no de-duplication."""
    reconcile: bool
    """Whether a stage run with no mail has its alert made from GoCD's API."""
    reconcile_after: float
    reconcile_window: float

    @classmethod
    def of(cls, options: Mapping[str, object]) -> GocdSettings:
        """The settings in a manager's options (as :mod:`mail2alert.config` validated them)."""
        verify = options.get("verify", OPTIONS["verify"].default)
        reconcile = options.get("reconcile", OPTIONS["reconcile"].default)
        url, user, passwd = (
            _text(options, "url"),
            _text(options, "user"),
            _secret(options, "passwd"),
        )
        token = _secret(options, "token")
        if url is not None:
            # A login written into the URL (https://user:password@host/go) works as user and
            # passwd do; kept in the URL it would be in every log line and error naming it.
            url, login = _without_login(url)
            if login is not None and user is None and token is None:
                user, passwd = login
        return cls(
            url=url,
            user=user,
            passwd=passwd,
            token=token,
            poll_interval=_seconds(options, "poll-interval"),
            ca_file=_text(options, "ca-file"),
            verify=bool(verify),
            hold_max=_seconds(options, "hold-max"),
            duplicate_window=_seconds(options, "duplicate-window"),
            reconcile=bool(reconcile),
            reconcile_after=_seconds(options, "reconcile-after"),
            reconcile_window=_seconds(options, "reconcile-window"),
        )


def hold_max(options: Mapping[str, object]) -> float:
    """How long mail of this manager may wait for pipeline groups."""
    return GocdSettings.of(options).hold_max
