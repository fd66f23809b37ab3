"""The command line: ``serve``, ``check``, ``capture``. The only place errors become exit codes.

Exit codes: 0 success, 1 invalid configuration or failed start, 2 wrong usage.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mail2alert import __version__, config, explain, logs, online, postqueue, sendtest
from mail2alert.errors import ConfigError, Mail2AlertError, StartupError, UsageError
from mail2alert.managers.base import Context, ManagerType
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.message import RawMessage, address_of
from mail2alert.model import Envelope
from mail2alert.outbox import read_notes_of, unusable
from mail2alert.settings import HostPort
from mail2alert.users import hash_password

log = logging.getLogger("mail2alert")

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: The original's debug console port.
MONITOR_PORT = 50101


def setup_logging(option: str | None, log_format: str | None = None) -> None:
    """Log to stderr at ``--log-level``, else ``$LOGLEVEL``, else INFO; as text, or JSON lines
    with ``--log-format json`` (else ``$LOG_FORMAT``)."""
    wanted = (option or os.environ.get("LOGLEVEL") or "INFO").strip().upper()
    level = wanted if wanted in LEVELS else "INFO"
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # Neither format shows where in the code a line was logged, nor the process or thread:
    # not looking them up saves a walk up the stack for every line (the logging HOWTO's
    # "Optimization"), two lines per message.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    form = (log_format or os.environ.get("LOG_FORMAT") or "text").strip().lower()
    if form == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logs.JsonFormatter())
    # aiosmtpd logs every SMTP command at INFO; our one line per message says what matters.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # Apprise logs each send and may name parts of a chat URL; its words reach operators
    # through our own delivery log lines instead, with secrets scrubbed.
    logging.getLogger("apprise").propagate = False
    # urllib3 (under Apprise's requests) logs every request line at DEBUG, and a webhook's
    # token is in its path: keep it out of the service log too.
    logging.getLogger("urllib3").propagate = False
    # The debug console's telnet layer logs every option it negotiates at INFO.
    logging.getLogger("prompt_toolkit").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    if wanted not in LEVELS:
        log.warning(
            "unknown log level %r (use one of %s); logging at INFO", wanted, ", ".join(LEVELS)
        )
    if form not in logs.FORMATS:
        log.warning("unknown $LOG_FORMAT %r (use text or json); logging as text", form)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help=f"configuration file (default: ${config.ENV_CONFIG}, else ./{config.DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="mail2alert", description="Route CI alert mails to the right people by rules."
    )
    parser.add_argument("--version", action="version", version=f"mail2alert {__version__}")
    parser.add_argument("--log-level", metavar="LEVEL", help=LOG_LEVEL_HELP)
    parser.add_argument("--log-format", choices=logs.FORMATS, help=LOG_FORMAT_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the SMTP relay")
    _add_config(serve)
    serve.add_argument(
        "--monitor",
        nargs="?",
        const=f"127.0.0.1:{MONITOR_PORT}",
        metavar="HOST:PORT",
        help=(
            "start the aiomonitor debug console, a Python shell: loopback only"
            f" (default 127.0.0.1:{MONITOR_PORT}; it takes that port and the next two)"
        ),
    )

    check = commands.add_parser("check", help="validate the configuration and say what it holds")
    _add_config(check)
    check.add_argument(
        "--smtp",
        action="store_true",
        help="also connect to remote-smtp: EHLO, STARTTLS and AUTH as configured; nothing is sent",
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also ask everything the service needs: remote-smtp as --smtp does, each manager's"
        " source (GoCD), each chat destination as far as it can be asked without posting",
    )
    for kind in MANAGER_TYPES.values():
        setup = kind.explaining.setup
        if setup is not None:
            check.add_argument(
                setup.flag, action="store_true", dest=_setup_dest(kind), help=setup.help
            )

    route = commands.add_parser(
        "route", help="show where one message would go, without sending anything"
    )
    _add_config(route)
    route.add_argument("eml", nargs="?", metavar="FILE.eml", help="a message file to route")
    route.add_argument(
        "--from",
        dest="mail_from",
        metavar="ADDRESS",
        help="envelope sender (with FILE.eml: instead of its From:)",
    )
    route.add_argument(
        "--to", metavar="ADDRESS", help="envelope recipient (with FILE.eml: instead of its To:)"
    )
    route.add_argument("--subject", metavar="TEXT", help="Subject of a made-up message")
    route.add_argument("--trace", action="store_true", help="show every rule with ✓/✗ and why")
    route.add_argument("--json", action="store_true", help="print the result as JSON")
    route.add_argument(
        "--expect",
        metavar="ACTIONS",
        help="comma-separated action URIs, or relay/drop/hold: exit 1 when routing differs",
    )
    _add_snapshot(route)

    test = commands.add_parser("test", help="run a suite of routing cases against the config")
    test.add_argument("suite", metavar="SUITE.yml")
    _add_config(test)
    _add_snapshot(test)
    test.add_argument(
        "--fail-under",
        type=float,
        metavar="PCT",
        help="fail when fewer than PCT percent of the rules are exercised by some case",
    )

    cover = commands.add_parser(
        "coverage", help="where everything the managers know of would go, orphans and dead rules"
    )
    _add_config(cover)
    _add_snapshot(cover)
    cover.add_argument("--format", choices=("text", "yaml", "json"), default="text")

    send_test = commands.add_parser(
        "send-test", help="send one labelled test notification to an action or a rule's actions"
    )
    send_test.add_argument(
        "target",
        metavar="ACTION_URI_OR_RULE",
        help="mailto:..., slack:#..., a chat URL, or a rule: managers[0].rules[1] or gocd#0:2",
    )
    _add_config(send_test)
    send_test.add_argument(
        "--from",
        dest="mail_from",
        default="mail2alert@localhost",
        metavar="ADDRESS",
        help="envelope sender of test mails (default mail2alert@localhost)",
    )

    capture = commands.add_parser(
        "capture", help="a local SMTP sink that prints every message it receives (for trying out)"
    )
    capture.add_argument("--listen", default="localhost:8025", metavar="HOST:PORT")
    passwd = commands.add_parser(
        "passwd",
        help="print a users-file line (name:hash) for a password read from the terminal or stdin",
    )
    passwd.add_argument("name", help="the user name (no ':' in it)")
    postqueue.add_parser(commands)
    summaries = {action.dest: action.help for action in commands._choices_actions}
    for name, command in commands.choices.items():
        command.description = command.description or summaries.get(name)
        command.epilog = f"example:\n  {EXAMPLES[name]}"
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        for each in _parsers(command):
            # Also after the command (`mail2alert check --log-level DEBUG`); SUPPRESS keeps
            # a value given before it.
            each.add_argument(
                "--log-level", metavar="LEVEL", default=argparse.SUPPRESS, help=LOG_LEVEL_HELP
            )
            each.add_argument(
                "--log-format",
                choices=logs.FORMATS,
                default=argparse.SUPPRESS,
                help=LOG_FORMAT_HELP,
            )
    return parser


#: One example per command, shown at the end of its ``--help``.
EXAMPLES = {
    "serve": "mail2alert serve --config /etc/mail2alert/configuration.yml",
    "check": "mail2alert check --config examples/configuration.yml --smtp",
    "route": "mail2alert route examples/mail/stage-broken.eml --config examples/configuration.yml"
    " --trace",
    "test": "mail2alert test examples/routing-tests.yml --config examples/configuration.yml",
    "coverage": "mail2alert coverage --config examples/configuration.yml --format yaml",
    "send-test": "mail2alert send-test mailto:you@example.com --config configuration.yml",
    "capture": "mail2alert capture --listen localhost:8025",
    "passwd": "mail2alert passwd gocd >> /etc/mail2alert/users",
    "queue": "mail2alert queue list --config /etc/mail2alert/configuration.yml",
}
LOG_LEVEL_HELP = "DEBUG, INFO, WARNING or ERROR (default $LOGLEVEL, else INFO)"
LOG_FORMAT_HELP = "text, or json: one JSON object per line (default $LOG_FORMAT, else text)"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every parser below it (``queue list``, ``queue show``...)."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def _add_snapshot(parser: argparse.ArgumentParser) -> None:
    """Each manager type's option to read its snapshot from a file."""
    for kind in MANAGER_TYPES.values():
        option = kind.explaining.snapshot_file
        if option is not None:
            parser.add_argument(
                option.flag, metavar=option.metavar, type=Path, help=option.help, dest=_dest(kind)
            )


