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


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body of ``response`` (unzipped), or None when it goes on past ``limit`` bytes
    (the rest is not read). Raises what aiohttp raises when the answer breaks off."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
