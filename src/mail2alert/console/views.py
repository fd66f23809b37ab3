"""What the console's pages show, made from typed records; pure (no I/O), so tested alone.

- :func:`config_sections`: the running configuration with every secret masked: a value of a
  ``secret`` key (:class:`~mail2alert.model.Secret`) is ``***``, an action is shown as
  :func:`~mail2alert.actions.mask` shows it everywhere, a URL's password is ``***``.
- :func:`hourly_chart`: alerts per hour over the last 24 hours as an SVG, stacked by kind.
- :func:`when`, :func:`ago`: times as the pages write them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from markupsafe import Markup, escape

from mail2alert.actions import mask
from mail2alert.config import Config
from mail2alert.model import Secret
from mail2alert.postqueue import duration
from mail2alert.routing import Manager


def when(at: float | None) -> str:
    """``2026-12-06 02:15:03 UTC`` ("" for None)."""
    if at is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def ago(at: float | None, now: float) -> str:
    """How long before ``now``: ``12s ago``, ``5m ago``, ``3h ago``, ``2d ago``."""
    if at is None:
        return ""
    seconds = now - at
    if seconds < 0:
        return f"in {duration(-seconds)}"
    return f"{duration(seconds)} ago"


def url_shown(url: str) -> str:
    """``url`` with the password of its user part, if any, as ``***``."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return "***"  # not a URL after all: nothing of it is sure to be harmless
    return url if not password else url.replace(f":{password}@", ":***@", 1)


# -- the configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One part of the configuration page: a title and its keys with the values shown."""

    title: str
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RuleShown:
    """One rule as the configuration page shows it."""

    number: int
    line: int
    text: str
    actions: tuple[str, ...]


@dataclass(frozen=True)
class ManagerShown:
    """One manager as the configuration page shows it, secrets masked."""

    label: str
    summary: str
    keys: tuple[tuple[str, str], ...]
    rules: tuple[RuleShown, ...]


def _yes(value: bool) -> str:
    return "true" if value else "false"


def config_sections(config: Config) -> list[Section]:
    """Every top-level key of ``config`` but ``managers``, grouped, secrets masked."""
    listener, upstream, delivery = config.listener, config.upstream, config.delivery
    smtp: list[tuple[str, str]] = [
        ("address", str(listener.address)),
        ("allowed-clients", ", ".join(str(n) for n in listener.allowed_clients)),
        ("max-message-size", f"{listener.max_message_size} bytes"),
        ("max-recipients", str(listener.max_recipients)),
        ("max-sessions", str(listener.max_sessions)),
        ("timeout", duration(listener.timeout)),
    ]
    if listener.tls is not None:
        smtp += [("tls.mode", listener.tls.mode), ("tls.cert", str(listener.tls.cert))]
        smtp += [("tls.key", str(listener.tls.key))]
    if listener.auth is not None:
        smtp += [("auth.users-file", str(listener.auth.users_file))]
        smtp += [("auth.required", _yes(listener.auth.required))]
    remote: list[tuple[str, str]] = [("address", str(upstream.address)), ("tls", upstream.tls)]
    remote += [("user", upstream.user)] if upstream.user else []
    remote += [("passwd", str(upstream.passwd))] if upstream.passwd is not None else []
    remote += [("ca-file", str(upstream.ca_file))] if upstream.ca_file else []
    remote += [("verify", _yes(upstream.verify))]
    remote += [("helo", upstream.helo)] if upstream.helo else []
    remote += [("sender", upstream.sender)] if upstream.sender else []
    http = config.http
    web: list[tuple[str, str]] = [("http", "null (no listener)")]
    if http is not None:
        web = [("address", str(http.address)), ("admin", _yes(http.admin))]
        web += [("users-file", str(http.users_file) if http.users_file else "none (no login)")]
    chat = [("slack-api-url", url_shown(config.slack_api_url))]
    chat += [("slack-token", str(config.slack_token))] if config.slack_token is not None else []
    return [
        Section(
            "Service",
            (
                ("data-dir", str(config.data_dir)),
                ("intake-workers", str(config.intake_workers)),
            ),
        ),
        Section("local-smtp", tuple(smtp)),
        Section("remote-smtp", tuple(remote)),
        Section(
            "delivery",
            (
                ("retry-initial", duration(delivery.retry_initial)),
                ("retry-max", duration(delivery.retry_max)),
                ("give-up-after", duration(delivery.give_up_after)),
                ("timeout", duration(delivery.timeout)),
                ("connections", str(delivery.connections)),
            ),
        ),
        Section("http", tuple(web)),
        Section(
            "history",
            (
                ("keep", duration(config.history.keep)),
                ("max-messages", str(config.history.max_messages)),
            ),
        ),
        Section("chat", tuple(chat)),
    ]


