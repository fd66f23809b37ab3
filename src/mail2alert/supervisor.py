"""The processes of ``mail2alert serve``: signals, the optional monitor, intake workers.

With ``intake-workers: N`` above 1, :func:`run` binds the listening sockets, checks the data
dir, then forks N intake processes that share the sockets (the kernel spreads connections
over them) and keeps delivery, GoCD polling and held mail in the parent. SMTP intake is CPU
bound in Python, so this is how mail2alert uses more than one core. Intake processes tell
the parent about new mail through a pipe, learn new GoCD snapshots from ``data-dir``, and stop
when a second pipe (the lifeline) tells them the parent is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mail2alert.app import Role, Service, bind, warn_if_unreachable
from mail2alert.config import Config
from mail2alert.errors import Mail2AlertError, ServiceFailed, StartupError
from mail2alert.outbox import Outbox

log = logging.getLogger(__name__)

T = TypeVar("T")


async def serve(
    config: Config,
    *,
    role: Role = "all",
    sockets: list[socket.socket] | None = None,
    wake_fd: int | None = None,
    lifeline_fd: int | None = None,
    monitor: tuple[str, int] | None = None,
    ready: Callable[[Service], None] = lambda s: None,
) -> None:
    """Run the service until SIGTERM or SIGINT; raise StartupError if it cannot start."""
    service = Service(config, role=role, sockets=sockets, wake_fd=wake_fd, lifeline_fd=lifeline_fd)
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM during start-up then stops the service cleanly.
    _handle_signals(loop, service)
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
            console.close()


_tasks: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` in the background, keeping a reference until it is done."""
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _monitor_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65534:
        raise StartupError(f"--monitor {text!r}: expected HOST:PORT, e.g. 127.0.0.1:50101")
    return host.strip("[]") or "127.0.0.1", int(port)


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
        "aiomonitor on %s:%d: `nc %s %d` (web UI on port %d)", host, port, host, port, port + 1
    )
    return console


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


def _handle_signals(loop: asyncio.AbstractEventLoop, service: Service) -> None:
    """SIGTERM/SIGINT stop, SIGHUP reloads; then let through any that waited."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(service.reload()))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def run(config: Config, *, monitor: str | None = None) -> int:
    """``mail2alert serve``: run until SIGTERM/SIGINT; the exit code. Raises StartupError.

    ``monitor`` (``host:port``) starts the aiomonitor console in the main process.
    """
    monitor_at = _monitor_address(monitor) if monitor else None
    # Held back until each process's event loop has its handlers (forked workers inherit the
    # mask): a SIGTERM or SIGHUP that comes early is then handled, not fatal.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    sockets = bind(config.local_smtp)
    try:
        Outbox(config.data_dir).close()  # fail now, before forking, if data-dir is unusable
    except Mail2AlertError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(f"data-dir {str(config.data_dir)!r}: {exc}") from None
    warn_if_unreachable([sock.getsockname()[:2] for sock in sockets])
    if config.intake_workers <= 1:
        _run_loop(serve(config, sockets=sockets, monitor=monitor_at))
        return 0
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    # The workers watch the lifeline's read end: it reaches EOF when this process dies.
    lifeline_r, lifeline_w = os.pipe()
    children = [
        _fork_intake(config, sockets, (read_fd, lifeline_w), write_fd, lifeline_r)
        for _ in range(config.intake_workers)
    ]
    os.close(write_fd)
    os.close(lifeline_r)
    for sock in sockets:
        sock.close()
    try:
        return _run_loop(_supervise(config, children, read_fd, monitor_at))
    finally:
        os.close(lifeline_w)


def _fork_intake(
    config: Config,
    sockets: list[socket.socket],
    parent_fds: tuple[int, ...],
    wake_fd: int,
    lifeline_fd: int,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd in parent_fds:
            os.close(fd)
        _run_loop(
            serve(config, role="intake", sockets=sockets, wake_fd=wake_fd, lifeline_fd=lifeline_fd)
        )
        code = 0
    except BaseException:
        # A forked child must never return into the parent's code: log, then _exit below.
        log.exception("intake worker %d failed", os.getpid())
    finally:
        os._exit(code)


async def _supervise(
    config: Config, children: list[int], read_fd: int, monitor: tuple[str, int] | None
) -> int:
    """The parent: deliver, and stop everything when told to or when a worker dies."""
    service = Service(config, role="delivery")
    loop = asyncio.get_running_loop()
    alive = set(children)
    exit_code = 0

    async def reap() -> None:
        nonlocal exit_code
        while alive:
            # uvloop keeps SIGCHLD for itself, so a thread waits for the workers instead.
            pid, status = await loop.run_in_executor(None, os.wait)
            alive.discard(pid)
            if not service.stopping:
                code = os.waitstatus_to_exitcode(status)
                log.error("intake worker %d exited unexpectedly (%d); stopping", pid, code)
                exit_code = 1
                service.request_stop()

    def wake() -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(read_fd, 4096)
        if service.dispatcher is not None:
            service.dispatcher.wake()

    reaper = asyncio.create_task(reap())
    loop.add_reader(read_fd, wake)
    console = _start_monitor(monitor, service) if monitor else None
    _handle_signals(loop, service)
    try:
        await service.start()

        def forward_reload() -> None:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

        service.on_reload = forward_reload
        log.info(
            "mail2alert listening on %s with %d intake workers",
            config.local_smtp,
            len(children),
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
        else:
            log.info("mail2alert stopped")
    finally:
        if console is not None:
            console.close()
        loop.remove_reader(read_fd)
        os.close(read_fd)
    return exit_code
