"""Load and validate ``configuration.yml``; every problem is reported at once, with file:line.

The file is read into YAML nodes (which know their line), then walked key by key on the
generic validators of :mod:`mail2alert.validation`; each manager type's keys are checked by
the kinds it declares, and its rule functions check what they require of those keys. Each
problem becomes a :class:`~mail2alert.errors.ConfigProblem`; if there is any, :func:`load`
raises one :class:`~mail2alert.errors.ConfigError` carrying them all, so an operator fixes
everything in one pass. Nothing is started from a file that has a problem.

``$NAME`` and ``${NAME}`` in string values are replaced from the environment (``$$`` is a
literal ``$``); an unset variable is a problem, never left as text.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar, cast, get_args

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mail2alert import yamlerrors
from mail2alert.actions import (
    HOST_NAME,
    action_id,
    check_action,
    is_chat,
    is_committers,
    is_mailbox,
    is_slack_web,
)
from mail2alert.errors import ConfigError, ConfigProblem, RuleArgumentError
from mail2alert.managers.base import ManagerType, Option
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.model import ChatSettings, ChatTemplate, Secret
from mail2alert.routing import Manager, Rule
from mail2alert.settings import (
    Delivery,
    History,
    HostPort,
    Http,
    InboundAuth,
    InboundTls,
    InboundTlsMode,
    Listener,
    OutboundTlsMode,
    Upstream,
)
from mail2alert.templates import check as check_template
from mail2alert.users import parse_users
from mail2alert.validation import NULL, STR, Checker, did_you_mean, kind_of, line_of

ENV_CONFIG = "MAIL2ALERT_CONFIGURATION"
DEFAULT_SLACK_API = "https://slack.com/api"
DEFAULT_CONFIG = "configuration.yml"

T = TypeVar("T")


#: The most delivery connections: each is a task and a connection to the smarthost, kept
#: open; no smarthost takes more from one client.
MAX_CONNECTIONS = 1000
#: The most intake processes: each is a forked process with its own outbox connection.
MAX_WORKERS = 64

#: Host names that are one host however written, for two listeners' clash.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_ANY = frozenset({"", "0.0.0.0", "::", "*"})  # noqa: S104 - names, compared, never bound


def _same_port(one: HostPort, other: HostPort) -> bool:
    """Whether two listeners would take the same port on the same address (port 0: a free
    port each)."""
    if one.port == 0 or one.port != other.port:
        return False
    hosts = {one.host.lower(), other.host.lower()}
    return len(hosts) == 1 or bool(hosts & _ANY) or hosts <= _LOOPBACK


#: A host name (or an address literal) as HELO/EHLO says it.
_HOST_NAME = re.compile(rf"{HOST_NAME}|\[[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True)
class ManagerConfig:
    """A manager as configured: its routing part plus its type-specific options."""

    manager: Manager
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Unset:
    """An environment variable the file names that was not set, and the key that names it."""

    name: str
    path: str

    def manager_index(self) -> int | None:
        """The index of the manager whose key names it, or None for a top-level key."""
        found = re.match(r"managers\[(\d+)\]", self.path)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class Config:
    """A whole, valid configuration."""

    path: str
    local_smtp: HostPort
    remote_smtp: HostPort
    managers: tuple[ManagerConfig, ...]
    data_dir: Path
    delivery: Delivery = field(default_factory=Delivery)
    intake_workers: int = 1
    slack_token: Secret | None = None
    slack_api_url: str = "https://slack.com/api"
    stamp: tuple[int, int, int] | None = None
    """(mtime_ns, size, inode) of the file as it was read, to notice later changes."""
    listener: Listener = field(default_factory=lambda: Listener(HostPort("localhost", 1025)))
    """``local-smtp`` in full (its ``address`` is :attr:`local_smtp`)."""
    upstream: Upstream = field(default_factory=lambda: Upstream(HostPort("localhost", 25)))
    """``remote-smtp`` in full (its ``address`` is :attr:`remote_smtp`)."""
    source: str = field(default="", repr=False, compare=False)
    """The text it was read from: intake workers reload from exactly what was validated."""
    unset: tuple[Unset, ...] = ()
    """The environment variables it names that were not set (loaded with ``unset_ok``)."""
    http: Http | None = field(default_factory=Http)
    """``http``: the monitoring listener, or None (``http: null``) for none."""
    history: History = field(default_factory=History)
    """``history``: how long the decision history keeps messages."""

    def unset_notes(self) -> list[str]:
        """What each unset variable (:attr:`unset`) leaves out of a command that sends
        nothing, one line each."""
        notes = []
        for unset in self.unset:
            what = f"{unset.path} names ${unset.name}, which is not set"
            index = unset.manager_index()
            if ".actions[" in unset.path:
                notes.append(f"{what}: that action is left out here")
            elif index is not None and self.routing[index].type.background is not None:
                label = self.routing[index].label
                notes.append(f"{what}: {label}'s live data is not read, the kept one is used")
            else:
                notes.append(f"{what}: only serve and check need it")
        return notes

    def live_blocked(self) -> set[int]:
        """The managers (by index) whose own keys name an unset variable: not to be asked
        for live data with credentials that are missing."""
        return {i for u in self.unset if (i := u.manager_index()) is not None}

    @property
    def routing(self) -> tuple[Manager, ...]:
        """The managers in order, as :func:`mail2alert.routing.route` takes them."""
        return tuple(m.manager for m in self.managers)

    def chat_settings(self) -> ChatSettings:
        """The chat actions of the configuration (by action id) and its Slack settings."""
        uris = {
            action
            for manager in self.routing
            for action in (*manager.fallback, *(a for r in manager.rules for a in r.actions))
            if is_chat(action)
        }
        return ChatSettings(
            actions={action_id(u): u for u in sorted(uris)},
            slack_token=self.slack_token,
            slack_api_url=self.slack_api_url,
            timeout=self.delivery.timeout,
        )

    def summary(self) -> str:
        """One line: how many managers, rules and actions."""
        rules = sum(len(m.manager.rules) for m in self.managers)
        actions = sum(len(r.actions) for m in self.managers for r in m.manager.rules)
        names = ", ".join(m.manager.type.name for m in self.managers) or "none"
        return (
            f"{len(self.managers)} manager{'s' * (len(self.managers) != 1)} ({names}), "
            f"{rules} rule{'s' * (rules != 1)}, {actions} action{'s' * (actions != 1)}"
        )


def default_workers() -> int:
    """Intake processes when the file does not say: two where there are two cores or more.

    Measured on two cores (bench/README.md), a second intake process lifts end-to-end
    throughput by a third; more processes than cores only add memory.
    """
    return min(2, os.cpu_count() or 1)


#: ``data-dir`` when the file names none: this variable (the Docker image and the systemd
#: unit set it to their state directory), else ``mail2alert-data`` beside the file.
ENV_DATA_DIR = "MAIL2ALERT_DATA_DIR"
DEFAULT_DATA_DIR = "mail2alert-data"


def config_path(explicit: str | None) -> Path:
    """Where the configuration is: ``--config``, else ``$MAIL2ALERT_CONFIGURATION``, else ./."""
    return Path(explicit or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)


def _named_by(path: str | Path) -> str:
    """What named ``path`` as the configuration, for a message saying it is not there."""
    if str(path) == os.environ.get(ENV_CONFIG):
        return f"named by ${ENV_CONFIG}"
    if str(path) == DEFAULT_CONFIG:
        return f"the default; name another with --config PATH or ${ENV_CONFIG}"
    return "named by --config"


def load(
    path: str | Path, env: Mapping[str, str] | None = None, *, unset_ok: bool = False
) -> Config:
    """Read and validate the configuration file at ``path``; raise ConfigError listing all.
    ``unset_ok``: see :func:`parse`."""
    name = str(path)
    try:
        st = Path(path).stat()
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        where = f"no such file: {Path(path).absolute()} ({_named_by(path)})"
        raise ConfigError([ConfigProblem(name, 0, "", where)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError([ConfigProblem(name, 0, "", f"cannot read: {reason}")]) from None
    loaded = parse(text, name, os.environ if env is None else env, unset_ok=unset_ok)
    return replace(loaded, stamp=(st.st_mtime_ns, st.st_size, st.st_ino), source=text)


#: Deeper than this, YAML is no configuration of ours (which nests six levels), and PyYAML's
#: composer, which recurses once per level, would run out of Python's stack on it.
MAX_DEPTH = 100


def parse(text: str, filename: str, env: Mapping[str, str], *, unset_ok: bool = False) -> Config:
    """Validate configuration text; ``filename`` is only used in messages.

    ``unset_ok`` is for commands that send nothing (``route``, ``test``, ``coverage``,
    ``queue``): an unset ``$NAME`` reads as empty and is listed in :attr:`Config.unset`
    instead of being a problem; what then fails to validate is still a problem.
    """
    try:
        return _parse(text, filename, env, unset_ok)
    except ConfigError as exc:
        raise _without_secrets(exc, text) from None


def _parse(text: str, filename: str, env: Mapping[str, str], unset_ok: bool) -> Config:
    walker = _Walker(filename, env)
    walker.unset_ok = unset_ok
    try:
        too_deep = _nested_too_deep(text)
        if too_deep is not None:
            raise ConfigError(
                [ConfigProblem(filename, too_deep, "", f"nested more than {MAX_DEPTH} levels deep")]
            )
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line, what = yamlerrors.explained(exc, text)
        raise ConfigError([ConfigProblem(filename, line, "", what)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(filename, 0, "", f"YAML error: {exc}")]) from None
    config = walker.config(root)
    if walker.problems or config is None:
        raise ConfigError(
            walker.problems or [ConfigProblem(filename, 0, "", "empty configuration")]
        )
    return replace(config, unset=tuple(Unset(name, path) for name, path in walker.unset))


def _nested_too_deep(text: str) -> int | None:
    """The line where ``text`` first nests deeper than :data:`MAX_DEPTH`, or None.

    PyYAML's parser keeps its own stack, so its events can be counted safely where composing
    the nodes could not; a syntax error raises as it would when composing.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                return int(mark.line) + 1 if mark is not None else 0
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def _no_committers(mtype: ManagerType) -> str | None:
    """Why a rule of ``mtype`` cannot have ``committers:`` actions, or None when it can."""
    if mtype.reads_committers:
        return None
    able = [t.name for t in MANAGER_TYPES.values() if t.reads_committers]
    return f"the {mtype.name} manager reads no committers from its mails" + (
        f" (committers: works with {', '.join(able)})" if able else ""
    )


