"""Reading `settings.job`: lenient JSON in, a typed `JobSettings` plus warnings out.

This module owns the syntax and the typing rules of `settings.job` (spec Part B §3). It does not
decide *where* the file lives (the script folder, see `scripts.find_script_dir`) nor what a parse
error means for the job (Kudu treats it as "no settings"; the caller chooses).

Syntax. Kudu parses the file with Newtonsoft's reader, which is laxer than JSON. We accept the same
common extras by rewriting the text into strict JSON and handing that to `json.loads`:

- a UTF-8 BOM; `//` line comments and `/* */` block comments;
- single-quoted strings (and the `\\'` escape in any string), raw line breaks inside strings;
- trailing commas before `}` or `]`;
- unquoted property names made of letters, digits, `_` and `$` (`{is_singleton: true}`);
- empty text, or text with only whitespace and comments, means `{}` (Newtonsoft returns null and
  Kudu falls back to empty settings).

Not accepted (JobSettingsError): `NaN`, `Infinity`, hex numbers, `undefined`, empty array slots, any
top-level value other than an object (Kudu would treat a top-level `null` as `{}`; we reject it).
Duplicate keys: the last one wins, as in Newtonsoft.

Typing. Kudu's getter uses a value only when its runtime type matches; we do the same and also
say so in a warning (`settings.job: "x" must be a JSON boolean, got string; ignored`):

- `is_singleton`, `is_in_place`: JSON booleans only (`"true"` is ignored).
- `stopping_wait_time`: JSON integers only. Newtonsoft reads `60.0` as a double, which Kudu's
  `long` getter ignores, so we ignore it too (with a warning) rather than guess. Integers outside
  the signed 64-bit range are ignored likewise. A negative value is clamped to 0 (warning).
- `schedule`: JSON strings only; an empty string is kept as is (the scheduler decides).

Every key, known or not and whatever its type, is kept in `JobSettings.raw` so that the settings
API can round-trip the file.
"""

from __future__ import annotations

import bisect
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webjobsd.model import JobSettings

__all__ = ["JobSettingsError", "load_job_settings", "parse_job_settings"]

# A settings file is a few hundred bytes; the cap only protects the daemon from a huge file.
MAX_SETTINGS_BYTES = 1024 * 1024

_BOM = "\ufeff"
_WORD_PUNCTUATION = "_$"
_KEYWORDS = frozenset({"true", "false", "null"})
# Newtonsoft keeps integers in a .NET long; a bigger integer is not a long and Kudu ignores it.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Byte-order marks that .NET's ReadAllText honours; UTF-32 first because its LE mark starts
# with the UTF-16 LE one.
_BOM_ENCODINGS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


class JobSettingsError(ValueError):
    """`settings.job` cannot be read or is not a JSON object.

    `line` and `column` (1-based, counted in characters after any BOM) are set when the position
    of the problem is known; `path` when the text came from a file.
    """

    def __init__(
        self,
        reason: str,
        *,
        line: int | None = None,
        column: int | None = None,
        path: Path | None = None,
    ) -> None:
        self.reason = reason
        self.line = line
        self.column = column
        self.path = path
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = str(self.path) if self.path is not None else "settings.job"
        at = f" at line {self.line}, column {self.column}" if self.line is not None else ""
        return f"{where}: {self.reason}{at}"

    def with_path(self, path: Path) -> JobSettingsError:
        return JobSettingsError(self.reason, line=self.line, column=self.column, path=path)


# --- lenient text -> strict JSON ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Emitted:
    """One token written to the strict text, remembered to map json errors back to the source."""

    out_offset: int
    src_offset: int
    verbatim: bool  # same characters in both texts, so offsets inside the token map 1:1


