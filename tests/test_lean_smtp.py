"""The lean SMTP session behaves exactly as aiosmtpd's own, only faster."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
from aiosmtpd.smtp import SMTP

from mail2alert.server import LeanSMTP


class _Handler:
    async def handle_DATA(self, *args: object) -> str:
        return "250 OK"


@pytest.fixture
def sessions() -> Iterator[tuple[SMTP, LeanSMTP]]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield SMTP(_Handler()), LeanSMTP(_Handler())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _addresses(seed: int, count: int) -> Iterator[str]:
    """Plain addresses with parameters, and random junk built from SMTP's special characters."""
    rnd = random.Random(seed)
    yield from [
        "<go@example.com>",
        "<go@example.com> SIZE=123 BODY=8BITMIME",
        "<>",
        "<> SIZE=1",
        "go@example.com",
        '<"quoted local"@example.com>',
        "<a@[127.0.0.1]>",
        "<bad",
        "<@route:a@b.c>",
        "",
        "<a@b>extra",
        "<a@b>\tSIZE=1",
        "<ü@example.com>",
        "<a..b@c>",
        "<.a@b>",
        "<a@b..c>",
        "<a@b> \r\n x",
        "<a@b> (comment) SIZE=1",
    ]
    specials = 'ab.@<>- \t+=_"()[]:;,\\ü\r\n'
    for _ in range(count):
        yield "".join(rnd.choice(specials) for _ in range(rnd.randint(0, 20)))
        local = "".join(rnd.choice("abc.-+_!#/{}'") for _ in range(rnd.randint(1, 8)))
        domain = "".join(rnd.choice("abc.-_") for _ in range(rnd.randint(1, 8)))
        tail = rnd.choice(["", " SIZE=1", "\tX", "  Y=2 ", "x", " \t", " (c) X", " A=(b)"])
        yield f"{rnd.choice(['', ' ', chr(9)])}<{local}@{domain}>{tail}"


def test_addresses_parse_exactly_as_aiosmtpd_parses_them(
    sessions: tuple[SMTP, LeanSMTP],
) -> None:
    original, lean = sessions
    for arg in _addresses(seed=7, count=3000):
        assert _outcome(lean, arg) == _outcome(original, arg), repr(arg)


def _outcome(session: SMTP, arg: str) -> object:
    """What parsing gives, or the exception it raises (aiosmtpd's parser trips on some junk)."""
    try:
        return session._getaddr(arg)
    except Exception as exc:  # noqa: BLE001 - the very thing compared
        return type(exc)


def test_the_same_commands_and_auth_mechanisms_are_found(
    sessions: tuple[SMTP, LeanSMTP],
) -> None:
    original, lean = sessions
    assert lean._smtp_methods.keys() == original._smtp_methods.keys()
    assert lean._auth_methods.keys() == original._auth_methods.keys()
    assert lean._handle_hooks.keys() == original._handle_hooks.keys()