#: A line that gives a secret's value. A mistake above it (a stray "|" makes every line below
#: one text value) can put that value in a problem that shows the value it found.
_SECRET_LINE = re.compile(
    r"^[ \t-]*(?:passwd|token|slack-token)[ \t]*:[ \t]*(?P<value>[^\s#].*?)[ \t]*$", re.MULTILINE
)


def _without_secrets(error: ConfigError, text: str) -> ConfigError:
    """``error`` with every secret value written in ``text`` shown as ``***``."""
    found = {m["value"].strip("'\"") for m in _SECRET_LINE.finditer(text)} - {""}
    if not found:
        return error
    problems = []
    for problem in error.problems:
        message = problem.message
        for secret in sorted(found, key=len, reverse=True):
            message = message.replace(secret, "***").replace(repr(secret)[1:-1], "***")
        problems.append(replace(problem, message=message))
    return ConfigError(problems)


class _Walker(Checker):
    """Turns YAML nodes into a Config: the schema of the file, on the generic validators."""

    def __init__(self, filename: str, env: Mapping[str, str]) -> None:
        super().__init__(filename, env)
        self.slack_actions: list[tuple[Node, str]] = []

    def workers(self, node: Node, path: str) -> int | None:
        if isinstance(node, ScalarNode) and node.tag == STR and node.value == "auto":
            return default_workers()
        return self.integer(node, path, minimum=1, maximum=MAX_WORKERS)

    def actions(
        self, node: Node, path: str, *, no_committers: str | None = None
    ) -> tuple[str, ...]:
        """A list of actions; ``no_committers`` says why ``committers:`` is no action here."""
        items = self.sequence(node, path) or []
        out: list[str] = []
        for i, item in enumerate(items):
            unset = len(self.unset)
            uri = self.text(item, f"{path}[{i}]")
            if uri is None or len(self.unset) > unset:
                continue  # an action whose URL is unset is left out (only with unset_ok)
            problem = check_action(uri.strip())
            if problem is None and no_committers and is_committers(uri.strip()):
                problem = no_committers
            if problem:
                self.problem(item, f"{path}[{i}]", problem)
                continue
            out.append(uri.strip())
            if is_slack_web(uri):
                self.slack_actions.append((item, f"{path}[{i}]"))
        if not items and isinstance(node, SequenceNode):
            self.problem(node, path, "needs at least one action")
        return tuple(out)

    # -- the configuration ------------------------------------------------------------------

    def config(self, root: Node | None) -> Config | None:
        if root is None:
            self.problem(None, "", "the file is empty")
            return None
        top = self.mapping(
            root,
            "",
            known=(
                "local-smtp",
                "remote-smtp",
                "managers",
                "data-dir",
                "delivery",
                "intake-workers",
                "slack-token",
                "slack-api-url",
                "http",
                "history",
            ),
            required=("remote-smtp", "managers"),
        )
        if top is None:
            return None
        listener = self._optional(top, "local-smtp", self.listener)
        upstream = self._optional(top, "remote-smtp", self.upstream)
        data_dir = self._optional(top, "data-dir", self.text)
        workers = self._optional(top, "intake-workers", self.workers)
        http = self.http(top["http"], "http") if "http" in top else Http()
        smtp_at = listener.address if listener else HostPort("localhost", 1025)
        clash = top.get("http") or top.get("local-smtp")
        if http is not None and clash is not None and _same_port(http.address, smtp_at):
            self.problem(
                clash,
                "http" if "http" in top else "local-smtp",
                f"local-smtp ({smtp_at}) and http ({http.address}) would take the same port:"
                " give each its own" + ("" if "http" in top else " (http's default is 9025)"),
            )
        history = self._optional(top, "history", self.history)
        delivery = self._optional(top, "delivery", self.delivery)
        slack_token = self._optional(top, "slack-token", self.text)
        slack_api = self._optional(
            top, "slack-api-url", lambda n, p: self.option(Option("url", ""), n, p)
        )
        managers: list[ManagerConfig] = []
        if "managers" in top:
            for i, node in enumerate(self.sequence(top["managers"], "managers") or []):
                built = self.manager(node, f"managers[{i}]", i)
                if built is not None:
                    managers.append(built)
        if not slack_token:  # unset, or set to nothing (an empty environment variable)
            for node, path in self.slack_actions:
                self.problem(
                    node, path, "slack: actions post with the top-level 'slack-token'; set it"
                )
        if self.problems or upstream is None:
            return None
        listener = listener or Listener(HostPort("localhost", 1025))
        return Config(
            path=self.filename,
            local_smtp=listener.address,
            remote_smtp=upstream.address,
            listener=listener,
            upstream=upstream,
            managers=tuple(managers),
            data_dir=self.located(data_dir or self.env.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR),
            delivery=delivery or Delivery(),
            intake_workers=workers or default_workers(),
            slack_token=Secret(slack_token) if slack_token else None,
            slack_api_url=str(slack_api or DEFAULT_SLACK_API),
            http=http,
            history=history or History(),
        )

    def _optional(
        self, keys: Mapping[str, Node], key: str, read: Callable[[Node, str], T | None]
    ) -> T | None:
        return read(keys[key], key) if key in keys else None

    def listener(self, node: Node, path: str) -> Listener | None:
        """``local-smtp``: ``host:port``, or a mapping with the address, access and limits."""
        if not isinstance(node, MappingNode):
            address = self.host_port(node, path, allow_zero=True)
            return None if address is None else Listener(address)
        keys = self.mapping(
            node,
            path,
            known=(
                "address",
                "allowed-clients",
                "tls",
                "auth",
                "max-message-size",
                "max-recipients",
                "max-sessions",
                "timeout",
            ),
            required=("address",),
        )
        if keys is None or "address" not in keys:
            return None
        address = self.host_port(keys["address"], f"{path}.address", allow_zero=True)
        default = Listener(HostPort("localhost", 0))
        allowed = default.allowed_clients
        if "allowed-clients" in keys:
            allowed = self.networks(keys["allowed-clients"], f"{path}.allowed-clients") or ()
        tls = self._optional_in(keys, path, "tls", self.inbound_tls)
        auth = self._optional_in(keys, path, "auth", self.inbound_auth)
        if auth is not None and "tls" not in keys:
            self.problem(
                keys["auth"],
                f"{path}.auth",
                "AUTH is offered only on a TLS session (never a password in clear text):"
                " set 'tls' too",
            )
        size = self._optional_in(keys, path, "max-message-size", self.size)
        rcpts = self._optional_in(keys, path, "max-recipients", self._positive)
        sessions = self._optional_in(keys, path, "max-sessions", self._positive)
        timeout = self._optional_in(keys, path, "timeout", self.seconds)
        if address is None:
            return None
        return Listener(
            address,
            allowed_clients=allowed,
            tls=tls,
            auth=auth,
            max_message_size=size or default.max_message_size,
            max_recipients=rcpts or default.max_recipients,
            max_sessions=sessions or default.max_sessions,
            timeout=timeout or default.timeout,
        )

    def history(self, node: Node, path: str) -> History | None:
        """``history``: ``keep`` (a duration) and ``max-messages``."""
        keys = self.mapping(node, path, known=("keep", "max-messages"))
        if keys is None:
            return None
        keep = self._optional_in(keys, path, "keep", self.seconds)
        most = self._optional_in(keys, path, "max-messages", self._positive)
        default = History()
        return History(keep=keep or default.keep, max_messages=most or default.max_messages)

    def http(self, node: Node, path: str) -> Http | None:
        """``http``: ``host:port``, ``null`` (no listener), or a mapping with the address."""
        if isinstance(node, ScalarNode) and node.tag == NULL:
            return None
        if not isinstance(node, MappingNode):
            address = self.host_port(node, path, allow_zero=True)
            return Http() if address is None else Http(address)
        keys = self.mapping(node, path, known=("address", "admin", "users-file"))
        if keys is None:
            return Http()
        address = self._optional_in(keys, path, "address", partial(self.host_port, allow_zero=True))
        admin = self._optional_in(keys, path, "admin", self.boolean)
        users = self._optional_in(keys, path, "users-file", self.readable_file)
        if users is not None:
            try:
                _, problems = parse_users(users.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                self.problem(keys["users-file"], f"{path}.users-file", f"cannot read: {exc}")
                problems = []
            for problem in problems:
                self.problem(
                    keys["users-file"],
                    f"{path}.users-file",
                    f"{users}:{problem.line}: {problem.message}",
                )
        return Http(address or Http().address, admin=bool(admin), users_file=users)

    def _positive(self, node: Node, path: str) -> int | None:
        return self.integer(node, path, minimum=1)

    def _optional_in(
        self, keys: Mapping[str, Node], path: str, key: str, read: Callable[[Node, str], T | None]
    ) -> T | None:
        return read(keys[key], f"{path}.{key}") if key in keys else None

    def inbound_tls(self, node: Node, path: str) -> InboundTls | None:
        keys = self.mapping(node, path, known=("mode", "cert", "key"), required=("cert", "key"))
        if keys is None:
            return None
        mode: str | None = "starttls"
        if "mode" in keys:
            value = self.text(keys["mode"], f"{path}.mode")
            if value not in get_args(InboundTlsMode):
                if value is not None:
                    self.problem(
                        keys["mode"],
                        f"{path}.mode",
                        f"expected starttls, starttls-required or implicit, got {value!r}",
                    )
                return None
            mode = value
        cert = self._optional_in(keys, path, "cert", self.readable_file)
        key = self._optional_in(keys, path, "key", self.readable_file)
        if cert is None or key is None:
            return None
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            self.problem(node, path, f"the certificate and key cannot be used: {exc}")
            return None
        return InboundTls(cast(InboundTlsMode, mode), cert, key)

    def inbound_auth(self, node: Node, path: str) -> InboundAuth | None:
        keys = self.mapping(node, path, known=("users-file", "required"), required=("users-file",))
        if keys is None or "users-file" not in keys:
            return None
        fpath = f"{path}.users-file"
        users_file = self.readable_file(keys["users-file"], fpath)
        required = self._optional_in(keys, path, "required", self.boolean) or False
        if users_file is None:
            return None
        try:
            _, problems = parse_users(users_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(keys["users-file"], fpath, f"cannot read {str(users_file)!r}: {exc}")
            return None
        for problem in problems:
            self.problem(
                keys["users-file"], fpath, f"{users_file}:{problem.line}: {problem.message}"
            )
        return None if problems else InboundAuth(users_file, required)

    def upstream(self, node: Node, path: str) -> Upstream | None:
        """``remote-smtp``: ``host:port``, or a mapping with the address, TLS and login."""
        if not isinstance(node, MappingNode):
            address = self.host_port(node, path)
            return None if address is None else Upstream(address)
        keys = self.mapping(
            node,
            path,
            known=("address", "tls", "user", "passwd", "ca-file", "verify", "helo", "sender"),
            required=("address",),
        )
        if keys is None or "address" not in keys:
            return None
        address = self.host_port(keys["address"], f"{path}.address")
        tls: str | None = "may"
        if "tls" in keys:
            value = self.text(keys["tls"], f"{path}.tls")
            if value not in get_args(OutboundTlsMode):
                if value is not None:
                    self.problem(
                        keys["tls"],
                        f"{path}.tls",
                        f"expected may, none, starttls or implicit, got {value!r}",
                    )
                return None
            tls = value
        user = self._optional_in(keys, path, "user", self.text)
        passwd = self._optional_in(keys, path, "passwd", self.text)
        if (user is None) != (passwd is None) and ("user" in keys) != ("passwd" in keys):
            missing, given = ("passwd", "user") if "user" in keys else ("user", "passwd")
            self.problem(keys[given], f"{path}.{given}", f"'{given}' needs '{missing}' too")
        if "passwd" in keys and tls == "none":
            self.problem(
                keys["passwd"],
                f"{path}.passwd",
                "a password is never sent in clear text: use tls: starttls or implicit",
            )
        ca_file = self._optional_in(keys, path, "ca-file", self.ca_bundle)
        verify = self._optional_in(keys, path, "verify", self.boolean)
        helo = self._optional_in(keys, path, "helo", self.text)
        if helo is not None and not _HOST_NAME.fullmatch(helo):
            # Said on the wire as it is: a line break in it would start another command.
            self.problem(keys["helo"], f"{path}.helo", f"{helo!r} is not a host name")
            helo = None
        sender = self._optional_in(keys, path, "sender", self.text)
        if sender is not None and not is_mailbox(sender):
            self.problem(keys["sender"], f"{path}.sender", f"{sender!r} is not a mail address")
            sender = None
        if address is None:
            return None
        return Upstream(
            address,
            tls=cast(OutboundTlsMode, tls),
            user=user,
            passwd=Secret(passwd) if passwd is not None else None,
            ca_file=ca_file,
            verify=True if verify is None else verify,
            helo=helo,
            sender=sender.strip() if sender else None,
        )

    def delivery(self, node: Node, path: str) -> Delivery | None:
        keys = self.mapping(
            node,
            path,
            known=("retry-initial", "retry-max", "give-up-after", "timeout", "connections"),
        )
        if keys is None:
            return None
        default = Delivery()
        values: dict[str, float] = {}
        for key in ("retry-initial", "retry-max", "give-up-after", "timeout"):
            if key in keys:
                seconds = self.seconds(keys[key], f"{path}.{key}")
                if seconds is not None:
                    values[key] = seconds
        connections = default.connections
        if "connections" in keys:
            connections = (
                self.integer(
                    keys["connections"],
                    f"{path}.connections",
                    minimum=1,
                    maximum=MAX_CONNECTIONS,
                )
                or 1
            )
        result = Delivery(
            retry_initial=values.get("retry-initial", default.retry_initial),
            retry_max=values.get("retry-max", default.retry_max),
            give_up_after=values.get("give-up-after", default.give_up_after),
            timeout=values.get("timeout", default.timeout),
            connections=connections,
        )
        if result.retry_initial > result.retry_max:
            self.problem(node, path, "retry-initial must not be longer than retry-max")
        return result

    def manager(self, node: Node, path: str, index: int) -> ManagerConfig | None:
        common = ("name", "messages-we-want", "rules", "fallback")
        if not isinstance(node, MappingNode):
            self.problem(
                node, path, f"expected a manager (a mapping with 'name'), got {kind_of(node)}"
            )
            return None
        names = {k.value: v for k, v in node.value if isinstance(k, ScalarNode)}
        mtype: ManagerType | None = None
        if "name" in names:
            type_name = self.text(names["name"], f"{path}.name")
            mtype = MANAGER_TYPES.get(type_name or "")
            if type_name is not None and mtype is None:
                known = ", ".join(MANAGER_TYPES)
                self.problem(
                    names["name"],
                    f"{path}.name",
                    f"unknown manager {type_name!r}{did_you_mean(type_name, MANAGER_TYPES)}"
                    f" (known: {known})",
                )
        options_known = (
            tuple(mtype.options)
            if mtype
            else tuple(k for t in MANAGER_TYPES.values() for k in t.options)
        )
        keys = self.mapping(
            node,
            path,
            known=common + options_known,
            required=("name", "messages-we-want"),
            what=f" for a {mtype.name} manager" if mtype else "",
        )
        if keys is None:
            return None
        wants = (
            self.wants(keys["messages-we-want"], f"{path}.messages-we-want")
            if ("messages-we-want" in keys)
            else None
        )
        fallback = (
            self.actions(
                keys["fallback"],
                f"{path}.fallback",
                no_committers="the fallback is for mail no one else is found for:"
                " give mailto: or chat actions, not committers:",
            )
            if "fallback" in keys
            else ()
        )
        if mtype is None:
            return None
        options = self.options(mtype, keys, path)
        rules: list[Rule] = []
        if "rules" in keys:
            for i, rule_node in enumerate(self.sequence(keys["rules"], f"{path}.rules") or []):
                rule = self.rule(rule_node, f"{path}.rules[{i}]", mtype, options)
                if rule is not None:
                    rules.append(rule)
        if wants is None:
            return None
        manager = Manager(
            type=mtype,
            index=index,
            wants_to=wants[0],
            wants_from=wants[1],
            rules=tuple(rules),
            fallback=fallback,
            line=line_of(node),
            options=options,
        )
        return ManagerConfig(manager, options)

    def wants(self, node: Node, path: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        keys = self.mapping(node, path, known=("to", "from"))
        if keys is None:
            return None
        if not keys:
            self.problem(node, path, "needs 'to' or 'from' (an address or a list of addresses)")
            return None
        found: dict[str, tuple[str, ...]] = {}
        for key, value in keys.items():
            addresses = [a.strip().lower() for a, _ in self.text_list(value, f"{path}.{key}")]
            if not addresses and isinstance(value, SequenceNode):
                # An empty list would leave the manager without criteria: it would take all mail.
                self.problem(value, f"{path}.{key}", "needs at least one address")
            for address in addresses:
                # Compared with the envelope as it is: 'GoCD <go@x>' or 'a@x, b@x' never match.
                if not is_mailbox(address):
                    self.problem(
                        value,
                        f"{path}.{key}",
                        f"{address!r} is not a mail address (one plain address per entry;"
                        " give several as a list)",
                    )
            found[key] = tuple(addresses)
        return found.get("to", ()), found.get("from", ())

    def options(self, mtype: ManagerType, keys: Mapping[str, Node], path: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, option in mtype.options.items():
            if name in keys:
                value = self.option(option, keys[name], f"{path}.{name}")
                if value is not None:
                    out[name] = value
            elif option.default is not None:
                out[name] = option.default
        return out

    def rule(
        self, node: Node, path: str, mtype: ManagerType, options: Mapping[str, object]
    ) -> Rule | None:
        keys = self.mapping(
            node,
            path,
            known=("actions", "filter", "template", "style"),
            required=("actions", "filter"),
        )
        if keys is None:
            return None
        actions = (
            self.actions(keys["actions"], f"{path}.actions", no_committers=_no_committers(mtype))
            if "actions" in keys
            else ()
        )
        template = self.template(keys, path)
        if "filter" not in keys:
            return None
        fpath = f"{path}.filter"
        fkeys = self.mapping(
            keys["filter"],
            fpath,
            known=("function", "args", "events", "event"),
            required=("function",),
        )
        if fkeys is None:
            return None
        events = self.events(fkeys, fpath, mtype)
        if "function" not in fkeys:
            return None
        name = self.text(fkeys["function"], f"{fpath}.function")
        if name is None:
            return None
        function = mtype.functions.get(name)
        if function is None:
            hint = did_you_mean(name, mtype.functions)
            known = ", ".join(mtype.functions)
            self.problem(
                fkeys["function"],
                f"{fpath}.function",
                f"unknown function {name!r} for the {mtype.name} manager{hint}"
                + ("" if hint else f" (known: {known})"),
            )
            return None
        args_node = fkeys.get("args")
        arg_nodes = self.sequence(args_node, f"{fpath}.args") if args_node is not None else []
        if arg_nodes is None:
            return None
        args = [
            self.text(a, f"{fpath}.args[{i}]", allow_numbers=True) for i, a in enumerate(arg_nodes)
        ]
        arity = function.arity_problem(len(args))
        if arity:
            self.problem(args_node or fkeys["function"], f"{fpath}.args", arity)
            return None
        if any(a is None for a in args):
            return None
        clean = tuple(a for a in args if a is not None)
        try:
            predicate = function.compile(clean)
        except RuleArgumentError as exc:
            self.problem(arg_nodes[exc.index], f"{fpath}.args[{exc.index}]", str(exc))
            return None
        unmet = function.requires(options) if function.requires else None
        if unmet:
            self.problem(fkeys["function"], f"{fpath}.function", unmet)
        if not actions:
            return None
        if template is None:
            return None
        return Rule(function, clean, predicate, actions, events, line_of(node), template)

    def template(self, keys: Mapping[str, Node], path: str) -> ChatTemplate | None:
        """A rule's ``template`` (text = the body, or a mapping of title/body) and ``style``."""
        style = "full"
        if "style" in keys:
            value = self.text(keys["style"], f"{path}.style")
            if value not in ("brief", "full"):
                if value is not None:
                    self.problem(
                        keys["style"], f"{path}.style", f"expected brief or full, got {value!r}"
                    )
                return None
            style = value
        if "template" not in keys:
            return ChatTemplate(style=style)
        node = keys["template"]
        tpath = f"{path}.template"
        if isinstance(node, MappingNode):
            parts = self.mapping(node, tpath, known=("title", "body"))
            if parts is None:
                return None
            title = self.text(parts["title"], f"{tpath}.title") if "title" in parts else None
            body = self.text(parts["body"], f"{tpath}.body") if "body" in parts else None
            template = ChatTemplate(title, body, style)
        else:
            body = self.text(node, tpath)
            if body is None:
                return None
            template = ChatTemplate(None, body, style)
        problem = check_template(template)
        if problem:
            self.problem(node, tpath, problem)
            return None
        return template

    def events(
        self, fkeys: Mapping[str, Node], fpath: str, mtype: ManagerType
    ) -> frozenset[str] | None:
        if "events" in fkeys and "event" in fkeys:
            self.problem(fkeys["event"], f"{fpath}.event", "give 'events' or 'event', not both")
            return None
        key = "events" if "events" in fkeys else "event" if "event" in fkeys else None
        if key is None:
            return None
        node = fkeys[key]
        if not mtype.events:
            self.problem(
                node,
                f"{fpath}.{key}",
                f"the {mtype.name} manager has no events: remove '{key}'",
            )
            return None
        out: set[str] = set()
        for value, item in self.text_list(node, f"{fpath}.{key}"):
            event = value.strip().upper()
            if event not in mtype.events:
                hint = did_you_mean(event, mtype.events)
                self.problem(
                    item,
                    f"{fpath}.{key}",
                    f"unknown event {value!r}{hint} (known: {', '.join(mtype.events)})",
                )
            else:
                out.add(event)
        if isinstance(node, SequenceNode) and not node.value:
            self.problem(
                node,
                f"{fpath}.{key}",
                "an empty list matches no event, so the rule could never match; "
                "list events, or remove the key to match mail whatever its event",
            )
        return frozenset(out)