class _Rewriter:
    """Single pass over the lenient text, emitting strict JSON token by token.

    Whitespace and comments are dropped; everything json.loads can judge by itself (numbers,
    escapes, structure) is passed through so that it keeps doing the validation.
    """

    def __init__(self, text: str) -> None:
        self._src = text
        self._pos = 0
        self._out: list[str] = []
        self._out_len = 0
        self._emitted: list[_Emitted] = []
        self._pending_comma: int | None = None  # source offset of a comma not yet written

    def rewrite(self) -> str:
        while True:
            self._skip_insignificant()
            if self._pos >= len(self._src):
                break
            self._token()
        if self._pending_comma is not None:
            # Let json.loads report the dangling comma as "expecting value".
            self._emit(",", self._pending_comma, verbatim=True)
        return "".join(self._out)

    def source_offset(self, out_offset: int) -> int:
        """Where in the source the character at `out_offset` of the strict text came from."""
        if not self._emitted or out_offset >= self._out_len:
            return len(self._src)
        starts = [e.out_offset for e in self._emitted]
        token = self._emitted[max(bisect.bisect_right(starts, out_offset) - 1, 0)]
        inside = out_offset - token.out_offset if token.verbatim else 0
        return token.src_offset + inside

    def error(self, reason: str, src_offset: int) -> JobSettingsError:
        line, column = _line_column(self._src, src_offset)
        return JobSettingsError(reason, line=line, column=column)

    # -- scanning

    def _token(self) -> None:
        start, char = self._pos, self._src[self._pos]
        if char == ",":
            self._pos += 1
            self._flush_comma()
            self._pending_comma = start
            return
        if char in "}]":
            self._drop_trailing_comma()
        else:
            self._flush_comma()
        if char in "{}[]:":
            self._pos += 1
            self._emit(char, start, verbatim=True)
        elif char in "\"'":
            self._string(char)
        elif char == "-" or char.isdigit():
            self._number()
        elif char.isalpha() or char in _WORD_PUNCTUATION:
            self._word()
        else:
            raise self.error(f"unexpected character {char!r}", start)

    def _skip_insignificant(self) -> None:
        src = self._src
        while self._pos < len(src):
            if src[self._pos].isspace():
                self._pos += 1
            elif src.startswith("//", self._pos):
                newline = src.find("\n", self._pos)
                self._pos = len(src) if newline < 0 else newline + 1
            elif src.startswith("/*", self._pos):
                end = src.find("*/", self._pos + 2)
                if end < 0:
                    raise self.error("unterminated /* comment", self._pos)
                self._pos = end + 2
            else:
                return

    def _string(self, quote: str) -> None:
        """Re-quote a '...' or "..." string with double quotes, keeping its escapes for json."""
        start, src = self._pos, self._src
        body: list[str] = []
        i = start + 1
        while i < len(src) and src[i] != quote:
            char = src[i]
            if char == "\\" and i + 1 < len(src):
                # `\'` is not a JSON escape; every other escape is left for json.loads to judge.
                body.append("'" if src[i + 1] == "'" else src[i : i + 2])
                i += 2
                continue
            body.append('\\"' if char == '"' else char)
            i += 1
        if i >= len(src):
            raise self.error("unterminated string", start)
        self._pos = i + 1
        text = '"' + "".join(body) + '"'
        self._emit(text, start, verbatim=text == src[start : self._pos])

    def _number(self) -> None:
        start = self._pos
        self._pos = self._scan_word_end(extra="+-.")
        word = self._src[start : self._pos]
        # Pass the number through as written and let json.loads judge it, except for letters
        # other than an exponent: json.loads would accept `-Infinity`, Kudu's JSON has no use for
        # it, and `0x10` deserves a clearer message than json's.
        if any(char.isalpha() and char not in "eE" for char in word):
            raise self.error(f"unsupported number {word!r}", start)
        self._emit(word, start, verbatim=True)

    def _word(self) -> None:
        start = self._pos
        self._pos = self._scan_word_end(extra="")
        word = self._src[start : self._pos]
        if word in _KEYWORDS:
            self._emit(word, start, verbatim=True)
            return
        # Newtonsoft accepts an unquoted property name; anything else (NaN, undefined) is refused.
        self._skip_insignificant()
        if self._src.startswith(":", self._pos):
            self._emit(json.dumps(word), start, verbatim=False)
            return
        raise self.error(f"unexpected word {word!r}", start)

    def _scan_word_end(self, *, extra: str) -> int:
        src, i = self._src, self._pos + 1
        while i < len(src) and (src[i].isalnum() or src[i] in _WORD_PUNCTUATION or src[i] in extra):
            i += 1
        return i

    # -- commas

    def _flush_comma(self) -> None:
        if self._pending_comma is not None:
            self._emit(",", self._pending_comma, verbatim=True)
            self._pending_comma = None

    def _drop_trailing_comma(self) -> None:
        # Only a comma after a value is a trailing comma; `[,]` stays an error for json.loads.
        if self._pending_comma is not None and self._out and self._out[-1] not in ("{", "[", ","):
            self._pending_comma = None
        else:
            self._flush_comma()

    def _emit(self, text: str, src_offset: int, *, verbatim: bool) -> None:
        self._emitted.append(_Emitted(self._out_len, src_offset, verbatim))
        self._out.append(text)
        self._out_len += len(text)


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def _load_lenient_object(text: str) -> dict[str, Any]:
    text = text.removeprefix(_BOM)
    rewriter = _Rewriter(text)
    strict = rewriter.rewrite()
    if not strict:
        return {}
    try:
        # strict=False: Newtonsoft accepts raw control characters (line breaks) inside strings.
        value = json.loads(strict, strict=False)
    except json.JSONDecodeError as exc:
        raise rewriter.error(exc.msg, rewriter.source_offset(exc.pos)) from None
    except RecursionError:
        raise JobSettingsError("nested too deeply") from None
    if not isinstance(value, dict):
        raise JobSettingsError(
            f"the top-level value must be a JSON object, got {_json_type(value)}"
        )
    return value


# --- typing rules ---------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _ignored(key: str, expected: str, value: object) -> str:
    return f'settings.job: "{key}" must be a JSON {expected}, got {_json_type(value)}; ignored'


def _typed_bool(raw: dict[str, Any], key: str, warnings: list[str]) -> bool | None:
    if key not in raw:
        return None
    value = raw[key]
    if isinstance(value, bool):
        return value
    warnings.append(_ignored(key, "boolean", value))
    return None


def _typed_str(raw: dict[str, Any], key: str, warnings: list[str]) -> str | None:
    if key not in raw:
        return None
    value = raw[key]
    if isinstance(value, str):
        return value
    warnings.append(_ignored(key, "string", value))
    return None


def _typed_wait_seconds(raw: dict[str, Any], key: str, warnings: list[str]) -> float | None:
    if key not in raw:
        return None
    value = raw[key]
    # bool is an int subclass in Python but never a long in Newtonsoft.
    if not isinstance(value, int) or isinstance(value, bool):
        warnings.append(_ignored(key, "integer", value))
        return None
    if not _INT64_MIN <= value <= _INT64_MAX:
        warnings.append(f'settings.job: "{key}" is out of the 64-bit integer range; ignored')
        return None
    if value < 0:
        warnings.append(f'settings.job: "{key}" is negative ({value}); using 0')
        return 0.0
    return float(value)


def parse_job_settings(text: str) -> tuple[JobSettings, list[str]]:
    """Parse `settings.job` text (lenient syntax, see module docstring).

    Returns the settings and human-readable warnings about values ignored for their type.
    Raises JobSettingsError (with line and column when known) when the text is not a JSON object.
    """
    raw = _load_lenient_object(text)
    warnings: list[str] = []
    is_singleton = _typed_bool(raw, "is_singleton", warnings)
    settings = JobSettings(
        raw=raw,
        is_singleton=bool(is_singleton),
        stopping_wait_time_s=_typed_wait_seconds(raw, "stopping_wait_time", warnings),
        is_in_place=_typed_bool(raw, "is_in_place", warnings),
        schedule=_typed_str(raw, "schedule", warnings),
    )
    return settings, warnings


# --- files ----------------------------------------------------------------------------------


def _decode(data: bytes, path: Path) -> str:
    for bom, encoding in _BOM_ENCODINGS:
        if data.startswith(bom):
            data, chosen = data[len(bom) :], encoding
            break
    else:
        chosen = "utf-8"
    try:
        return data.decode(chosen)
    except UnicodeDecodeError as exc:
        reason = f"not valid {chosen.upper()} (byte {exc.start})"
        raise JobSettingsError(reason, path=path) from None


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes, or None when there is no such file (Kudu: `File.Exists` is false).

    Only a regular file is read. A link is followed (a deployed tree may link `settings.job` to
    a shared file), but the open never blocks: `O_NONBLOCK` makes opening a FIFO return at once
    (a blocking open would wedge discovery until a writer appears), and the descriptor's own
    type is checked before reading, so nothing swapped in between a check and the open is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise JobSettingsError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise JobSettingsError(f"cannot read: {_file_type(mode)}, not a file", path=path)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_SETTINGS_BYTES + 1)
    except OSError as exc:
        raise JobSettingsError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    finally:
        os.close(fd)
    if len(data) > MAX_SETTINGS_BYTES:
        raise JobSettingsError(f"larger than {MAX_SETTINGS_BYTES} bytes", path=path)
    return data


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


def load_job_settings(path: Path) -> tuple[JobSettings, list[str]]:
    """Read and parse the `settings.job` file at `path`.

    A missing file gives default settings and no warnings. An unreadable, undecodable (UTF-8, or
    UTF-16/32 with a BOM, as .NET reads it) or unparsable file raises JobSettingsError naming it.
    """
    data = _read_bytes(path)
    if data is None:
        return JobSettings(), []
    text = _decode(data, path)
    try:
        return parse_job_settings(text)
    except JobSettingsError as exc:
        raise exc.with_path(path) from None
