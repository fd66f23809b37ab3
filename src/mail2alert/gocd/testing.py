"""Helpers for tests that need GoCD: stage mails as GoCD writes them, and a fake GoCD server.

Everything here uses real sockets on loopback; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import itertools
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mail2alert.testing import LoopbackHttp, free_port

#: Numbers the mails :func:`gocd_stage_mail` makes, as JavaMail's Message-IDs do.
_MAILS = itertools.count(1)


def gocd_stage_mail(
    subject: str = "Stage [my-pipeline/6/my-stage/1] is broken",
    *,
    to: str = "mail2alert@example.com",
    sender: str = "go@example.com",
    body: str | None = None,
    message_id: str | None = None,
) -> bytes:
    """A stage notification mail as GoCD's JavaMail writes it (CRLF line endings): a
    ``Date`` and a ``Message-ID`` of its own, ``<hash.counter.millis@domain-of-sender>``,
    unless ``message_id`` is given."""
    if message_id is None:
        millis = time.time_ns() // 1_000_000
        message_id = f"<1361960727.{next(_MAILS)}.{millis}@{sender.rpartition('@')[2]}>"
    text = (
        body
        if body is not None
        else (
            "See details: https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1\n\n"
            "-- CHANGES --\n\nGit: https://git.example.com/app.git\n"
            "revision: 1f5557f8a1c3, modified by Jane Doe <jane@example.com> on 2024-03-15\n"
            "Fix flaky test in payment module\n\nSent by Go on behalf of ci-robot\n"
        )
    )
    headers = [
        f"From: {sender}",
        f"Sender: {sender}",
        f"Reply-To: {sender}",
        f"To: {to}",
        f"Date: {email.utils.format_datetime(datetime.datetime.now(datetime.UTC))} (UTC)",
        f"Message-ID: {message_id}",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + text.replace("\n", "\r\n")).encode("ascii")


@dataclass(frozen=True)
class FakeMailServer:
    """GoCD's email server settings (``tls``: "Use SMTPS")."""

    hostname: str
    port: int
    tls: bool = False
    sender_email: str = "go@example.com"
    admin_email: str = "admin@example.com"


#: The one notification filter that sends every stage event of every pipeline.
EVERY_EVENT = {
    "pipeline": "[Any Pipeline]",
    "stage": "[Any Stage]",
    "event": "All",
    "match_commits": False,
}


@dataclass
class FakeAccount:
    """What the fake GoCD says of the user it is asked as and of its mail server: by
    default, a user set up as README "Setting up GoCD" says, and no mail server set up.
    ``security`` off makes GoCD answer 403 for the current user, as it does to everyone
    then."""

    email: str = "mail2alert@example.com"
    email_me: bool = True
    filters: list[dict[str, Any]] = field(default_factory=lambda: [dict(EVERY_EVENT)])
    mail_server: FakeMailServer | None = None
    security: bool = True


