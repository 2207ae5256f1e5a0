"""The log formatters: whatever a record carries (a client's path or header in its message, arguments or
fields, an exception whose message holds a forged record), the text format writes one line per record
whose continuation lines (a traceback) are indented, the JSON format one object per line, and neither
writes a raw control character: CR, LF, NUL, TAB, ESC (ANSI sequences), DEL, C1, or a Unicode line
separator."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedserve.logs import CONTINUATION, JsonFormatter, TextFormatter, configure_logging, escape_controls

FORGED = "2026-12-01 07:00:00,000 INFO embedserve.access [forged] DELETE /v1/keys/key_1 200 1.0ms"
FORGED_AT = FORGED[:23]  # its timestamp: a line starting so is the forgery
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
#: Each way a client could try to break a line or drive a terminal, then the forged record.
ATTACKS = [
    f"/x{sep}{FORGED}"
    for sep in (
        "\n",
        "\r\n",
        "\r",
        "\x00",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x85",
        "\u2028",
        "\u2029",
        "\x1b[2K\r",
        "\x1b]0;title\x07\n",
        "\x9b2K\r",
        "\t",
        "\x7f\n",
    )
]
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("a\tb", "a\\tb"),
        ("nul\x00", "nul\\x00"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("del\x7f", "del\\x7f"),
        ("nel\x85", "nel\\x85"),
        ("csi\x9b", "csi\\x9b"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("rlo\u202egnp", "rlo\\u202egnp"),
        ("plain /v1/models ü 🚀 \\n", "plain /v1/models ü 🚀 \\n"),
    ],
)
def test_control_characters_are_written_as_python_escapes(raw: str, escaped: str) -> None:
    assert escape_controls(raw) == escaped


@given(st.text())
def test_escaped_text_holds_no_unsafe_character_and_no_line_break(text: str) -> None:
    out = escape_controls(text)
    assert not UNSAFE.search(out)
    assert len(out.splitlines()) <= 1


def record_of(
    message: str,
    *args: Any,
    exc: BaseException | None = None,
    **fields: Any,
) -> logging.LogRecord:
    record = logging.LogRecord(
        "embedserve.access",
        logging.INFO,
        __file__,
        1,
        message,
        args,
        None if exc is None else (type(exc), exc, exc.__traceback__),
    )
    record.request_id = fields.pop("request_id", "req-1")
    record.__dict__.update(fields)
    return record


def raised(message: str) -> BaseException:
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        return exc


def forged_records() -> Iterator[logging.LogRecord]:
    for attack in ATTACKS:
        yield record_of("%s %s %d", "GET", attack, 404, path=attack, user_agent=attack)
        yield record_of(f"GET {attack} 404")  # text already in the message
        yield record_of("unhandled error on %s %s", "GET", attack, exc=raised(attack), request_id=attack)


def assert_one_record_per_line(text: str) -> None:
    assert text.splitlines() == text.split("\n")  # no line break other than LF
    lines = text.split("\n")
    assert RECORD_START.match(lines[0])
    assert all(line.startswith(CONTINUATION) for line in lines[1:])
    assert not any(FORGED in line and line.startswith(FORGED_AT) for line in lines)
    assert not UNSAFE.search(text.replace("\n", ""))


@pytest.mark.parametrize("record", list(forged_records()), ids=lambda r: repr(r.getMessage()[:24]))
def test_a_text_record_is_one_line_and_its_traceback_lines_are_indented(record: logging.LogRecord) -> None:
    assert_one_record_per_line(TextFormatter().format(record))


def test_a_text_traceback_keeps_its_shape_and_a_line_of_its_message_stays_indented() -> None:
    out = TextFormatter().format(
        record_of("unhandled error on %s %s", "GET", "/x", exc=raised(f"boom \x1b[2K\r\n{FORGED}"))
    )
    lines = out.split("\n")
    assert lines[0].endswith("INFO embedserve.access [req-1] unhandled error on GET /x")
    assert lines[1] == CONTINUATION + "Traceback (most recent call last):"
    assert lines[-2:] == [CONTINUATION + "RuntimeError: boom \\x1b[2K\\r", CONTINUATION + FORGED]


def test_a_stack_is_indented_too() -> None:
    record = record_of("here")
    record.stack_info = f"Stack (most recent call last):\n  File x\n{FORGED}"
    assert_one_record_per_line(TextFormatter().format(record))


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.mark.parametrize("record", list(forged_records()), ids=lambda r: repr(r.getMessage()[:24]))
def test_a_json_record_is_one_object_on_one_line_with_escaped_strings(record: logging.LogRecord) -> None:
    out = JsonFormatter().format(record)
    assert out.splitlines() == [out]
    line = json.loads(out)
    for key, value in line.items():
        for text in strings(value):
            # decoded, no string holds a control character; a traceback keeps its own line breaks
            assert not UNSAFE.search(text.replace("\n", "") if key == "exception" else text), (key, text)
    if "exception" in line:  # printed decoded, its lines after the first are indented as in text
        first, *rest = line["exception"].split("\n")
        assert first == "Traceback (most recent call last):"
        assert rest and all(part.startswith(CONTINUATION) for part in rest)


def test_json_fields_of_any_type_are_escaped() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd\nvalue"

    line = json.loads(
        JsonFormatter().format(
            record_of("m", tags=["a\x1b", ("b\n",)], nested={"k\r": "v\x00"}, odd=Odd(), number=3, flag=None)
        )
    )
    assert line["tags"] == ["a\\x1b", ["b\\n"]]
    assert line["nested"] == {"k\\r": "v\\x00"}
    assert line["odd"] == "odd\\nvalue"
    assert (line["number"], line["flag"]) == (3, None)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configured_logging_writes_every_record_on_a_line_of_its_own(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("info", fmt)  # type: ignore[arg-type]
        for record in forged_records():
            logging.getLogger("embedserve.access").handle(record)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert lines == stream.getvalue().rstrip("\n").split("\n")
    starts = [line for line in lines if not line.startswith(CONTINUATION)]
    assert len(starts) == len(list(forged_records()))
    for line in starts:
        if fmt == "json":
            assert json.loads(line)["logger"] == "embedserve.access"
        else:
            assert RECORD_START.match(line) and not line.startswith(FORGED_AT)
