"""Users files: ``name:hash`` lines, the hash bcrypt (``$2b$...``) or argon2 (``$argon2id$...``).

One format serves SMTP AUTH on the listener and the web console's basic auth.
``mail2alert passwd NAME`` writes a line. Blank lines and lines starting with ``#`` are
ignored. A password is only ever compared with a hash, and in the same time whether the
user exists or not.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt

_HASHER = argon2.PasswordHasher()
#: Compared against when the user does not exist, so that the answer takes as long.
_NOBODY = _HASHER.hash("not a password of anyone")


@dataclass(frozen=True)
class UsersProblem:
    """A line of a users file that is not a user."""

    line: int
    message: str


def parse_users(text: str) -> tuple[dict[str, str], list[UsersProblem]]:
    """The users of a users file's ``text`` by name, and what is wrong with its lines."""
    users: dict[str, str] = {}
    problems: list[UsersProblem] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not name or not hashed:
            problems.append(UsersProblem(number, "expected name:hash"))
        elif not hashed.startswith(("$2a$", "$2b$", "$2y$", "$argon2")):
            problems.append(
                UsersProblem(number, f"the hash of {name!r} is not bcrypt ($2b$) or argon2")
            )
        elif name in users:
            problems.append(UsersProblem(number, f"{name!r} is listed twice"))
        else:
            users[name] = hashed
    return users, problems


def read_users(path: Path) -> Mapping[str, str]:
    """The users of the file at ``path``; OSError or ValueError (naming the line) if it
    cannot be used."""
    users, problems = parse_users(path.read_text(encoding="utf-8"))
    if problems:
        first = problems[0]
        raise ValueError(f"{path}:{first.line}: {first.message}")
    return users


@functools.lru_cache(maxsize=8)
def _nobody_like(sample: str) -> str:
    """A hash of no one's password that takes as long to check as ``sample`` (its kind and
    its cost: bcrypt's rounds, argon2's memory, time and lanes)."""
    try:
        if sample.startswith("$2"):
            rounds = int(sample.split("$")[2])
            salt = bcrypt.gensalt(rounds=rounds, prefix=sample[1:3].encode("ascii"))
            return bcrypt.hashpw(b"not a password of anyone", salt).decode("ascii")
        hasher = argon2.PasswordHasher.from_parameters(argon2.extract_parameters(sample))
        return hasher.hash("not a password of anyone")
    except (ValueError, argon2.exceptions.InvalidHashError, argon2.exceptions.HashingError):
        return _NOBODY


def _matches(hashed: str, password: str) -> bool:
    try:
        if hashed.startswith("$2"):
            return bcrypt.checkpw(password.encode("utf-8"), hashed.encode("ascii"))
        return _HASHER.verify(hashed, password)
    except (ValueError, argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def verify(users: Mapping[str, str], name: str, password: str) -> bool:
    """Whether ``password`` is ``name``'s; slow by design (run it off the event loop).

    A name that is no user's is checked against a hash like the file's own (its first
    user's kind and cost), so that the answer takes as long whether the user exists or not.
    """
    hashed = users.get(name)
    if hashed is not None:
        return _matches(hashed, password)
    like = next(iter(users.values()), None)
    _matches(_nobody_like(like) if like is not None else _NOBODY, password)
    return False


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` for a users file."""
    return _HASHER.hash(password)