class FakeGoCD:
    """A GoCD server on loopback that answers the way GoCD does (see shared gocd.md).

    It serves the three pipeline-group endpoints in GoCD's payload shapes, cctray.xml (with
    its XML declaration, a row per job and the Breakers of failed rows) and each stage's
    history. Like GoCD it matches the vendor Accept header exactly (a parameter or a wrong
    version is a 404), answers 401 with ``WWW-Authenticate`` on every path to wrong
    credentials (basic or bearer), sends ETags (with Jetty's ``--gzip`` suffix when it
    gzips) and answers If-None-Match with 304.
    ``endpoints`` limits which endpoints exist (the others answer 404, like an old or a
    restricted GoCD); ``admin_forbidden`` makes the admin API answer 403, as for a non-admin,
    and ``group_admin_of`` makes the user an admin of those groups only: like a full admin it
    may read the admin API, which shows it, as GoCD does, every group it can view (here all
    of them, as the dashboard). ``history`` gives the results of a stage's runs, newest
    first (GoCD's ``Passed``, ``Failed``, ``Cancelled``, ``Unknown`` for one still running); a stage
    without one has a single run, as its cctray row says; :meth:`complete` runs one more.
    :attr:`material_revisions` are the changes the pipeline instance API shows of a
    pipeline run. :attr:`starting` makes the
    dashboard answer 202 and every other endpoint 503, as GoCD does while it starts.
    ``stop()`` and ``start()`` again keep the port, to play a GoCD that goes down. With
    ``tls`` (a server SSL context) it speaks HTTPS.

    The user it is asked as, its notification filters and GoCD's mail server are
    :attr:`account` (a :class:`FakeAccount`); the mail server API, like GoCD's, answers 403
    to anyone but a system admin (``admin_forbidden``, ``group_admin_of``).

    Faults while it runs: :attr:`delay` seconds before each answer (a slow GoCD; lowering
    it ends the waits under way), :attr:`failing` a status every request gets instead (503
    while GoCD restarts); 0 and None by default.
    """

    ACCEPT: ClassVar[dict[str, tuple[str, ...]]] = {
        "admin": ("application/vnd.go.cd.v1+json", "application/vnd.go.cd+json"),
        "dashboard": ("application/vnd.go.cd.v4+json", "application/vnd.go.cd+json"),
        "history": ("application/vnd.go.cd.v3+json", "application/vnd.go.cd+json"),
        "instance": ("application/vnd.go.cd.v1+json", "application/vnd.go.cd+json"),
        "current_user": ("application/vnd.go.cd.v1+json", "application/vnd.go.cd+json"),
        "filters": ("application/vnd.go.cd.v2+json", "application/vnd.go.cd+json"),
        "mailserver": ("application/vnd.go.cd.v1+json", "application/vnd.go.cd+json"),
    }
    VERSIONS: ClassVar[dict[str, str]] = {
        "admin": "v1",
        "dashboard": "v4",
        "history": "v3",
        "instance": "v1",
        "current_user": "v1",
        "filters": "v2",
        "mailserver": "v1",
    }

    def __init__(
        self,
        groups: dict[str, list[str]],
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        endpoints: tuple[str, ...] = (
            "admin",
            "dashboard",
            "legacy",
            "cctray",
            "history",
            "instance",
            "current_user",
            "filters",
            "mailserver",
        ),
        admin_forbidden: bool = False,
        group_admin_of: tuple[str, ...] | None = None,
        cctray: dict[tuple[str, str], str] | None = None,
        history: dict[tuple[str, str], list[str]] | None = None,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.groups = groups
        self.user = user
        self.password = password
        self.token = token
        self.endpoints = endpoints
        self.admin_forbidden = admin_forbidden
        self.group_admin_of = group_admin_of
        self.cctray = cctray or {}
        self.history = history or {}
        self.completed: dict[tuple[str, str], float] = {}
        """When each stage's latest run completed (cctray's lastBuildTime); 2024 without."""
        self.material_revisions: dict[tuple[str, int], list[Any]] = {}
        """The pipeline instance API's ``build_cause.material_revisions`` of a pipeline run;
        a run without them is unknown (404)."""
        self.starting = False
        self.account = FakeAccount()
        self.port = port or free_port()
        self.requests: list[tuple[str, str, int]] = []
        self.if_none_match: list[str] = []
        """Each answered request's If-None-Match ("" without one), in :attr:`requests`' order."""
        self.changed = threading.Condition()
        self.delay = 0.0
        self.failing: int | None = None
        self.arrived = 0
        """Requests that came, answered or not yet (:attr:`requests` are the answered ones)."""
        self._http = LoopbackHttp(self.port, "fake-gocd", tls)

    @property
    def url(self) -> str:
        """The base URL a gocd manager's ``url`` is set to (https when serving TLS)."""
        scheme = "https" if self._http.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/go"

    def payload(self, endpoint: str) -> Any:
        """The JSON GoCD would send for ``endpoint`` with the current groups."""
        base = f"{self.url}/api"
        if endpoint == "admin":
            shown = self.groups
            return {
                "_links": {"self": {"href": f"{base}/admin/pipeline_groups"}},
                "_embedded": {
                    "groups": [
                        {
                            "_links": {"self": {"href": f"{base}/admin/pipeline_groups/{g}"}},
                            "name": g,
                            "authorization": {"view": {"users": [], "roles": []}},
                            "pipelines": [
                                {
                                    "_links": {"self": {"href": f"{base}/admin/pipelines/{p}"}},
                                    "name": p,
                                }
                                for p in ps
                            ],
                        }
                        for g, ps in shown.items()
                    ]
                },
            }
        if endpoint == "dashboard":
            return {
                "_links": {"self": {"href": f"{base}/dashboard"}},
                "_embedded": {
                    "pipeline_groups": [
                        {"name": g, "pipelines": list(ps), "can_administer": False}
                        for g, ps in self.groups.items()
                    ],
                    "pipelines": [],
                },
            }
        return [
            {
                "name": g,
                "pipelines": [
                    {"name": p, "label": "${COUNT}", "stages": [{"name": "build"}], "materials": []}
                    for p in ps
                ],
            }
            for g, ps in self.groups.items()
        ]

    def _authorized(self, header: str) -> bool:
        import base64

        if self.token is not None:
            scheme, _, value = header.partition(" ")
            return scheme.lower() == "bearer" and value == self.token
        if self.user is not None:
            expected = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
            return header == f"Basic {expected}"
        return True

    def _answer(
        self,
        endpoint: str,
        accept: str,
        auth: str,
        etag: str,
        *,
        gzip: bool = False,
        stage: tuple[str, str] = ("", ""),
    ) -> tuple[int, dict[str, str], str]:
        import hashlib
        import json

        if self.failing is not None:
            return self.failing, {"Content-Type": "text/plain"}, f"HTTP {self.failing}"
        if not self._authorized(auth):
            return (
                401,
                {"Content-Type": "application/json", "WWW-Authenticate": 'Basic realm="GoCD"'},
                '{"message": "You are not authenticated!"}',
            )
        if endpoint not in self.endpoints:
            return 404, {"Content-Type": "application/json"}, '{"message": "not found"}'
        if endpoint == "cctray":
            return 200, {"Content-Type": "application/xml; charset=utf-8"}, self.cctray_xml()
        wanted = self.ACCEPT.get(endpoint)
        if wanted is not None and accept not in wanted:
            return (
                404,
                {"Content-Type": "application/json"},
                ('{"message": "The url you are trying to reach appears to be incorrect."}'),
            )
        if endpoint == "admin" and self.admin_forbidden and not self.group_admin_of:
            return 403, {"Content-Type": "application/json"}, '{"message": "forbidden"}'
        if endpoint == "dashboard" and self.starting:
            return (
                202,
                {"Content-Type": "application/vnd.go.cd.v4+json; charset=utf-8"},
                '{"message": "Dashboard is being processed, this may take a few seconds."}',
            )
        if self.starting:
            return 503, {"Content-Type": "text/plain"}, "Service Unavailable"
        kind = self.VERSIONS.get(endpoint)
        ctype = f"application/vnd.go.cd.{kind}+json; charset=utf-8" if kind else "application/json"
        if endpoint in ("current_user", "filters", "mailserver"):
            status, payload = self._account_answer(endpoint)
            return status, {"Content-Type": ctype}, json.dumps(payload)
        if endpoint == "instance":
            revisions = self.material_revisions.get((stage[0], int(stage[1])))
            if revisions is None:
                return 404, {"Content-Type": ctype}, '{"message": "Not Found"}'
            build_cause = {"trigger_forced": False, "material_revisions": revisions}
            payload = {"name": stage[0], "counter": int(stage[1]), "build_cause": build_cause}
            return 200, {"Content-Type": ctype}, json.dumps(payload)
        if endpoint == "history":
            payload = self.stage_history(*stage)
            if payload is None:
                return 404, {"Content-Type": ctype}, '{"message": "Not Found"}'
            return 200, {"Content-Type": ctype}, json.dumps(payload)
        body = json.dumps(self.payload(endpoint))
        tag = hashlib.sha256(body.encode()).hexdigest()[:20]
        # Jetty's gzip handler marks the tag of what it gzipped, and takes the mark off an
        # If-None-Match before GoCD compares it.
        sent = f'"{tag}--gzip"' if gzip else f'"{tag}"'
        if etag.replace("--gzip", "") == f'"{tag}"':
            return 304, {"ETag": sent}, ""
        return 200, {"Content-Type": ctype, "ETag": sent}, body

    def complete(
        self,
        pipeline: str,
        stage: str,
        result: str,
        *,
        at: float | None = None,
        changes: list[Any] | None = None,
    ) -> str:
        """A new run of the stage completes with ``result`` (``Passed``, ``Failed``,
        ``Cancelled``) at ``at`` (now): cctray.xml and the stage history show it, as GoCD
        does once it has (or has not) sent its mail; ``changes`` are the pipeline run's
        material revisions. Its locator, as in a mail's subject."""
        key = (pipeline, stage)
        earlier = self.history.get(key)
        if earlier is None:
            earlier = [] if key not in self.cctray else [self._from_cctray(self.cctray[key])]
        self.history[key] = [result, *earlier]
        self.cctray[key] = "Success" if result == "Passed" else "Failure"
        self.completed[key] = time.time() if at is None else at
        if changes is not None:
            self.material_revisions[(pipeline, len(self.history[key]))] = changes
        return f"{pipeline}/{len(self.history[key])}/{stage}/1"

    @staticmethod
    def _from_cctray(status: str) -> str:
        return "Passed" if status == "Success" else "Failed"

    def _account_answer(self, endpoint: str) -> tuple[int, Any]:
        """The current user, its notification filters (v2 embeds them) or the mail server."""
        account, base = self.account, f"{self.url}/api"
        if endpoint == "current_user" and not account.security:
            # Security off: everyone is anonymous, and GoCD has no current user to show.
            return 403, {"message": "You are not authorized to perform this action."}
        if endpoint == "current_user":
            login = self.user or "mail2alert"
            return 200, {
                "_links": {"self": {"href": f"{base}/users/{login}"}},
                "login_name": login,
                "display_name": login,
                "enabled": True,
                "email": account.email or None,
                "email_me": account.email_me,
                "checkin_aliases": [],
            }
        if endpoint == "filters":
            filters = [
                {"_links": {"self": {"href": f"{base}/notification_filters/{i}"}}, "id": i, **f}
                for i, f in enumerate(account.filters, start=1)
            ]
            return 200, {
                "_links": {"self": {"href": f"{base}/notification_filters"}},
                "_embedded": {"filters": filters},
            }
        if self.admin_forbidden or self.group_admin_of is not None:
            return 403, {"message": "You are not authorized to perform this action."}
        server = account.mail_server
        if server is None:
            return 404, {"message": "SMTP config was not found!"}
        return 200, {
            "_links": {"self": {"href": f"{base}/config/mailserver"}},
            "hostname": server.hostname,
            "port": server.port,
            "username": None,
            "tls": server.tls,
            "sender_email": server.sender_email,
            "admin_email": server.admin_email,
        }

    def cctray_xml(self) -> str:
        """cctray.xml as GoCD writes it: a row per stage and one per job, failed rows naming
        who broke them."""
        from xml.sax.saxutils import quoteattr

        rows = []
        for (pipeline, stage), status in self.cctray.items():
            breakers = (
                '<messages><message text="Jane Doe" kind="Breakers"/></messages>'
                if status == "Failure"
                else ""
            )
            # The run's counter is its place in the stage history (see stage_history).
            counter = len(self.history.get((pipeline, stage), ())) or 1
            completed = self.completed.get((pipeline, stage), 1710520802.0)
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(completed))
            for name, url in (
                (
                    f"{pipeline} :: {stage}",
                    f"{self.url}/pipelines/{pipeline}/{counter}/{stage}/1",
                ),
                (
                    f"{pipeline} :: {stage} :: build",
                    f"{self.url}/tab/build/detail/{pipeline}/{counter}/{stage}/1/build",
                ),
            ):
                rows.append(
                    f'  <Project name={quoteattr(name)} activity="Sleeping" '
                    f'lastBuildStatus="{status}" lastBuildLabel="{counter}" '
                    f'lastBuildTime="{when}" webUrl={quoteattr(url)}>'
                    f"{breakers}</Project>"
                )
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n<Projects>\n'
            + "\n".join(rows)
            + "\n</Projects>"
        )

    def stage_history(self, pipeline: str, stage: str) -> Any:
        """GoCD's stage history (v3) of a stage, newest run first; None for a stage GoCD
        does not know."""
        key = (pipeline.lower(), stage.lower())
        known = {(p.lower(), s.lower()): runs for (p, s), runs in self.history.items()}
        from_cctray = {
            (p.lower(), s.lower()): [self._from_cctray(st)] for (p, s), st in self.cctray.items()
        }
        runs = known.get(key, from_cctray.get(key))
        if runs is None:
            return None
        stages = []
        for age, result in enumerate(runs):
            run: dict[str, Any] = {
                "name": stage,
                "counter": "1",
                "approval_type": "success",
                "approved_by": "changes",
                "result": result,
                "rerun_of_counter": None,
                "pipeline_name": pipeline,
                "pipeline_counter": len(runs) - age,
                "jobs": [{"name": "build", "result": result, "state": "Completed"}],
            }
            if result == "Cancelled":
                run["cancelled_by"] = "admin"
            stages.append(run)
        return {"stages": stages}

    def start(self) -> FakeGoCD:
        """Serve (again) on the fake's port."""
        import re

        from aiohttp import web

        paths = {
            "/go/api/admin/pipeline_groups": "admin",
            "/go/api/dashboard": "dashboard",
            "/go/api/config/pipeline_groups": "legacy",
            "/go/cctray.xml": "cctray",
            "/go/api/current_user": "current_user",
            "/go/api/notification_filters": "filters",
            "/go/api/config/mailserver": "mailserver",
        }
        history = re.compile(r"^/go/api/stages/([^/]+)/([^/]+)/history$")
        instance = re.compile(r"^/go/api/pipelines/([^/]+)/(\d+)$")

        async def handle(request: web.Request) -> web.Response:
            endpoint = paths.get(request.path, "unknown")
            found = history.match(request.path)
            if found:
                endpoint = "history"
            elif found := instance.match(request.path):
                endpoint = "instance"
            with self.changed:
                self.arrived += 1
                self.changed.notify_all()
            await self._slowly()
            gzip = "gzip" in request.headers.get("Accept-Encoding", "")
            status, headers, body = self._answer(
                endpoint,
                request.headers.get("Accept", ""),
                request.headers.get("Authorization", ""),
                request.headers.get("If-None-Match", ""),
                gzip=gzip,
                stage=(found[1], found[2]) if found else ("", ""),
            )
            with self.changed:
                self.requests.append((request.path, request.headers.get("Accept", ""), status))
                self.if_none_match.append(request.headers.get("If-None-Match", ""))
                self.changed.notify_all()
            response = web.Response(status=status, headers=headers, text=body or None)
            if gzip and body:
                response.enable_compression()
            return response

        self._http.start("GET", handle)
        return self

    async def _slowly(self) -> None:
        """Wait out :attr:`delay`, read again as time goes by so that lowering it ends the
        wait."""
        started = time.monotonic()
        # Polled, not an asyncio.Event: a test lowers the delay from its own thread.
        while time.monotonic() - started < self.delay:  # noqa: ASYNC110
            await asyncio.sleep(min(0.05, self.delay))

    def stop(self) -> None:
        """Stop answering; connections are refused until ``start()``."""
        delay, self.delay = self.delay, 0.0
        self._http.stop()
        self.delay = delay

    def wait_requests(self, path_part: str, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until ``count`` requests whose path contains ``path_part`` were answered."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: sum(path_part in p for p, _, _ in self.requests) >= count, timeout
            )
        if not ok:
            raise TimeoutError(f"expected {count} requests to {path_part}, got {self.requests}")

    def wait_arrived(self, count: int, timeout: float = 15.0) -> None:
        """Wait until ``count`` requests have come, answered or not."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.arrived >= count, timeout):
                raise TimeoutError(f"expected {count} requests, {self.arrived} came")

    def __enter__(self) -> FakeGoCD:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- fake chat services ------------------------------------------------------------------------
