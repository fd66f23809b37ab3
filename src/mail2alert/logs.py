"""Log lines: what may reach one (:func:`loggable`), and JSON lines (``--log-format json``
or ``LOG_FORMAT=json``) for log collectors.

One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` (the
same text as the human-readable format) and, where the line is about one message, its
``queue_id`` and what it tells: ``event`` ``decision`` (routing decided, or a loop was
refused; ``outcome``) or
``delivery`` (one delivery attempt; ``result`` sent, retry or dead). Code adds those fields
with :func:`about`.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Any

FORMATS = ("text", "json")
#: The fields :func:`about` may add to a line.
FIELDS = ("queue_id", "event", "outcome", "result")


#: What must not reach a log line as it came: C0 and C1 controls (a terminal obeys ESC and
#: CSI), DEL, line separators, and the surrogates that stand for undecodable bytes.
_UNLOGGABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that was not UTF-8, as that byte
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def loggable(text: str) -> str:
    """``text`` fit for one log line: control characters and undecodable bytes escaped."""
    return _UNLOGGABLE.sub(_escaped, text)


def about(queue_id: str, event: str, **fields: str) -> dict[str, Any]:
    """``extra=`` for a log call about one message: its queue id and what happened."""
    return {"queue_id": queue_id, "event": event, **fields}


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)
