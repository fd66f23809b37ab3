"""The command line: ``serve``, ``check``, ``capture``. The only place errors become exit codes.

Exit codes: 0 success, 1 invalid configuration or failed start, 2 wrong usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mail2alert import __version__, config
from mail2alert.errors import ConfigError, Mail2AlertError

log = logging.getLogger("mail2alert")

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(option: str | None) -> None:
    """Log to stderr at ``--log-level``, else ``$LOGLEVEL``, else INFO."""
    wanted = (option or os.environ.get("LOGLEVEL") or "INFO").strip().upper()
    level = wanted if wanted in LEVELS else "INFO"
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # aiosmtpd logs every SMTP command at INFO; our one line per message says what matters.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    if wanted not in LEVELS:
        log.warning(
            "unknown log level %r (use one of %s); logging at INFO", wanted, ", ".join(LEVELS)
        )


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
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the SMTP relay")
    _add_config(serve)

    check = commands.add_parser("check", help="validate the configuration and say what it holds")
    _add_config(check)

    capture = commands.add_parser(
        "capture", help="a local SMTP sink that prints every message it receives (for trying out)"
    )
    capture.add_argument("--listen", default="localhost:8025", metavar="HOST:PORT")
    return parser


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
    print(f"{path}: OK, {loaded.summary()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``mail2alert serve``: run until SIGTERM/SIGINT."""
    from mail2alert import app

    path = config.config_path(args.config)
    try:
        loaded = config.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        raise Mail2AlertError(f"not starting: {path} is invalid") from None
    return app.run(loaded)


def cmd_capture(args: argparse.Namespace) -> int:
    """``mail2alert capture``: print every message received, until interrupted."""
    from mail2alert import testing

    host, _, port = args.listen.rpartition(":")
    testing.run_capture(host.strip("[]") or "localhost", int(port))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    handlers = {"serve": cmd_serve, "check": cmd_check, "capture": cmd_capture}
    try:
        return handlers[args.command](args)
    except Mail2AlertError as exc:
        print(f"mail2alert: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
