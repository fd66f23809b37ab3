"""GoCD's API, as far as mail2alert needs it: pipeline groups and cctray.xml.

Pipeline groups come from the first endpoint GoCD does not refuse, tried in this order and
remembered once one works:

1. ``GET /api/admin/pipeline_groups`` (``application/vnd.go.cd.v1+json``, GoCD >= 18.10, admins)
2. ``GET /api/dashboard`` (``application/vnd.go.cd.v4+json``, any user with view permission)
3. ``GET /api/config/pipeline_groups`` (legacy, GoCD < 20.3)

A refusal is 401, 403 or 404 (GoCD answers 404 for a wrong Accept version and sometimes for
failed auth). Credentials never appear in errors or logs.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mail2alert.errors import SourceError
from mail2alert.gocd.model import PipelineGroups
from mail2alert.model import Secret

if TYPE_CHECKING:
    import aiohttp


class GocdError(SourceError):
    """GoCD could not be read; the message names the URL and status, never credentials."""


@dataclass(frozen=True)
class Endpoint:
    """One way of reading pipeline groups from GoCD."""

    name: str
    path: str
    accept: str


ENDPOINTS = (
    Endpoint("admin", "/api/admin/pipeline_groups", "application/vnd.go.cd.v1+json"),
    Endpoint("dashboard", "/api/dashboard", "application/vnd.go.cd.v4+json"),
    Endpoint("legacy", "/api/config/pipeline_groups", "application/json"),
)
REFUSED = frozenset({401, 403, 404})


def parse_groups(payload: Any, *, source: str = "") -> PipelineGroups:
    """Pipeline groups from any of the three payload shapes; raises GocdError if none fits."""
    groups: dict[str, tuple[str, ...]] = {}
    try:
        if isinstance(payload, list):  # legacy: [{"name", "pipelines": [{"name"}]}]
            entries = payload
        elif "groups" in payload.get("_embedded", {}):  # admin API
            entries = payload["_embedded"]["groups"]
        elif "pipeline_groups" in payload.get("_embedded", {}):  # dashboard
            entries = payload["_embedded"]["pipeline_groups"]
        else:
            raise GocdError(f"{source or 'answer'}: not a pipeline-groups payload")
        for entry in entries:
            names = [p if isinstance(p, str) else p["name"] for p in entry.get("pipelines", [])]
            if not all(isinstance(n, str) for n in names) or not isinstance(entry["name"], str):
                raise GocdError(f"{source or 'answer'}: a group or pipeline name is not text")
            groups[entry["name"]] = tuple(names)
    except (AttributeError, KeyError, TypeError) as exc:
        raise GocdError(f"{source or 'answer'}: unexpected payload shape ({exc!r})") from None
    if not groups:
        raise GocdError(
            f"{source or 'answer'}: no pipeline groups (does the user have view rights?)"
        )
    return PipelineGroups(groups, fetched_at=time.time(), source=source)


def parse_cctray(text: str) -> dict[tuple[str, str], str]:
    """Last result per (pipeline, stage), lower case, from cctray.xml: passed or failed.

    Only two-part ``pipeline :: stage`` entries are stages; unknown statuses are skipped.
    """
    try:
        root = ET.fromstring(text)  # noqa: S314 - GoCD's own feed, fetched with credentials
    except ET.ParseError as exc:
        raise GocdError(f"cctray.xml is not valid XML: {exc}") from None
    results: dict[tuple[str, str], str] = {}
    for project in root.iter("Project"):
        parts = [p.strip() for p in project.get("name", "").split("::")]
        status = {"success": "passed", "failure": "failed"}.get(
            project.get("lastBuildStatus", "").lower()
        )
        if len(parts) == 2 and all(parts) and status:
            results[(parts[0].lower(), parts[1].lower())] = status
    return results


def ClientError() -> type[Exception]:
    """aiohttp's ClientError, imported on first use."""
    import aiohttp

    return aiohttp.ClientError


class GocdClient:
    """Reads pipeline groups and cctray.xml from one GoCD server."""

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        password: Secret | None = None,
        token: Secret | None = None,
        verify: bool = True,
        ca_file: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers: dict[str, str] = {}
        if token is not None:
            self._headers["Authorization"] = f"bearer {token.reveal()}"
        elif user is not None:
            pair = f"{user}:{password.reveal() if password else ''}".encode()
            self._headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"
        self._ssl: ssl.SSLContext | bool = True
        if ca_file:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        elif not verify:
            self._ssl = False
        self._timeout = timeout
        self._etags: dict[str, str] = {}
        self._last: PipelineGroups | None = None
        self.endpoint: Endpoint | None = None

    def _session(self) -> aiohttp.ClientSession:
        # Imported here: intake processes never talk HTTP and need not carry aiohttp.
        import aiohttp

        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers=self._headers,
        )

    async def pipeline_groups(self) -> PipelineGroups:
        """The current pipeline groups (the previous answer again on 304 Not Modified)."""
        order = [self.endpoint] if self.endpoint else []
        order += [e for e in ENDPOINTS if e is not self.endpoint]
        refusals: list[str] = []
        async with self._session() as session:
            for endpoint in order:
                status, body = await self._get(session, endpoint)
                if status in REFUSED:
                    refusals.append(f"{endpoint.path} {status}")
                    continue
                if status == 304 and self._last is not None and self.endpoint is endpoint:
                    return self._last
                if status != 200:
                    raise GocdError(f"{self.url}{endpoint.path} answered HTTP {status}")
                try:
                    payload = json.loads(body)
                except ValueError:
                    raise GocdError(
                        f"{self.url}{endpoint.path} answered with invalid JSON"
                    ) from None
                groups = parse_groups(payload, source=f"{self.url}{endpoint.path}")
                self.endpoint = endpoint
                self._last = groups
                return groups
        raise GocdError(f"{self.url} refused every pipeline-groups API: {', '.join(refusals)}")

    async def cctray(self) -> Mapping[tuple[str, str], str]:
        """Last result per stage from ``/cctray.xml``."""
        async with self._session() as session:
            status, body = await self._get(
                session, Endpoint("cctray", "/cctray.xml", "application/xml"), etag=False
            )
        if status != 200:
            raise GocdError(f"{self.url}/cctray.xml answered HTTP {status}")
        return parse_cctray(body)

    async def _get(
        self, session: aiohttp.ClientSession, endpoint: Endpoint, *, etag: bool = True
    ) -> tuple[int, str]:
        headers = {"Accept": endpoint.accept}
        if etag and endpoint.path in self._etags:
            headers["If-None-Match"] = self._etags[endpoint.path]
        target = f"{self.url}{endpoint.path}"
        try:
            async with session.get(target, headers=headers, ssl=self._ssl) as response:
                body = await response.text() if response.status == 200 else ""
                if etag and response.status == 200 and response.headers.get("ETag"):
                    self._etags[endpoint.path] = response.headers["ETag"]
                return response.status, body
        except (ClientError(), TimeoutError, UnicodeDecodeError, ssl.SSLError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            detail = getattr(exc, "strerror", None) or ""
            raise GocdError(f"{target} unreachable: {reason} {detail}".rstrip()) from None