def _dest(kind: ManagerType) -> str:
    return f"snapshot_of_{kind.name}"


def _setup_dest(kind: ManagerType) -> str:
    return f"setup_of_{kind.name}"


def _snapshot_files(args: argparse.Namespace) -> dict[str, Path]:
    """The snapshot files given on the command line, by manager type."""
    return {
        kind.name: path
        for kind in MANAGER_TYPES.values()
        if (path := getattr(args, _dest(kind), None)) is not None
    }


def _load(args: argparse.Namespace, *, unset_ok: bool = True) -> config.Config:
    """The configuration, or ConfigError after printing every problem. ``unset_ok`` for the
    commands that send nothing: unset variables are then notes on stderr, not problems."""
    path = config.config_path(args.config)
    try:
        loaded = config.load(path, unset_ok=unset_ok)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise Mail2AlertError(f"{path} is invalid (see `mail2alert check`)") from None
    for note in loaded.unset_notes():
        print(f"note: {note}", file=sys.stderr)
    return loaded


def _context(args: argparse.Namespace, loaded: config.Config) -> Context:
    """What routing may know: each manager's snapshot (file, live, or kept) and the notes."""
    files = _snapshot_files(args)
    snapshots = asyncio.run(_fetch_snapshots(loaded, skip=set(files)))
    snapshots.update(explain.snapshots_from_files(files, loaded))
    return Context(snapshots=snapshots, state=read_notes_of(loaded.data_dir))


