"""The processes of ``mail2alert serve``: signals, the optional monitor, intake workers.

With ``intake-workers: N`` above 1, :func:`run` binds the listening sockets, checks the data
dir, then forks N intake processes that share the sockets (the kernel spreads connections
over them) and keeps delivery, the managers' background work and held mail in the
parent. SMTP intake is CPU
bound in Python, so this is how mail2alert uses more than one core. Intake processes tell
the parent about new mail through a pipe and learn new snapshots from
``data-dir``.

Each worker also has a link to the parent (a Unix socket pair). The parent drives every
reload through it, all or nothing: it validates the new file and binds a moved listener
itself, hands the text and the listener to every worker, and only when every worker has
prepared them does it tell them all to switch; if one cannot, none does. The link closing
tells a worker that the parent is gone (even by ``kill -9``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Protocol, TypeVar

from mail2alert.app import Role, Service, bind, warn_if_unreachable
from mail2alert.components import Change, Component, ReloadRefused
from mail2alert.config import Config, parse
from mail2alert.errors import ConfigError, Mail2AlertError, ServiceFailed, StartupError
from mail2alert.outbox import Outbox
from mail2alert.settings import HostPort

log = logging.getLogger(__name__)

T = TypeVar("T")


async def serve(
    config: Config,
    *,
    role: Role = "all",
    sockets: list[socket.socket] | None = None,
    wake_fd: int | None = None,
    link: socket.socket | None = None,
    monitor: tuple[str, int] | None = None,
    ready: Callable[[Service], None] = lambda s: None,
    name: str = "mail2alert",
    http_sockets: list[socket.socket] | None = None,
) -> None:
    """Run the service until SIGTERM or SIGINT; raise StartupError if it cannot start.

    ``link`` makes this process an intake worker of the main process at its other end;
    ``name`` is how its log lines name the process.
    """
    service = Service(
        config, role=role, sockets=sockets, wake_fd=wake_fd, name=name, http_sockets=http_sockets
    )
    if link is not None:
        service.add(ParentLink(link, service))
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM during start-up then stops the service cleanly.
    _handle_signals(loop, service, reloads=link is None)
    console = _start_monitor(monitor, service) if monitor else None
    try:
        await service.start()
        ready(service)
        await service.wait()
        if service.failure is not None:
            raise ServiceFailed(f"mail2alert stopped: {service.failure}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if console is not None:
            await _close_monitor(console)


_tasks: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` in the background, keeping a reference until it is done."""
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


#: What aiomonitor listens on at ``--monitor``'s port and the two after it.
_MONITOR_PORTS = ("the monitor", "the web UI", "the Python console")


def monitor_address(text: str) -> tuple[str, int]:
    """``--monitor HOST:PORT`` as (host, port): a loopback host whose three ports are free.

    Raises StartupError naming the address and what is wrong with it.
    """
    try:
        address = HostPort.parse(text, default_host="127.0.0.1")
    except ValueError:
        address = None
    if address is None:
        raise StartupError(f"--monitor {text!r}: expected HOST:PORT, e.g. 127.0.0.1:50101")
    highest = 65536 - len(_MONITOR_PORTS)
    if address.port > highest:
        raise StartupError(
            f"--monitor {address}: the console takes the port and the two after it,"
            f" so the port is at most {highest}"
        )
    hosts = _loopback_addresses(address)
    # aiomonitor binds in a thread of its own and, when a bind fails there, waits for that
    # thread forever: a port in use must be found here, or serve would hang instead.
    for offset, what in enumerate(_MONITOR_PORTS):
        for host in hosts:
            _try_bind(address, host, address.port + offset, what)
    return address.host, address.port


def _loopback_addresses(address: HostPort) -> list[str]:
    """The addresses ``address.host`` stands for; StartupError unless all are loopback.

    The console is a Python shell as the service user with every secret in reach, so only
    this machine may reach it: 127.0.0.0/8, ::1, or ``localhost`` when it resolves to them.
    """
    why = (
        "the debug console is a Python shell with every secret in reach, so it listens only on"
        " loopback (127.0.0.0/8, ::1 or localhost)"
    )
    found = [address.host]
    if address.host.lower() == "localhost":
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise StartupError(
                f"--monitor {address}: cannot resolve localhost ({exc.strerror})"
            ) from None
        found = sorted({str(info[4][0]) for info in infos})
    for host in found:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name other than localhost: whatever it resolves to, not that
        if not loopback:
            where = f"localhost resolves to {host}, which" if host != address.host else host
            raise StartupError(f"--monitor {address}: {where} is not loopback; {why}")
    return found


