"""The generic validators of configuration files: shapes, text, durations, host:port, URLs.

A :class:`Checker` reads YAML nodes (which know their line) into values; each problem becomes
a :class:`~mail2alert.errors.ConfigProblem` with ``file:line`` and the key's path, and reading
goes on, so an operator sees every problem at once. :mod:`mail2alert.config` builds the
file's schema on it; a manager type's keys (:class:`~mail2alert.managers.base.Option`) are
checked by their kind here.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import ssl
from collections.abc import Collection, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mail2alert.errors import ConfigProblem
from mail2alert.managers.base import Option
from mail2alert.model import Secret
from mail2alert.settings import HostPort, Network

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]iB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
STR = "tag:yaml.org,2002:str"
NULL = "tag:yaml.org,2002:null"
BOOL = "tag:yaml.org,2002:bool"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"


def did_you_mean(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


#: A whole number as written in decimal (YAML 1.1 also reads 0x10, 0b11 and 1:30 as ints).
_DECIMAL = re.compile(r"[-+]?[0-9][0-9_]*")


class Checker:
    """Reads YAML nodes into values, collecting problems (with file:line and key path)
    instead of stopping at the first."""

    def __init__(self, filename: str, env: Mapping[str, str]) -> None:
        self.filename = filename
        self.env = env
        self.problems: list[ConfigProblem] = []
        #: With ``unset_ok``, an unset ``$NAME`` is no problem: it reads as empty and is
        #: listed in :attr:`unset` as (name, key path), for commands that need no secret.
        self.unset_ok = False
        self.unset: list[tuple[str, str]] = []
        #: Relative paths in the file are relative to the file, not to where a command runs,
        #: so every command (and ``serve`` under systemd) finds the same files.
        self.base = Path(filename).parent.absolute()

    def located(self, value: str) -> Path:
        """``value`` as a path: as it is when absolute, else relative to the file."""
        path = Path(value)
        return path if path.is_absolute() else self.base / path

    @staticmethod
    def shown(value: str, path: Path) -> str:
        """``value`` quoted for a message, with where it was looked for when it was relative."""
        return repr(value) if str(path) == value else f"{value!r} ({path})"

    def problem(self, node: Node | None, path: str, message: str) -> None:
        line = line_of(node) if node is not None else 0
        self.problems.append(ConfigProblem(self.filename, line, path, message))

    # -- shapes ---------------------------------------------------------------------------

    def mapping(
        self,
        node: Node,
        path: str,
        *,
        known: Collection[str],
        required: Collection[str] = (),
        what: str = "",
    ) -> dict[str, Node] | None:
        if not isinstance(node, MappingNode):
            self.problem(node, path, f"expected a mapping of keys, got {kind_of(node)}")
            return None
        out: dict[str, Node] = {}
        for key_node, value in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            where = f"{path}.{key}" if path and key else (key or path)
            if not isinstance(key, str):
                self.problem(key_node, path, "keys must be plain names")
            elif key in out:
                self.problem(key_node, where, f"duplicate key {key!r}")
            elif key not in known:
                hint = did_you_mean(key, known)
                self.problem(key_node, where, f"unknown key {key!r}{what}{hint}")
            else:
                out[key] = value
        for key in required:
            if key not in out:
                self.problem(node, path, f"missing required key {key!r}")
        return out

    def sequence(self, node: Node, path: str, *, single_ok: bool = False) -> list[Node] | None:
        if isinstance(node, SequenceNode):
            return list(node.value)
        if single_ok and isinstance(node, ScalarNode) and node.tag != NULL:
            return [node]
        self.problem(node, path, f"expected a list, got {kind_of(node)}")
        return None

    def text(self, node: Node, path: str, *, allow_numbers: bool = False) -> str | None:
        ok_tags = {STR} | ({INT, FLOAT} if allow_numbers else set())
        if not isinstance(node, ScalarNode) or node.tag not in ok_tags:
            self.problem(node, path, f"expected text, got {kind_of(node)}")
            return None
        return self.expand(node, path, str(node.value))

    def expand(self, node: Node, path: str, value: str) -> str | None:
        missing: list[str] = []

        def substitute(found: re.Match[str]) -> str:
            name = found.group(1) or found.group(2)
            if name is None:
                return "$"
            if name not in self.env:
                missing.append(name)
                return ""
            return self.env[name]

        result = _VAR.sub(substitute, value)
        if self.unset_ok:
            self.unset += [(name, path) for name in missing]
            return result
        for name in missing:
            self.problem(node, path, f"environment variable {name!r} is not set")
        return None if missing else result

    def text_list(self, node: Node, path: str) -> list[tuple[str, Node]]:
        items = self.sequence(node, path, single_ok=True) or []
        out: list[tuple[str, Node]] = []
        for i, item in enumerate(items):
            value = self.text(item, f"{path}[{i}]" if isinstance(node, SequenceNode) else path)
            if value is not None:
                out.append((value, item))
        return out

    def seconds(self, node: Node, path: str, *, zero_ok: bool = False) -> float | None:
        raw = node.value if isinstance(node, ScalarNode) and node.tag != NULL else None
        found = _DURATION.match(str(raw)) if raw is not None else None
        if isinstance(node, ScalarNode) and node.tag == STR and found is None:
            expanded = self.expand(node, path, str(raw))
            found = _DURATION.match(expanded) if expanded is not None else None
            if expanded is None:
                return None
        if found is None or (float(found.group(1)) == 0 and not zero_ok):
            what = "a duration" if zero_ok else "a positive duration"
            self.problem(
                node,
                path,
                f"expected {what} like 30s, 10m, 1h, 5d or seconds, got {shown(node)}",
            )
            return None
        return float(found.group(1)) * _UNITS[found.group(2)]

    def integer(
        self, node: Node, path: str, *, minimum: int, maximum: int = 2**31 - 1
    ) -> int | None:
        # YAML 1.1 also reads 0x10, 0b11 and 1:30 as numbers; only decimals are taken.
        if (
            isinstance(node, ScalarNode)
            and node.tag == INT
            and _DECIMAL.fullmatch(node.value)
            and minimum <= int(node.value) <= maximum
        ):
            return int(node.value)
        self.problem(
            node,
            path,
            f"expected a whole number from {minimum} to {maximum}, got {shown(node)}"
            if maximum < 2**31 - 1
            else f"expected a whole number of at least {minimum}, got {shown(node)}",
        )
        return None

    def boolean(self, node: Node, path: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == BOOL:
            return str(node.value).lower() in ("true", "yes", "on")
        self.problem(node, path, f"expected true or false, got {shown(node)}")
        return None

    def host_port(self, node: Node, path: str, *, allow_zero: bool = False) -> HostPort | None:
        value = self.text(node, path)
        if value is None:
            return None
        try:
            return HostPort.parse(value, allow_zero=allow_zero)
        except ValueError as exc:
            self.problem(node, path, str(exc))
            return None

    def size(self, node: Node, path: str) -> int | None:
        """A size in bytes: a whole number, or one with KiB, MiB or GiB (``10MiB``)."""
        raw = str(node.value) if isinstance(node, ScalarNode) and node.tag in (STR, INT) else None
        found = _SIZE.match(raw) if raw is not None else None
        if found is None or int(found.group(1)) == 0:
            self.problem(
                node,
                path,
                f"expected a size like 10MiB, 512KiB or a number of bytes, got {shown(node)}",
            )
            return None
        return int(found.group(1)) * _SIZE_UNITS[(found.group(2) or "").lower()]

    def networks(self, node: Node, path: str) -> tuple[Network, ...] | None:
        """A list of CIDRs or addresses (``10.0.0.0/8``, ``"::1"``); an address is a /32 or
        /128 network."""
        out: list[Network] = []
        good = True
        for value, item in self.text_list(node, path):
            try:
                out.append(ipaddress.ip_network(value.strip(), strict=False))
            except ValueError:
                self.problem(
                    item, path, f"expected an address or a CIDR like 10.0.0.0/8, got {value!r}"
                )
                good = False
        return tuple(out) if good else None

    def ca_bundle(self, node: Node, path: str) -> Path | None:
        """A readable file of CA certificates (PEM), loaded now as TLS will load it."""
        file = self.readable_file(node, path)
        if file is None:
            return None
        try:
            ssl.create_default_context(cafile=str(file))
        except (OSError, ssl.SSLError, ValueError) as exc:
            value = node.value if isinstance(node, ScalarNode) else str(file)
            self.problem(node, path, f"{self.shown(str(value), file)} is no CA bundle: {exc}")
            return None
        return file

    def readable_file(self, node: Node, path: str) -> Path | None:
        """A path to a file mail2alert can read."""
        value = self.text(node, path)
        if value is None:
            return None
        file = self.located(value)
        try:
            with file.open("rb"):
                pass
        except OSError as exc:
            shown = self.shown(value, file)
            self.problem(node, path, f"cannot read {shown}: {exc.strerror or exc}")
            return None
        return file

    def option(self, option: Option, node: Node, path: str) -> object | None:
        if option.kind == "seconds":
            return self.seconds(node, path, zero_ok=option.zero_means_off)
        if option.kind == "bool":
            return self.boolean(node, path)
        value = self.text(node, path)
        if value is None:
            return None
        if option.kind == "secret":
            return Secret(value)
        if option.kind == "url":
            parts = urlsplit(value)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:  # a port above 65535, or no number
                port_ok = False
            if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
                # Not repeated as written: a login may be in it, with no scheme to find it by.
                shown = f"{parts.scheme}://{parts.hostname}" if parts.hostname else "it"
                what = "an http:// or https:// URL with a valid port"
                self.problem(node, path, f"expected {what}, not {shown}")
                return None
            return value.rstrip("/")
        if option.kind == "ca-file":
            bundle = self.ca_bundle(node, path)
            return str(bundle) if bundle is not None else None
        if option.kind == "path":
            file = self.located(value)
            if not file.is_file():
                self.problem(node, path, f"no such file: {self.shown(value, file)}")
                return None
            return str(file)
        return value


def kind_of(node: Node | None) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node is None or node.tag == NULL:
        return "nothing"
    return {BOOL: "true/false", INT: "a number", FLOAT: "a number"}.get(
        node.tag, f"text {node.value!r}"
    )


def shown(node: Node) -> str:
    if isinstance(node, ScalarNode) and node.tag != NULL:
        return repr(node.value)
    return kind_of(node)