async def _fetch_snapshots(loaded: config.Config, *, skip: set[str]) -> dict[str, object]:
    """Each manager's snapshot, read once (live, else as kept); notes on stderr. Managers of
    the types in ``skip`` are left out (their snapshot comes from a file)."""
    snapshots: dict[str, object] = {}
    blocked = loaded.live_blocked()
    for index, manager in enumerate(loaded.routing):
        background = manager.type.background
        if background is None or manager.type.name in skip:
            continue
        if index in blocked:
            saved = background.saved(manager.options, loaded.data_dir)
            kept = background.load(saved) if saved is not None else None
            if kept is not None:
                snapshots[manager.label] = kept
            else:
                print(f"note: {manager.label}: nothing kept in {loaded.data_dir}", file=sys.stderr)
            continue
        snapshot, note = await background.fetch(manager.label, manager.options, loaded.data_dir)
        if note:
            print(f"note: {note}", file=sys.stderr)
        if snapshot is not None:
            snapshots[manager.label] = snapshot
    return snapshots


def cmd_route(args: argparse.Namespace) -> int:
    """``mail2alert route``: explain one message; with --expect, exit 1 on a mismatch."""
    made_up = (args.mail_from, args.to, args.subject)
    if args.eml is None and any(v is None for v in made_up):
        raise UsageError("give FILE.eml, or --from, --to and --subject")
    if args.eml is not None and args.subject is not None:
        raise UsageError("--subject makes up a message: give it or FILE.eml, not both")
    loaded = _load(args)
    if args.eml is not None:
        try:
            data = Path(args.eml).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.eml}: {exc.strerror}") from None
        message = RawMessage.parse(data)
        sender = args.mail_from or address_of(message.get("from"))
        rcpt = args.to or address_of(message.get("to"))
    else:
        sender, rcpt = args.mail_from, args.to
        data = explain.synthetic_message(sender, rcpt, args.subject)
    result = explain.explain(loaded, Envelope(sender, (rcpt,)), data, _context(args, loaded))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(explain.render(result, trace=args.trace))
    if args.expect is None:
        return 0
    mismatch = explain.diff(explain.parse_expect(args.expect), result.outcome)
    if mismatch:
        print(f"FAIL: {mismatch}", file=sys.stderr)
        return 1
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """``mail2alert test``: PASS/FAIL per case, a summary, rule coverage; 0 only if all pass."""
    loaded = _load(args)
    cases = explain.load_suite(Path(args.suite))
    result = explain.run_suite(loaded, cases, _context(args, loaded))
    for name, mismatch in result.results:
        print(f"PASS {name}" if mismatch is None else f"FAIL {name}: {mismatch}")
    passed = len(result.results) - result.failed
    print(
        f"{passed} passed, {result.failed} failed; {len(result.exercised)} of "
        f"{result.total_rules} rules exercised ({result.rule_share:.0f}%)"
    )
    if result.failed:
        return 1
    if args.fail_under is not None and result.rule_share < args.fail_under:
        print(
            f"FAIL: rule coverage {result.rule_share:.0f}% is under {args.fail_under:g}%",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    """``mail2alert coverage``: the routes of all the managers know, orphans, dead rules."""
    loaded = _load(args)
    context = _context(args, loaded)
    # A type whose snapshot comes from a file is not asked anything: the file is the answer.
    asked = [k.name for k in MANAGER_TYPES.values() if k.name not in _snapshot_files(args)]
    setup = asyncio.run(explain.setup_reports(loaded, asked, blocked=loaded.live_blocked()))
    report = explain.coverage(loaded, context, setup)
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    elif args.format == "yaml":
        print(yaml.safe_dump(report.as_dict(), sort_keys=False), end="")
    else:
        print(explain.render_coverage(report))
    return 0


def cmd_send_test(args: argparse.Namespace) -> int:
    """``mail2alert send-test``: 0 when every target took the test notification."""
    loaded = _load(args, unset_ok=False)
    uris = sendtest.targets(loaded, args.target)

    async def send_all() -> list[tuple[bool, str]]:
        results = []
        for uri in uris:
            attempt = await sendtest.send(loaded, uri, sender=args.mail_from)
            results.append(sendtest.describe(uri, attempt, str(loaded.remote_smtp)))
        return results

    results = asyncio.run(send_all())
    for ok, line in results:
        print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if all(ok for ok, _ in results) else 1


def cmd_check(args: argparse.Namespace) -> int:
    """``mail2alert check``: 0 when the configuration is valid, 1 with every problem if not."""
    path = config.config_path(args.config)
    try:
        loaded = config.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{path}: invalid, {count} problem{'s' * (count != 1)}", file=sys.stderr)
        return 1
    unfit = unusable(loaded.data_dir)
    if unfit is not None:
        print(f"{path}: data-dir {loaded.data_dir} {unfit}", file=sys.stderr)
        return 1
    print(f"{path}: OK, {loaded.summary()}")
    for risk in loaded.upstream.risks():
        print(f"{path}: warning: {risk}", file=sys.stderr)
    findings = []
    if args.online:
        findings = asyncio.run(online.everything(loaded))
    elif args.smtp:
        findings = [asyncio.run(online.smtp(loaded))]
    for finding in findings:
        print(finding.line(), file=sys.stdout if finding.ok else sys.stderr)
    # --online asks everything the service needs, its sources' own setup (check --gocd) too.
    kinds = [
        k.name
        for k in MANAGER_TYPES.values()
        if k.explaining.setup is not None and (args.online or getattr(args, _setup_dest(k), False))
    ]
    reports = asyncio.run(explain.setup_reports(loaded, kinds)) if kinds else ()
    for report in reports:
        for line in report.finding_lines():
            print(line, file=sys.stderr)
        summary = report.summary()
        if summary is not None:
            print(summary)
    return 0 if all(f.ok for f in findings) and not any(r.findings for r in reports) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """``mail2alert serve``: run until SIGTERM/SIGINT."""
    from mail2alert import supervisor

    path = config.config_path(args.config)
    try:
        loaded = config.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        raise Mail2AlertError(f"not starting: {path} is invalid") from None
    for risk in loaded.upstream.risks():
        log.warning("%s: %s", path, risk)
    return supervisor.run(loaded, monitor=args.monitor)


def cmd_capture(args: argparse.Namespace) -> int:
    """``mail2alert capture``: print every message received, until interrupted."""
    from mail2alert import testing

    try:
        address = HostPort.parse(args.listen, default_host="localhost")
    except ValueError as exc:
        raise UsageError(f"capture --listen: {exc}") from None
    try:
        testing.run_capture(address.host, address.port)
    except OSError as exc:
        reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise StartupError(
            f"capture: cannot listen on {address}: {reason}; choose another with --listen HOST:PORT"
        ) from None
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    """``mail2alert passwd NAME``: a users-file line; the password is never echoed."""
    name = args.name.strip()
    if not name or ":" in name or any(c.isspace() for c in name):
        raise UsageError("passwd: a user name is one word without ':'")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("passwd: the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("passwd: an empty password is no password")
    print(f"{name}:{hash_password(password)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    handlers = {
        "serve": cmd_serve,
        "check": cmd_check,
        "route": cmd_route,
        "test": cmd_test,
        "coverage": cmd_coverage,
        "send-test": cmd_send_test,
        "capture": cmd_capture,
        "passwd": cmd_passwd,
        "queue": postqueue.run,
    }
    try:
        return handlers[args.command](args)
    except Mail2AlertError as exc:
        print(f"mail2alert: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