def _option_shown(manager: Manager, key: str, value: object) -> str:
    option = manager.type.options.get(key)
    if isinstance(value, Secret) or (option is not None and option.kind == "secret"):
        return "***"
    if isinstance(value, bool):
        return _yes(value)
    if option is not None and option.kind == "seconds" and isinstance(value, int | float):
        return duration(float(value)) if value else "0 (off)"
    return url_shown(str(value)) if "://" in str(value) else str(value)


def managers_shown(managers: Iterable[Manager]) -> list[ManagerShown]:
    """Each manager with its keys and rules, every action masked."""
    shown = []
    for m in managers:
        keys: list[tuple[str, str]] = []
        keys += [("messages-we-want to", ", ".join(m.wants_to))] if m.wants_to else []
        keys += [("messages-we-want from", ", ".join(m.wants_from))] if m.wants_from else []
        keys += [(k, _option_shown(m, k, v)) for k, v in sorted(m.options.items())]
        keys += [("fallback", ", ".join(mask(a) for a in m.fallback))] if m.fallback else []
        rules = tuple(
            RuleShown(i + 1, rule.line, m.rule_text(i), tuple(mask(a) for a in rule.actions))
            for i, rule in enumerate(m.rules)
        )
        shown.append(ManagerShown(m.label, m.type.summary, tuple(keys), rules))
    return shown


# -- the chart ----------------------------------------------------------------------------

#: Colours of the chart's kinds, in order (the first kinds by count get the first colours).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
HOURS = 24


@dataclass(frozen=True)
class Chart:
    """The chart's SVG, and its legend: each kind with its colour and its total."""

    svg: Markup
    legend: tuple[tuple[str, str, int], ...]
    total: int


def hour_of(at: float) -> int:
    """The start of the hour ``at`` is in (epoch seconds)."""
    return int(at // 3600 * 3600)


def hourly_chart(counts: Mapping[tuple[int, str], int], now: float) -> Chart:
    """A stacked bar per hour of the last :data:`HOURS` hours (the current one last), from
    counts by (start of the hour, kind); counts outside those hours are left out."""
    last = hour_of(now)
    hours = [last - 3600 * (HOURS - 1 - i) for i in range(HOURS)]
    wanted = set(hours)
    totals: dict[str, int] = {}
    for (hour, kind), count in counts.items():
        if hour in wanted:
            totals[kind] = totals.get(kind, 0) + count
    kinds = sorted(totals, key=lambda k: (-totals[k], k))
    colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kinds)}
    per_hour = [sum(counts.get((h, k), 0) for k in kinds) for h in hours]
    top = _nice(max(per_hour, default=0))
    width, height, left, bottom, bar = 720, 240, 36, 24, 26
    plot = height - bottom - 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}"'
        ' role="img" class="chart">',
        f"<title>Alerts per hour, last {HOURS} hours (UTC)</title>",
    ]
    for tick in (0, top // 2, top):
        y = 8 + plot - plot * tick / top
        parts.append(
            f'<line x1="{left}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    step = (width - left - 16) / HOURS  # room on the right for the last hour's label
    for i, hour in enumerate(hours):
        x = left + i * step + (step - bar) / 2
        y = 8 + plot
        for kind in kinds:
            count = counts.get((hour, kind), 0)
            if not count:
                continue
            h = plot * count / top
            y -= h
            tip = escape(f"{time.strftime('%H:00', time.gmtime(hour))} {kind}: {count}")
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar}" height="{h:.1f}"'
                f' fill="{colour[kind]}"><title>{tip}</title></rect>'
            )
        if i % 3 == 0 or i == HOURS - 1:
            label = time.strftime("%H:00", time.gmtime(hour))
            parts.append(
                f'<text x="{left + i * step + step / 2:.1f}" y="{height - 6}"'
                f' text-anchor="middle">{label}</text>'
            )
    parts.append("</svg>")
    legend = tuple((k, colour[k], totals[k]) for k in kinds)
    return Chart(Markup("".join(parts)), legend, sum(totals.values()))  # noqa: S704 - every text in it is escaped above


def _nice(value: int) -> int:
    """A round upper bound of the y axis, at least ``value`` (and at least 2)."""
    if value <= 2:
        return 2
    magnitude = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude
