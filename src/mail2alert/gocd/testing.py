"""Helpers for tests that need GoCD: stage mails as GoCD writes them, and a fake GoCD server.

Everything here uses real sockets on loopback; nothing is mocked.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any, ClassVar

from mail2alert.testing import LoopbackHttp, free_port


def gocd_stage_mail(
    subject: str = "Stage [my-pipeline/6/my-stage/1] is broken",
    *,
    to: str = "mail2alert@example.com",
    sender: str = "go@example.com",
    body: str | None = None,
) -> bytes:
    """A stage notification mail as GoCD's JavaMail writes it (CRLF line endings)."""
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
        "Message-ID: <1234.5678.JavaMail.go@ci.example.com>",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + text.replace("\n", "\r\n")).encode("ascii")


class FakeGoCD:
    """A GoCD server on loopback that answers the way GoCD does (see shared gocd.md).

    It serves the three pipeline-group endpoints in GoCD's payload shapes, enforcing the
    vendor Accept header (404 on a wrong version, as GoCD does) and auth (basic or bearer,
    401 when wrong), sends ETags and answers If-None-Match with 304, and serves cctray.xml.
    ``endpoints`` limits which endpoints exist (the others answer 404, like an old or a
    restricted GoCD); ``admin_forbidden`` makes the admin API answer 403, as for a non-admin.
    ``stop()`` and ``start()`` again keep the port, to play a GoCD that goes down. With
    ``tls`` (a server SSL context) it speaks HTTPS.
    """

    ACCEPT: ClassVar[dict[str, tuple[str, ...]]] = {
        "admin": ("application/vnd.go.cd.v1+json", "application/vnd.go.cd+json"),
        "dashboard": ("application/vnd.go.cd.v4+json", "application/vnd.go.cd+json"),
    }

    def __init__(
        self,
        groups: dict[str, list[str]],
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        endpoints: tuple[str, ...] = ("admin", "dashboard", "legacy", "cctray"),
        admin_forbidden: bool = False,
        cctray: dict[tuple[str, str], str] | None = None,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.groups = groups
        self.user = user
        self.password = password
        self.token = token
        self.endpoints = endpoints
        self.admin_forbidden = admin_forbidden
        self.cctray = cctray or {}
        self.port = port or free_port()
        self.requests: list[tuple[str, str, int]] = []
        self.changed = threading.Condition()
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
                        for g, ps in self.groups.items()
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
        self, endpoint: str, accept: str, auth: str, etag: str
    ) -> tuple[int, dict[str, str], str]:
        import hashlib
        import json

        if not self._authorized(auth):
            return (
                401,
                {"Content-Type": "application/json"},
                '{"message": "You are not authenticated!"}',
            )
        if endpoint not in self.endpoints:
            return 404, {"Content-Type": "application/json"}, '{"message": "not found"}'
        if endpoint == "cctray":
            projects = "".join(
                f'<Project name="{p} :: {s}" activity="Sleeping" lastBuildStatus="{st}" '
                f'lastBuildLabel="1" lastBuildTime="2024-03-15T16:40:02" webUrl="{self.url}"/>'
                for (p, s), st in self.cctray.items()
            )
            return 200, {"Content-Type": "application/xml"}, f"<Projects>{projects}</Projects>"
        wanted = self.ACCEPT.get(endpoint)
        if wanted is not None and accept.split(";")[0].strip() not in wanted:
            return (
                404,
                {"Content-Type": "application/json"},
                ('{"message": "The url you are trying to reach appears to be incorrect."}'),
            )
        if endpoint == "admin" and self.admin_forbidden:
            return 403, {"Content-Type": "application/json"}, '{"message": "forbidden"}'
        body = json.dumps(self.payload(endpoint))
        tag = '"' + hashlib.sha256(body.encode()).hexdigest()[:20] + '"'
        kind = {"admin": "v1", "dashboard": "v4"}.get(endpoint)
        ctype = f"application/vnd.go.cd.{kind}+json; charset=utf-8" if kind else "application/json"
        if etag == tag:
            return 304, {"ETag": tag}, ""
        return 200, {"Content-Type": ctype, "ETag": tag}, body

    def start(self) -> FakeGoCD:
        """Serve (again) on the fake's port."""
        from aiohttp import web

        paths = {
            "/go/api/admin/pipeline_groups": "admin",
            "/go/api/dashboard": "dashboard",
            "/go/api/config/pipeline_groups": "legacy",
            "/go/cctray.xml": "cctray",
        }

        async def handle(request: web.Request) -> web.Response:
            endpoint = paths.get(request.path, "unknown")
            status, headers, body = self._answer(
                endpoint,
                request.headers.get("Accept", ""),
                request.headers.get("Authorization", ""),
                request.headers.get("If-None-Match", ""),
            )
            with self.changed:
                self.requests.append((request.path, request.headers.get("Accept", ""), status))
                self.changed.notify_all()
            return web.Response(status=status, headers=headers, text=body or None)

        self._http.start("GET", handle)
        return self

    def stop(self) -> None:
        """Stop answering; connections are refused until ``start()``."""
        self._http.stop()

    def wait_requests(self, path_part: str, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until ``count`` requests whose path contains ``path_part`` were answered."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: sum(path_part in p for p, _, _ in self.requests) >= count, timeout
            )
        if not ok:
            raise TimeoutError(f"expected {count} requests to {path_part}, got {self.requests}")

    def __enter__(self) -> FakeGoCD:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- fake chat services ------------------------------------------------------------------------
