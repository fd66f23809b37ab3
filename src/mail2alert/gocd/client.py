"""GoCD's API, as far as mail2alert needs it: pipeline groups, cctray.xml, stage history.

Pipeline groups come from the first endpoint GoCD does not refuse, tried in this order and
remembered once one works:

1. ``GET /api/admin/pipeline_groups`` (``application/vnd.go.cd.v1+json``, GoCD >= 18.10, admins)
2. ``GET /api/dashboard`` (``application/vnd.go.cd.v4+json``, any user with view permission)
3. ``GET /api/config/pipeline_groups`` (legacy, GoCD < 20.3)

A refusal is 403 (not an admin) or 404 (GoCD's answer to an Accept version it does not
serve). A 401 is no refusal: GoCD answers it on every path before routing, so the next
endpoint would only be one more failed login (three a poll lock some LDAP accounts), and
every call raises it at once. A stage's latest run comes from
``GET /api/stages/:pipeline/:stage/history`` (``application/vnd.go.cd.v3+json``, GoCD >=
20.9). Credentials never appear in errors or logs.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

from mail2alert.bounded import TooLong, read_at_most
from mail2alert.errors import SourceError
from mail2alert.gocd.model import PipelineGroups, StageRun
from mail2alert.gocd.settings import GocdSettings
from mail2alert.model import Secret

if TYPE_CHECKING:
    import aiohttp


class GocdError(SourceError):
    """GoCD could not be read; the message names the URL and status, never credentials."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """GoCD's HTTP status, when it answered one."""


class AnswerTooLong(GocdError):
    """An answer went on past what a client reads (``answer_max``): not GoCD, or a broken
    proxy in front of it."""


class GocdStarting(GocdError):
    """GoCD answered that it is still starting (202 from its dashboard, 503 from its other
    endpoints): no failure."""


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
REFUSED = frozenset({403, 404})
UNAUTHORIZED = 401
#: GoCD's dashboard answers 202 until it has computed its first state after a start, and its
#: other endpoints 503.
STARTING = frozenset({202, 503})
HISTORY_ACCEPT = "application/vnd.go.cd.v3+json"
#: GoCD's pipeline instance API (``GET /api/pipelines/:name/:counter``): a run's changes.
INSTANCE_ACCEPT = "application/vnd.go.cd.v1+json"

#: What a stage run's ``result`` in the stage history says for the history: a cancelled run
#: (and one still running, ``Unknown``) says nothing.
_HISTORY_RESULTS = {"passed": "passed", "failed": "failed"}


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


_CCTRAY_STATUS = {"success": "passed", "failure": "failed"}
#: A pipeline or stage name as GoCD allows it.
_GOCD_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-.]*\Z")


def _cctray_projects(text: str | bytes) -> list[ET.Element]:
    """The ``Project`` rows of cctray.xml."""
    try:
        root = ET.fromstring(text)  # noqa: S314 - GoCD's own feed, fetched with credentials
    except (ET.ParseError, ValueError) as exc:
        raise GocdError(f"cctray.xml is not valid XML: {exc}") from None
    return list(root.iter("Project"))


def parse_cctray(text: str | bytes) -> dict[tuple[str, str], str]:
    """Last status per (pipeline, stage), as GoCD spells them, from cctray.xml: passed or
    failed.

    Only two-part ``pipeline :: stage`` entries are stages; unknown statuses are skipped.
    A ``Failure`` may be a cancelled run and a ``Success`` a run still building after a GoCD
    restart: these are hints, never results to remember (see :func:`parse_stage_history`).
    Bytes are what GoCD sends: they may begin with an XML declaration naming the encoding.
    """
    results: dict[tuple[str, str], str] = {}
    for project in _cctray_projects(text):
        parts = [p.strip() for p in project.get("name", "").split("::")]
        status = _CCTRAY_STATUS.get(project.get("lastBuildStatus", "").lower())
        if len(parts) == 2 and all(parts) and status:
            results[(parts[0], parts[1])] = status
    return results


