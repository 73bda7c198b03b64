"""Text that must survive any file name or label: for a terminal, for JSON, for CSV.

File names need not be valid UTF-8 (Python holds each undecodable byte as a lone surrogate,
os.fsdecode's surrogateescape), and names or labels may carry control characters. One place
decides how such text is written:

- `terminal_safe`: for people (terminal, sheets, HTML text): control characters, bidi
  overrides and undecodable bytes as visible backslash escapes.
- `json_line` / `utf8_json`: for JSON: unsafe or unencodable characters as \\uXXXX escapes,
  which every JSON reader turns back into the same string (os.fsencode gives the bytes).
- `csv_text` / `csv_unescape`: for CSV: a backslash doubled, a control character as \\u00XX,
  an undecodable byte as \\xHH; a cell starting with = + - @ or ' gets a ' in front, so no
  spreadsheet runs it as a formula (OWASP's advice). `csv_unescape` reverses it.
"""

from __future__ import annotations

import json
import math
import re

# Characters a terminal acts on instead of showing: C0 controls (ESC starts the sequences that
# clear the screen or retitle the window), DEL, C1 controls (0x9b is a one-byte CSI on some
# terminals) and the bidirectional overrides that make a name read differently from its bytes.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
_UNSAFE = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_UNSAFE.update({ord(char): f"\\u{ord(char):04x}" for char in _BIDI})
# A file name that is not valid UTF-8 arrives as lone surrogates (os.fsdecode's
# surrogateescape): show each as the byte it stands for.
_UNSAFE.update({0xDC00 + byte: f"\\x{byte:02x}" for byte in range(0x80, 0x100)})


def terminal_safe(text: str) -> str:
    """`text` with control characters, bidi overrides and undecodable bytes written as visible
    escapes (ESC -> \\x1b, newline -> \\x0a, byte 0xff of a non-UTF-8 name -> \\xff), so that
    nothing printed can move the cursor, recolour or clear the terminal, or fail to encode."""
    safe = text.translate(_UNSAFE)
    # Any other lone surrogate (not from surrogateescape) cannot be encoded either.
    return safe.encode("utf-8", "backslashreplace").decode("utf-8")


def json_bytes(data: object, indent: int | None = 2) -> bytes:
    """`data` as a UTF-8 JSON document ending in a newline; undecodable file-name bytes (lone
    surrogates) become \\udcXX escapes instead of raising UnicodeEncodeError. Never a bare
    NaN or Infinity (not JSON): ValueError instead, so callers check finiteness first."""
    return utf8_json(json_document(data, indent) + "\n")


def json_document(data: object, indent: int | None = 2) -> str:
    """`data` as JSON text, safe to print on a terminal and to encode as UTF-8: json.dumps
    escapes C0 controls, this also DEL, C1 controls, bidi overrides and lone surrogates
    (\\uXXXX, the same characters to any JSON reader); never NaN or Infinity."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False)
    return _JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def utf8_json(document: str) -> bytes:
    """A JSON document (json.dumps with ensure_ascii=False) as UTF-8 bytes, lone surrogates
    written as \\udcXX escapes (they only occur inside strings, where that escape is valid)."""
    return document.encode("utf-8", "backslashreplace")


# Only ever inside JSON strings (the syntax is ASCII), where \uXXXX means the same character.
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f\ud800-\udfff{_BIDI}]")


def finite_or_none(data: object) -> object:
    """`data` with every NaN or infinite float replaced by None (JSON null): for measurements
    that may legitimately be undefined (a validation loss that overflowed)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def json_line(record: dict) -> str:
    """One record as compact JSON text that encodes to UTF-8 whatever the file name, never
    with a bare NaN or Infinity (ValueError instead: a record must not carry one)."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    return _JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _csv_escape_char(match: re.Match) -> str:
    code = ord(match.group())
    if code == 0x5C:
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


_CSV_UNSAFE = re.compile(f"[\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff{_BIDI}]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_text(value: str) -> str:
    """A text cell for CSV: reversibly escaped (see the module docstring) and never a formula."""
    value = _CSV_UNSAFE.sub(_csv_escape_char, value)
    return "'" + value if value.startswith(_FORMULA_START) else value


_CSV_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


def csv_unescape(cell: str) -> str:
    """The text `csv_text` was given (with os.fsencode, a path's original bytes)."""
    if cell.startswith("'"):
        cell = cell[1:]

    def one(match: re.Match) -> str:
        code = match.group(1)
        if code == "\\":
            return "\\"
        if code[0] == "x":
            return chr(0xDC00 + int(code[1:], 16))
        return chr(int(code[1:], 16))

    return _CSV_ESCAPE.sub(one, cell)
