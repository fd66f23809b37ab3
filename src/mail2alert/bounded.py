"""Reading an HTTP answer without trusting its length: GoCD's, Slack's.

An answer that goes on without end (a server or a proxy gone wrong, a gzip bomb) must not
fill memory: the body is read a chunk at a time, after gzip, and given up past a limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

#: How much of an answer is read at a time.
CHUNK = 64 * 1024


class TooLong(ValueError):
    """An answer went on past the limit it was read up to; the rest was not read."""


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``response`` (unzipped). Raises TooLong when it goes on past ``limit``
    bytes (the rest is not read), and what aiohttp raises when the answer breaks off."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            raise TooLong(f"answered with more than {limit:,} bytes; the rest was not read")
    return bytes(body)
