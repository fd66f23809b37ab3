"""A big message goes out in blocks that add up to exactly what aiosmtplib's ``data()`` sends.

aiosmtplib is the oracle: its own line-ending and dot-stuffing of the whole message must
equal the blocks joined, for any bytes and any block size, and no block may cut a line.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from mail2alert.testing import CaptureServer
from mail2alert.transports.smtp import DATA_BLOCK, data_blocks
from tests.helpers import FAST_DELIVERY, compose, relay, strip_received


def as_aiosmtplib_sends_it(data: bytes) -> bytes:
    """What aiosmtplib writes after DATA, less the terminating dot line."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) if data else b""


def noisy(rng: random.Random, length: int) -> bytes:
    """Bytes rich in what the wire format cares about: CR, LF, dots, at line starts too."""
    return bytes(rng.choice(b"\r\n.\r\n.ab\x00\xff") for _ in range(length))


@pytest.mark.parametrize("seed", range(200))
def test_the_blocks_of_any_bytes_join_to_what_aiosmtplib_sends(seed: int) -> None:
    rng = random.Random(seed)
    data = noisy(rng, rng.randrange(0, 400))
    size = rng.randrange(1, 64)

    blocks = list(data_blocks(data, size))

    assert b"".join(blocks) == as_aiosmtplib_sends_it(data)
    assert all(block.endswith(b"\r\n") for block in blocks)


@pytest.mark.parametrize("seed", range(100))
def test_the_blocks_of_ordinary_mail_join_to_what_aiosmtplib_sends(seed: int) -> None:
    """Mostly CRLF lines of text, now and then a line that starts with a dot or ends in a
    bare LF or CR: the common case, which is not rebuilt when nothing in it must change."""
    rng = random.Random(seed)
    lines = [
        (b"." if rng.random() < 0.05 else b"")
        + bytes(rng.choice(b"abc .:") for _ in range(rng.randrange(0, 30)))
        + rng.choice([b"\r\n"] * 30 + [b"\n", b"\r"])
        for _ in range(rng.randrange(1, 40))
    ]
    data = b"".join(lines)

    blocks = list(data_blocks(data, rng.randrange(1, 200)))

    assert b"".join(blocks) == as_aiosmtplib_sends_it(data)


def test_a_carriage_return_before_the_line_feed_of_a_cut_stays_one_line_end() -> None:
    """The cut comes after the LF of a CRLF, never between the CR and the LF."""
    data = b"a" * 10 + b"\r\n" + b".b\r\n"

    blocks = list(data_blocks(data, 10))

    assert blocks == [b"a" * 10 + b"\r\n", b"..b\r\n"]


def test_a_last_line_without_its_end_is_ended() -> None:
    assert list(data_blocks(b"one\r\ntwo", 2)) == [b"one\r\n", b"two\r\n"]


def test_blocks_are_about_the_size_asked_for() -> None:
    """A line-cut at the first LF past ``size``: no block is much bigger than one line more."""
    data = b"0123456789\r\n" * 1000

    blocks = list(data_blocks(data, 100))

    assert {len(block) for block in blocks[:-1]} == {108}
    assert b"".join(blocks) == data


def test_the_blocks_of_a_big_message_have_their_long_lines_broken_one_block_at_a_time() -> None:
    line = b"." + b"x" * 2500 + b"\n"
    data = (b"short\n" + line) * (DATA_BLOCK // len(line) * 2)

    blocks = list(data_blocks(data))

    assert len(blocks) > 1
    wire = b"".join(blocks)
    assert max(map(len, wire.split(b"\r\n"))) <= 998  # a doubled leading dot included
    assert wire.replace(b"\r\n ", b"") == as_aiosmtplib_sends_it(data)


def big(subject: str, size: int = 3 * DATA_BLOCK) -> bytes:
    """A mail of ``size`` bytes or more, with dot-started lines and a bare LF or two."""
    block = b".a line that starts with a dot\r\nan ordinary line.\nand one more\r\n" * 8
    head = compose(subject=subject, sender="someone@example.net", body="")
    return head + block * ((size - len(head)) // len(block) + 1)


def test_a_big_message_refused_at_its_end_is_dead_and_the_next_is_delivered_byte_for_byte(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """A 5xx after the last block is the answer about the item, and the one connection
    delivers the next big message, dots and all."""
    upstream.refuse_data("552 5.3.4 message too big for this system")
    with relay(tmp_path, upstream, [], delivery={**FAST_DELIVERY, "connections": 1}) as m2a:
        refused = m2a.send(big("too big"), mail_from="someone@example.net")
        dead = m2a.outbox.wait_state(refused.queue_id, "dead")
        original = big("fine")
        accepted = m2a.send(original, mail_from="someone@example.net")
        m2a.outbox.wait_state(accepted.queue_id, "done")
        (got,) = upstream.wait_for(1)

    assert "552 5.3.4 message too big" in dead["last_error"]
    assert strip_received(got.data)[1] == original.replace(b".\n", b".\r\n")
