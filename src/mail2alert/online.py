"""``mail2alert check --online``: does everything the running service needs answer?

One :class:`Finding` per thing asked, in the order the service uses them: the upstream SMTP
server (connect, EHLO, STARTTLS and AUTH as configured; nothing is sent), each manager's
outside source (its type's ``probe``: GoCD for a gocd manager), and each chat destination
as far as it can be asked without posting (Slack's ``auth.test`` for the token; a TCP
connection for a webhook URL with a host of its own). Nothing here posts or sends a thing.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from mail2alert.actions import is_slack_web, mask
from mail2alert.config import Config
from mail2alert.transports.chat import check_slack_token
from mail2alert.transports.smtp import SmtpConnection

#: Apprise schemes whose URL names the host they post to (webhooks): reachable means a TCP
#: connection to it. Others (a hosted service named by the scheme) are not asked.
_WEBHOOKS = {"json": 80, "jsons": 443, "xml": 80, "xmls": 443, "form": 80, "forms": 443}


@dataclass(frozen=True)
class Finding:
    """One thing asked: whether it answered as the service needs, and what was found."""

    ok: bool
    what: str
    text: str

    def line(self) -> str:
        return f"{self.what}: OK ({self.text})" if self.ok else f"{self.what}: FAILED: {self.text}"


async def smtp(config: Config) -> Finding:
    """The upstream server: EHLO, STARTTLS and AUTH as configured, nothing sent."""
    failed = await SmtpConnection.to(
        config.upstream, timeout=config.delivery.timeout, local_hostname=socket.gethostname()
    ).check()
    what = f"remote-smtp {config.remote_smtp}"
    if failed:
        return Finding(False, what, failed)
    login = f", logged in as {config.upstream.user}" if config.upstream.user else ""
    return Finding(True, what, f"{config.upstream.tls}{login}")


async def sources(config: Config) -> list[Finding]:
    """Each manager's outside source, asked with the manager's own settings."""
    found = []
    for manager in config.routing:
        background = manager.type.background
        if background is None or background.probe is None:
            continue
        ok, text = await background.probe(manager.label, manager.options)
        found.append(Finding(ok, manager.label, text))
    return found


async def chats(config: Config) -> list[Finding]:
    """Each chat destination, as far as it can be asked without posting."""
    settings = config.chat_settings()
    found = []
    if any(is_slack_web(uri) for uri in settings.actions.values()) and settings.slack_token:
        ok, text = await check_slack_token(settings)
        found.append(Finding(ok, f"Slack Web API {settings.slack_api_url}", text))
    for uri in sorted(settings.actions.values()):
        if is_slack_web(uri):
            continue
        parts = urlsplit(uri)
        port = _WEBHOOKS.get(parts.scheme.lower())
        if port is None or not parts.hostname:
            found.append(Finding(True, mask(uri), "not asked: only a post would tell (send-test)"))
            continue
        found.append(await _reachable(mask(uri), parts.hostname, parts.port or port, settings))
    return found


async def _reachable(what: str, host: str, port: int, settings: object) -> Finding:
    timeout = getattr(settings, "timeout", 30.0)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        return Finding(False, what, f"cannot connect to {host}:{port}: {reason}")
    writer.close()
    return Finding(True, what, f"{host}:{port} takes connections (nothing posted)")


async def everything(config: Config) -> list[Finding]:
    """Every finding of ``check --online``, in order."""
    return [await smtp(config), *await sources(config), *await chats(config)]