def parse_cctray_runs(text: str | bytes) -> list[StageRun]:
    """The latest completed run of each stage in cctray.xml: its locator from ``webUrl``
    (``.../pipelines/<pipeline>/<counter>/<stage>/<counter>``) and when it completed
    (``lastBuildTime``).

    A stage that is building is left out: its row keeps the previous run's time and status
    while ``webUrl`` already names the run under way. GoCD writes the time in UTC with a
    ``Z``; older versions wrote it without a zone, which is read as UTC too.
    """
    runs: list[StageRun] = []
    for project in _cctray_projects(text):
        parts = [p.strip() for p in project.get("name", "").split("::")]
        if len(parts) != 2 or project.get("activity", "") != "Sleeping":
            continue
        url = project.get("webUrl", "")
        locator = url.rpartition("/pipelines/")[2].split("/")
        completed = _cctray_time(project.get("lastBuildTime", ""))
        if len(locator) != 4 or completed is None:
            continue
        pipeline, pc, stage, sc = locator
        if not (pc.isascii() and pc.isdigit() and sc.isascii() and sc.isdigit()):
            continue
        # Names as GoCD allows them, and a URL without white space: they go into the subject
        # and a body line of the mail made from them.
        if not (_GOCD_NAME.match(parts[0]) and _GOCD_NAME.match(parts[1])) or url.split() != [url]:
            continue
        if (pipeline.lower(), stage.lower()) != (parts[0].lower(), parts[1].lower()):
            continue
        status = _CCTRAY_STATUS.get(project.get("lastBuildStatus", "").lower(), "")
        runs.append(StageRun(parts[0], int(pc), parts[1], int(sc), completed, url, status))
    return runs