def _try_bind(address: HostPort, host: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As asyncio and aiohttp bind: a port whose connections are still closing is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"--monitor {address}: port {port} ({what}) cannot be used on {host}:"
                f" {exc.strerror}"
            ) from None


def _start_monitor(address: tuple[str, int], service: Service) -> Any:
    """aiomonitor on ``address`` (telnet), its web UI on port+1, console on port+2."""
    import aiomonitor

    host, port = address
    try:
        console = aiomonitor.start_monitor(
            asyncio.get_running_loop(),
            host=host,
            port=port,
            webui_port=port + 1,
            console_port=port + 2,
            locals={"service": service, "config": service.config},
        )
    except OSError as exc:
        raise StartupError(f"cannot start the monitor on {host}:{port}: {exc}") from None
    log.info(
        "aiomonitor on %s:%d: `python -m aiomonitor.cli -H %s -p %d` (web UI on port %d)",
        host,
        port,
        host,
        port,
        port + 1,
    )
    return console


async def _close_monitor(console: Any) -> None:
    """Stop aiomonitor without blocking this loop.

    Its close() waits for its thread, and that thread closes an open Python console by
    running a coroutine on this loop: called here directly, the two would wait for each other
    and the process would never exit.
    """
    await asyncio.get_running_loop().run_in_executor(None, console.close)


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _handle_signals(
    loop: asyncio.AbstractEventLoop, service: Service, *, reloads: bool = True
) -> None:
    """SIGTERM/SIGINT stop, SIGHUP reloads; then let through any that waited.

    An intake worker does not reload by itself (the main process drives every reload, so that
    all processes switch or none): a SIGHUP sent to the whole group reaches the main process
    too.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    if reloads:
        loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(service.reload()))
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: _ignored_hup(service.name))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def _ignored_hup(name: str) -> None:
    log.info("%s: reloads come from the main process (%d)", name, os.getppid())


def worker_name(number: int, pid: int) -> str:
    """How log lines name intake worker ``number`` (1, 2, ...)."""
    return f"intake-{number} (pid {pid})"


def run(config: Config, *, monitor: str | None = None) -> int:
    """``mail2alert serve``: run until SIGTERM/SIGINT; the exit code. Raises StartupError.

    ``monitor`` (``host:port``) starts the aiomonitor console in the main process.
    """
    monitor_at = monitor_address(monitor) if monitor else None
    # Held back until each process's event loop has its handlers (forked workers inherit the
    # mask): a SIGTERM or SIGHUP that comes early is then handled, not fatal.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    sockets = bind(config.local_smtp)
    http: list[socket.socket] = []
    try:
        # Bound before forking, like local-smtp: a busy port ends serve before anything runs.
        if config.http is not None:
            try:
                http = bind(config.http.address)
            except StartupError as exc:
                raise StartupError(f"http: {exc}") from None
        Outbox(config.data_dir).close()  # fail now, before forking, if data-dir is unusable
    except Mail2AlertError as exc:
        _close(sockets + http)
        if isinstance(exc, StartupError):
            raise
        raise StartupError(f"data-dir {str(config.data_dir)!r}: {exc}") from None
    http_sockets = http if config.http is not None else None
    bound = [sock.getsockname()[:2] for sock in sockets]
    warn_if_unreachable(bound)
    if config.intake_workers <= 1:
        _run_loop(serve(config, sockets=sockets, monitor=monitor_at, http_sockets=http_sockets))
        return 0
    # What exists now lives as long as the process. Kept out of the collector's sight, its
    # pages stay shared with the forked workers: each collection there would write to every
    # object's header, and the kernel would copy each page it wrote (about 20 MB of PSS).
    gc.collect()
    gc.freeze()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    links: dict[int, socket.socket] = {}
    names: dict[int, str] = {}
    for number in range(1, config.intake_workers + 1):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A worker keeps no end of another's link: each link's end must close with its owner;
        # nor the http listener, which is the main process's alone.
        inherited = (
            read_fd,
            ours.fileno(),
            *(s.fileno() for s in links.values()),
            *(s.fileno() for s in http),
        )
        pid = _fork_intake(config, sockets, inherited, write_fd, theirs, number)
        theirs.close()
        ours.setblocking(False)
        links[pid] = ours
        names[pid] = worker_name(number, pid)
    os.close(write_fd)
    for sock in sockets:
        sock.close()
    where = ", ".join(str(HostPort(host, port)) for host, port in bound)
    return _run_loop(
        _supervise(config, links, names, where, read_fd, monitor_at, http_sockets=http_sockets)
    )


class Woken(Protocol):
    """What :func:`woken` tells (:meth:`mail2alert.app.Service.woken`)."""

    def woken(self, told: bytes) -> None: ...


def woken(read_fd: int, service: Woken, ended: Callable[[], object] = lambda: None) -> None:
    """The wake pipe is readable: hand what the intake workers wrote to ``service``.

    Once every worker has closed its end (they stopped), ``ended`` is called instead: a pipe
    at its end stays readable, and the loop would call this over and over while delivery
    finishes.
    """
    try:
        told = os.read(read_fd, 4096)
    except BlockingIOError:
        told = b""
    else:
        if not told:
            ended()
            return
    service.woken(told)


def _fork_intake(
    config: Config,
    sockets: list[socket.socket],
    parent_fds: tuple[int, ...],
    wake_fd: int,
    link: socket.socket,
    number: int,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    name = worker_name(number, os.getpid())
    try:
        for fd in parent_fds:
            os.close(fd)
        _run_loop(
            serve(config, role="intake", sockets=sockets, wake_fd=wake_fd, link=link, name=name)
        )
        code = 0
    except BaseException:
        # A forked child must never return into the parent's code: log, then _exit below.
        log.exception("%s failed", name)
    finally:
        os._exit(code)


async def _supervise(
    config: Config,
    links: dict[int, socket.socket],
    names: Mapping[int, str],
    where: str,
    read_fd: int,
    monitor: tuple[str, int] | None,
    *,
    http_sockets: list[socket.socket] | None = None,
) -> int:
    """The parent: deliver, and stop everything when told to or when a worker dies."""
    service = Service(config, role="delivery", http_sockets=http_sockets)
    service.add(Workers(config, links, names))
    loop = asyncio.get_running_loop()
    alive = set(links)
    exit_code = 0

    async def reap() -> None:
        nonlocal exit_code
        while alive:
            # uvloop keeps SIGCHLD for itself, so a thread waits for the workers instead.
            pid, status = await loop.run_in_executor(None, os.wait)
            alive.discard(pid)
            if not service.stopping:
                code = os.waitstatus_to_exitcode(status)
                log.error("%s exited unexpectedly (%d); stopping", names.get(pid, pid), code)
                exit_code = 1
                service.request_stop()

    reaper = asyncio.create_task(reap())
    loop.add_reader(read_fd, woken, read_fd, service, partial(loop.remove_reader, read_fd))
    console = _start_monitor(monitor, service) if monitor else None
    _handle_signals(loop, service)
    try:
        await service.start()
        log.info(
            "mail2alert listening on %s with %d intake workers",
            where,
            len(links),
        )
        await service.stopped()
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        await reaper
        await service.stop()
        if service.failure is not None:
            log.error("mail2alert stopped: %s", service.failure)
            exit_code = 1
    finally:
        if console is not None:
            await _close_monitor(console)
        loop.remove_reader(read_fd)
        os.close(read_fd)
    return exit_code


#: How long the main process waits for each intake worker's answer during a reload.
WORKER_ANSWER = 10.0
#: The largest message on a link (a configuration file's text, as JSON).
_LINK_MESSAGE = 1 << 20


class Workers(Component):
    """The intake workers, seen from the main process: a reload switches all or none."""

    def __init__(
        self, config: Config, links: Mapping[int, socket.socket], names: Mapping[int, str]
    ) -> None:
        self.config = config
        self._links = links
        self._names = names
        self._sockets: list[socket.socket] = []
        self._asked = 0

    async def prepare(self, change: Change) -> None:
        new = change.config
        sockets: list[socket.socket] = []
        if new.local_smtp != self.config.local_smtp:
            # Bound here, once, and handed to every worker: a busy port refuses the reload
            # before any process has switched.
            try:
                sockets = bind(new.local_smtp)
            except StartupError as exc:
                raise ReloadRefused(str(exc)) from None
        question = {
            "op": "prepare",
            "path": new.path,
            "text": new.source,
            "stamp": list(new.stamp) if new.stamp else None,
        }
        refusals = [r for r in await self._ask_all(question, sockets) if r]
        if refusals:
            await self._ask_all({"op": "abort"})
            _close(sockets)
            raise ReloadRefused("; ".join(refusals))
        self._sockets = sockets

    async def switch(self, change: Change) -> None:
        self.config = change.config
        for failure in await self._ask_all({"op": "commit"}):
            if failure:
                log.error("%s (while switching to the new configuration)", failure)
        # Every worker has its own copy of the listener now.
        _close(self._sockets)
        self._sockets = []

    async def abort(self) -> None:
        await self._ask_all({"op": "abort"})
        _close(self._sockets)
        self._sockets = []

    async def stop(self) -> None:
        _close(list(self._links.values()))

    async def _ask_all(
        self, question: Mapping[str, object], sockets: Sequence[socket.socket] = ()
    ) -> list[str | None]:
        self._asked += 1
        asked = {**question, "id": self._asked}
        fds = [s.fileno() for s in sockets]
        return list(
            await asyncio.gather(
                *(self._ask(self._names[p], link, asked, fds) for p, link in self._links.items())
            )
        )

    @staticmethod
    async def _ask(
        name: str, link: socket.socket, question: Mapping[str, object], fds: list[int]
    ) -> str | None:
        """None when worker ``name`` did what it was asked, else why not."""
        try:
            socket.send_fds(link, [json.dumps(question).encode()], fds)
        except OSError as exc:
            return f"{name} cannot be told: {exc.strerror or exc}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WORKER_ANSWER
        while (remaining := deadline - loop.time()) > 0:
            try:
                raw = await asyncio.wait_for(loop.sock_recv(link, _LINK_MESSAGE), remaining)
            except TimeoutError:
                break
            except OSError as exc:
                return f"{name}: {exc.strerror or exc}"
            if not raw:
                return f"{name} is gone"
            answer = json.loads(raw)
            if answer.get("id") != question["id"]:
                continue  # a late answer to a question that timed out
            return None if answer.get("ok") else f"{name}: {answer.get('why')}"
        return f"{name} did not answer within {WORKER_ANSWER:.0f}s"


def _close(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


class ParentLink(Component):
    """In an intake worker: the link to the main process, which drives every reload. The
    link closing means the main process is gone (even by ``kill -9``): the worker stops."""

    def __init__(self, link: socket.socket, service: Service) -> None:
        self._link = link
        self._service = service
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._link.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._link.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self._link, _LINK_MESSAGE, 16)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._forget()
            if not self._service.stopping:
                log.warning("%s: the main process is gone; stopping", self._service.name)
            self._service.request_stop()
            return
        _spawn(self._answer(json.loads(data), fds))

    async def _answer(self, question: dict[str, Any], fds: list[int]) -> None:
        why: str | None = None
        if question["op"] == "prepare":
            why = await self._prepare(question, [socket.socket(fileno=fd) for fd in fds])
        elif question["op"] == "commit":
            await self._service.commit()
            log.info("%s: configuration reloaded", self._service.name)
        else:
            await self._service.abort()
        answer = {"id": question["id"], "ok": why is None, "why": why or ""}
        with contextlib.suppress(OSError):
            self._link.send(json.dumps(answer).encode())

    async def _prepare(self, question: dict[str, Any], sockets: list[socket.socket]) -> str | None:
        text = str(question["text"])
        try:
            new = parse(text, str(question["path"]), os.environ)
        except ConfigError as exc:
            why: str | None = f"the configuration does not load here ({len(exc.problems)} problems)"
        else:
            stamp = tuple(question["stamp"]) if question["stamp"] else None
            change = Change(replace(new, stamp=stamp, source=text), tuple(sockets) or None)
            why = await self._service.prepare(change)
        if why is not None:
            _close(sockets)
        return why

    def _forget(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._link.fileno())
            self._loop = None

    async def stop(self) -> None:
        self._forget()
        self._link.close()
