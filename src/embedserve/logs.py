"""Logging set-up: every line carries its request id (a context variable the request middleware sets);
`text` for people, `json` one object per line with the record's fields; both escape control characters
(design note 38), so no text a client sent can start a log line or drive a terminal. `quieted` mutes."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

request_id_var: ContextVar[str] = ContextVar("embedserve_request_id", default="-")

#: Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}

#: Never written raw: C0 controls (NUL, TAB, LF, CR, ESC, ...), DEL, C1 controls (NEL, 8-bit CSI, ...),
#: the Unicode line and paragraph separators (line breaks to str.splitlines and some viewers) and the
#: bidirectional controls (which make a viewer show a line's text in another order).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
#: How orjson writes a C0 control (`\n`, `\u001b`, ...).
_JSON_C0 = re.compile(r"\\[bfnrtu]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
#: Leads every line after a text record's first (its traceback): a record starts at column 0, so no
#: line of an exception's text (whose message may hold a client's text) reads as a record.
CONTINUATION = "    "


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """`text` with every unsafe character written as a Python escape (`\\n`, `\\x1b`, `\\u2028`)."""
    # (every unsafe character is unprintable to str.isprintable, which scans 10x faster than the regex)
    return text if text.isprintable() else _UNSAFE.sub(_escaped, text)


def _escape_lines(text: str, joiner: str) -> str:
    """A multi-line text (a traceback): each line escaped, joined by `joiner`."""
    return joiner.join(escape_controls(line) for line in text.split("\n"))


def _clean(value: Any) -> Any:
    """A record's value for JSON with every string in it escaped (containers become lists)."""
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, dict):
        return {escape_controls(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return value


def _may_hold_controls(json_text: str) -> bool:
    """Whether orjson's output may hold an unsafe character: a C0 control is escaped, DEL is raw, and
    anything not ASCII goes the slow way. An escaped backslash before `n` (or `r`, ...) is a false
    alarm, which costs a needless clean, never a missed one."""
    return not json_text.isascii() or "\x7f" in json_text or _JSON_C0.search(json_text) is not None


def _escaped_str(value: object) -> str:
    """orjson's fallback for a value it cannot write (a Path, an exception): its str(), escaped."""
    return escape_controls(str(value))


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message` on one line, control characters escaped; an
    exception's or stack's lines follow, each escaped and indented by CONTINUATION."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, defaults={"request_id": "-"})

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = escape_controls(self.formatMessage(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                line += "\n" + CONTINUATION + _escape_lines(block.rstrip("\n"), "\n" + CONTINUATION)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message, then the record's fields.
    Strings are escaped as in text (JSON would keep a C1 control or an ESC for whoever decodes it);
    an exception keeps its line breaks inside its JSON string, the lines after its first indented as
    in text, so that printed decoded it shows no line that reads as a record either."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        text = orjson.dumps(out, default=_escaped_str).decode()
        if not record.exc_info and not _may_hold_controls(text):
            return text  # the common record: nothing to escape, and checked at a fraction of the cost
        out = _clean(out)
        if record.exc_info:
            out["exception"] = _escape_lines(self.formatException(record.exc_info), "\n" + CONTINUATION)
        return orjson.dumps(out, default=_escaped_str).decode()


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def quieted(names: Iterable[str], level: int) -> Iterator[None]:
    """The loggers `names` drop records below `level` for the block, then get their own levels back: a
    library that logs every step of one call gets the caller's one summary line instead."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)
