"""PyYAML's syntax errors in words an operator understands, at the line to look at.

PyYAML says what its parser expected (``expected <block end>, but found '?'``); a person
editing a configuration wants to know which line is wrong and how: mostly indentation, an
unclosed quote or bracket, a tab, or a ``:`` inside an unquoted value. What is not
recognised keeps PyYAML's own words, prefixed ``YAML syntax error``.
"""

from __future__ import annotations

import yaml


def explained(exc: yaml.MarkedYAMLError, text: str) -> tuple[int, str]:
    """The line (1-based; 0 when unknown) and the sentence for ``exc`` raised on ``text``."""
    lines = text.splitlines()
    problem, context = exc.problem or "", exc.context or ""
    at = exc.problem_mark or exc.context_mark
    line = at.line + 1 if at is not None else 0
    opened = exc.context_mark.line + 1 if exc.context_mark is not None else line
    here = lines[line - 1] if 0 < line <= len(lines) else ""
    if "'\\t'" in problem or "\t" in here[: len(here) - len(here.lstrip())]:
        return line, "a tab in the indentation: YAML indents with spaces only"
    if "quoted scalar" in context:
        return opened, "a quoted value starts on this line and is never closed"
    if "flow sequence" in context or "flow mapping" in context:
        if "[" in here and "]" not in here and ":" in here.split("[", 1)[1]:
            return line, 'quote a value with "[" in it (IPv6 addresses: "[::1]:1025")'
        bracket = "[" if "sequence" in context else "{"
        return opened, f"a {bracket} opened on this line is not closed where it should be"
    if problem == "mapping values are not allowed here":
        if _indented_under_a_value(lines, line):
            return line, "this line is indented more than the key above it expects"
        return line, 'a value with ": " in it must be quoted ("like: this")'
    if problem.startswith("expected <block end>"):
        return line, (
            "this line is indented differently from the lines it belongs with: line it up"
            " with the key or list item it continues"
        )
    if problem.startswith("expected the node content") and "[" in here:
        return line, f'YAML syntax error: {problem} (quote IPv6 addresses: "[::1]:1025")'
    return line, f"YAML syntax error: {problem or context or 'invalid YAML'}"


def _indented_under_a_value(lines: list[str], line: int) -> bool:
    """Whether line ``line`` is indented deeper than the line before it, which is a
    ``key: value`` line (a value cannot have keys under it)."""
    if not 1 < line <= len(lines):
        return False
    here = lines[line - 1]
    above = next((x for x in reversed(lines[: line - 1]) if x.strip()), "")
    depth = len(here) - len(here.lstrip(" "))
    above_depth = len(above) - len(above.lstrip(" "))
    _, colon, value = above.strip().lstrip("- ").partition(":")
    return depth > above_depth and bool(colon) and bool(value.strip())
