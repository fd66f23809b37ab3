"""The one exception tree of mail2alert.

Library code raises these; only :mod:`mail2alert.cli` turns them into exit codes::

    Mail2AlertError                 exit code 1 unless the subclass says otherwise
    ├── ConfigError                 the configuration is invalid (carries every problem)
    ├── StartupError                the service could not start (port in use, data dir...)
    ├── ServiceFailed               a part of the running service failed for good
    ├── OutboxError                 the durable queue could not be read or written
    │   └── OutboxFull              ... because its file system has no space left
    ├── SourceError                 a manager's outside data could not be read (unreachable,
    │                               refused, a bad answer); each manager type has its own
    ├── RuleArgumentError           a rule function cannot use one of its args (config load)
    └── UsageError                  a command was called with arguments that do not fit (exit 2)
"""

from __future__ import annotations

from dataclasses import dataclass


class Mail2AlertError(Exception):
    """Base of every error mail2alert raises on purpose."""

    exit_code = 1


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in a configuration file, with where it is."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Mail2AlertError):
    """The configuration is invalid; :attr:`problems` lists all that is wrong, in file order."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.path))
        super().__init__("\n".join(str(p) for p in self.problems))


class StartupError(Mail2AlertError):
    """The service could not start; the message is the one line the operator sees."""


class ServiceFailed(Mail2AlertError):
    """A part of the running service failed again and again; the process must be restarted.

    The process exits non-zero so that its supervisor (systemd, Docker) starts it afresh
    rather than leave it accepting mail it would never deliver.
    """


class OutboxError(Mail2AlertError):
    """The durable outbox could not be opened, read or written."""


class OutboxFull(OutboxError):
    """The outbox could not be written because ``data-dir`` has no space left."""


class SourceError(Mail2AlertError):
    """A manager's outside data (say a CI server's API) could not be read; the message names
    the URL and status, never credentials. Manager types subclass it."""


class UsageError(Mail2AlertError):
    """A command was called with arguments that do not fit together."""

    exit_code = 2


class RuleArgumentError(Mail2AlertError):
    """A rule function was given an argument it cannot use; ``index`` says which one."""

    def __init__(self, index: int, message: str) -> None:
        self.index = index
        super().__init__(message)