def _cctray_time(text: str) -> float | None:
    """Seconds since the epoch of a cctray ``lastBuildTime``; a time without a zone is UTC."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass(frozen=True)
class RunResult:
    """What GoCD's stage history says of one run: ``passed``, ``failed`` or ``cancelled``
    (None: still going, or not on the history's first page), and who cancelled it."""

    result: str | None
    cancelled_by: str = ""


def parse_run_result(
    payload: Any, pipeline_counter: int, stage_counter: int, *, source: str = ""
) -> RunResult:
    """The result of one run in GoCD's stage history (v3)."""
    try:
        for run in payload["stages"]:
            if int(run["pipeline_counter"]) != pipeline_counter:
                continue
            if int(run["counter"]) != stage_counter:
                continue
            result = str(run.get("result", "")).lower()
            if result not in ("passed", "failed", "cancelled"):
                return RunResult(None)
            who = " ".join(str(run.get("cancelled_by") or "").split())  # one line of the body
            return RunResult(result, who)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise GocdError(f"{source or 'answer'}: unexpected payload shape ({exc!r})") from None
    return RunResult(None)


#: Materials whose revisions GoCD's stage mail says were "completed on", naming no one:
#: a package's and a plugin SCM's (``Package : repo_pkg``, ``SCM : my-plugin-scm``).
_COMPLETED = {"package": "Package", "scm": "SCM", "pluggablescm": "SCM"}


def parse_changes(payload: Any, *, source: str = "") -> str:
    """The changes of a pipeline run, from GoCD's pipeline instance API, as GoCD's stage mail
    writes them under ``-- CHANGES --`` (so that they read, and name their committers, the
    same): a block per changed material, a ``revision:`` line per modification. Only a
    version control block says who ``modified`` it; an upstream pipeline's, a package's and
    a plugin SCM's say when it ``completed``."""
    blocks: list[str] = []
    try:
        for revision in payload["build_cause"]["material_revisions"]:
            if revision.get("changed") is False:
                continue
            material = revision["material"]
            kind = str(material.get("type") or "Material")
            dependency = kind.lower() in ("pipeline", "dependency")
            completed = _COMPLETED.get(kind.lower())
            what = str(material.get("description") or material.get("name") or "")
            if completed:
                lines = [f"{completed} : {what}"]
            else:
                lines = [f"{'Dependency' if dependency else kind}: {what}"]
            for change in revision.get("modifications") or []:
                when = _date(change.get("modified_time"))
                if dependency or completed:
                    lines.append(f"revision: {change['revision']}, completed on {when}")
                    if completed == "SCM":
                        lines += str(change.get("comment") or "").splitlines()
                    continue
                who = str(change.get("user_name") or "")
                lines.append(f"revision: {change['revision']}, modified by {who} on {when}")
                lines += str(change.get("comment") or "").splitlines()
            blocks.append("\n".join(lines))
    except (AttributeError, KeyError, TypeError) as exc:
        raise GocdError(f"{source or 'answer'}: unexpected payload shape ({exc!r})") from None
    return "\n\n".join(blocks)


def _date(millis: object) -> str:
    """A modification's time (milliseconds since the epoch) as GoCD's mail writes it (UTC)."""
    if not isinstance(millis, int | float):
        return "?"
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_stage_history(payload: Any, *, source: str = "") -> str | None:
    """The result of a stage's latest run that passed or failed, from GoCD's stage history
    (newest run first): ``passed``, ``failed``, or None when the page has neither.

    Cancelled runs are passed over, as a cancel never changes the result mail2alert
    remembers, and so are runs still going (``Unknown``).
    """
    try:
        for run in payload["stages"]:
            result = _HISTORY_RESULTS.get(str(run.get("result", "")).lower())
            if result is not None:
                return result
    except (AttributeError, KeyError, TypeError) as exc:
        raise GocdError(f"{source or 'answer'}: unexpected payload shape ({exc!r})") from None
    return None


def ClientError() -> type[Exception]:
    """aiohttp's ClientError, imported on first use."""
    import aiohttp

    return aiohttp.ClientError


#: The most of one answer a client reads (after gzip): a GoCD of thousands of pipelines
#: answers a few MB; a server or proxy that sends without end must not fill memory.
ANSWER_MAX = 64 * 1024 * 1024


class GocdClient:
    """Reads pipeline groups, cctray.xml and stage histories from one GoCD server.

    An answer longer than ``answer_max`` bytes (once unzipped) is a :class:`GocdError`.
    """

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
        answer_max: int = ANSWER_MAX,
    ) -> None:
        self.url = url.rstrip("/")
        self._answer_max = answer_max
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

    @classmethod
    def of(cls, settings: GocdSettings) -> Self:
        """A client for a gocd manager's settings (which have a url)."""
        assert settings.url is not None, "only a manager with a url has a client"
        return cls(
            settings.url,
            user=settings.user,
            password=settings.passwd,
            token=settings.token,
            verify=settings.verify,
            ca_file=settings.ca_file,
        )

    def _session(self) -> aiohttp.ClientSession:
        # Imported here: intake processes never talk HTTP and need not carry aiohttp.
        import aiohttp

        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers=self._headers,
        )

    async def pipeline_groups(self) -> PipelineGroups:
        """The current pipeline groups (the previous answer, fetched now, on 304)."""
        order = [self.endpoint] if self.endpoint else []
        order += [e for e in ENDPOINTS if e is not self.endpoint]
        refusals: list[str] = []
        async with self._session() as session:
            for endpoint in order:
                answer = await self._get(session, endpoint)
                target = f"{self.url}{endpoint.path}"
                if answer.status in REFUSED:
                    refusals.append(f"{endpoint.path} {answer.status}")
                    continue
                if answer.status == 304 and self._last is not None and self.endpoint is endpoint:
                    self._last = replace(self._last, fetched_at=time.time())
                    return self._last
                if answer.status in STARTING:
                    raise GocdStarting(
                        f"{target} answered HTTP {answer.status}: GoCD is starting",
                        status=answer.status,
                    )
                self._raise_unless_ok(target, answer.status)
                groups = parse_groups(_json(target, answer.body), source=target)
                self.endpoint = endpoint
                self._last = groups
                # Kept only now: a tag of an answer refused above would make GoCD answer
                # 304 to it for as long as that answer stays the same.
                if answer.etag:
                    self._etags[endpoint.path] = answer.etag
                return groups
        raise GocdError(f"{self.url} refused every pipeline-groups API: {', '.join(refusals)}")

    async def cctray(self) -> Mapping[tuple[str, str], str]:
        """Last status per stage from ``/cctray.xml`` (see :func:`parse_cctray`)."""
        return parse_cctray(await self._cctray_xml())

    async def cctray_runs(self) -> list[StageRun]:
        """The latest completed run of each stage in ``/cctray.xml`` (see
        :func:`parse_cctray_runs`)."""
        return parse_cctray_runs(await self._cctray_xml())

    async def _cctray_xml(self) -> bytes:
        async with self._session() as session:
            answer = await self._get(
                session, Endpoint("cctray", "/cctray.xml", "application/xml"), etag=False
            )
        self._raise_unless_ok(f"{self.url}/cctray.xml", answer.status)
        return answer.body

    async def run_result(self, run: StageRun) -> RunResult | None:
        """What the stage history says of ``run``; None where GoCD shows no stage history
        (before GoCD 20.9, or a stage gone)."""
        path = _history_path(run.pipeline, run.stage)
        async with self._session() as session:
            answer = await self._get(
                session, Endpoint("stage history", path, HISTORY_ACCEPT), etag=False
            )
        if answer.status in REFUSED:
            return None
        target = f"{self.url}{path}"
        self._raise_unless_ok(target, answer.status)
        return parse_run_result(
            _json(target, answer.body), run.pipeline_counter, run.stage_counter, source=target
        )

    async def changes(self, pipeline: str, counter: int) -> str:
        """The changes of a pipeline run (see :func:`parse_changes`); "" where GoCD does not
        show them (before GoCD 20.x, or a run gone)."""
        path = f"/api/pipelines/{quote(pipeline, safe='')}/{counter}"
        async with self._session() as session:
            answer = await self._get(
                session, Endpoint("pipeline instance", path, INSTANCE_ACCEPT), etag=False
            )
        if answer.status in REFUSED:
            return ""
        target = f"{self.url}{path}"
        self._raise_unless_ok(target, answer.status)
        return parse_changes(_json(target, answer.body), source=target)

    async def latest_results(self, stages: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The result of each stage's latest run that passed or failed, from GoCD's stage
        history; a stage GoCD does not show (gone, not viewable, GoCD < 20.9) is left out."""
        results: dict[tuple[str, str], str] = {}
        async with self._session() as session:
            for pipeline, stage in stages:
                path = _history_path(pipeline, stage)
                answer = await self._get(
                    session, Endpoint("stage history", path, HISTORY_ACCEPT), etag=False
                )
                if answer.status in REFUSED:
                    continue
                target = f"{self.url}{path}"
                self._raise_unless_ok(target, answer.status)
                result = parse_stage_history(_json(target, answer.body), source=target)
                if result is not None:
                    results[(pipeline, stage)] = result
        return results

    def _raise_unless_ok(self, target: str, status: int) -> None:
        if status == UNAUTHORIZED:
            raise GocdError(
                f"{target} answered HTTP {status}: GoCD does not accept the configured "
                "user and password (or token)",
                status=status,
            )
        if status != 200:
            raise GocdError(f"{target} answered HTTP {status}", status=status)

    async def _body(self, target: str, response: aiohttp.ClientResponse) -> bytes:
        """The body of ``response``, at most ``answer_max`` bytes of it. Raises AnswerTooLong
        past that, and what aiohttp raises when the answer breaks off."""
        try:
            return await read_at_most(response, self._answer_max)
        except TooLong as exc:
            raise AnswerTooLong(f"{target} {exc}") from None

    async def _get(
        self, session: aiohttp.ClientSession, endpoint: Endpoint, *, etag: bool = True
    ) -> Answer:
        headers = {"Accept": endpoint.accept}
        if etag and endpoint.path in self._etags:
            headers["If-None-Match"] = self._etags[endpoint.path]
        target = f"{self.url}{endpoint.path}"
        try:
            async with session.get(target, headers=headers, ssl=self._ssl) as response:
                body = await self._body(target, response) if response.status == 200 else b""
                return Answer(response.status, body, response.headers.get("ETag"))
        except (ClientError(), TimeoutError, ssl.SSLError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            detail = getattr(exc, "strerror", None) or ""
            raise GocdError(f"{target} unreachable: {reason} {detail}".rstrip()) from None


@dataclass(frozen=True)
class Answer:
    """What GoCD answered to one request."""

    status: int
    body: bytes
    """Only a 200's body is read."""
    etag: str | None


def _history_path(pipeline: str, stage: str) -> str:
    return f"/api/stages/{quote(pipeline, safe='')}/{quote(stage, safe='')}/history"


def _json(target: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise GocdError(f"{target} answered with invalid JSON") from None
