"""Import and export of a suppression list as CSV, in the layout of SendGrid's bounce list
(docs/suppressions.md, "CSV"): the header ``email,created,status,reason``, the fields of a
SendGrid bounce record, ``created`` in Unix seconds.

Import reads the whole file first: a file that cannot be read or decoded at all is one error
and nothing is written. Each line that cannot be imported is a ``Problem`` naming the file,
the line and why; the others are imported.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import NamedTuple, TextIO

from ..errors import UserError, printable
from .model import Suppression, make

HEADER = ("email", "created", "status", "reason")
MAX_FILE = 512 * 1024 * 1024  # bytes; a larger file is refused before it is read
MAX_FIELD = 64 * 1024  # characters in one field; the reason is cut to MAX_REASON anyway
_DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


class Problem(NamedTuple):
    line: int
    reason: str


class Parsed(NamedTuple):
    good: list[Suppression]
    problems: list[Problem]
    lines: int  # data lines read (the header not counted)


def read_text(path: str) -> str:
    """The file's text (UTF-8, a BOM dropped); UserError naming the file when it cannot be
    read at all."""
    shown = printable(path)
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > MAX_FILE:
                raise UserError(f"{shown}: larger than {MAX_FILE // (1024 * 1024)} MiB; split "
                                "it; nothing was imported")
            data = handle.read()
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror}; nothing was imported") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{shown}:{line}: not UTF-8 text (byte {exc.start + 1}); nothing was "
                        "imported") from None


def _created(text: str, now: int) -> int:
    """Unix seconds, or a date (UTC unless it names its offset); ValueError otherwise."""
    text = text.strip()
    if not text:
        return now
    if text.isdigit() or (text.replace(".", "", 1).isdigit() and text.count(".") == 1):
        if len(text.partition(".")[0]) > 15:  # float() would overflow, or lose the digits
            raise ValueError(f"created {text[:20]!r}... is not a time in Unix seconds")
        seconds = int(float(text))
        if seconds > 32503680000:  # after the year 3000: milliseconds
            raise ValueError(f"created {text!r} is not Unix seconds (milliseconds?)")
        return seconds
    for shape in _DATE_FORMATS:
        try:
            return int(datetime.strptime(text, shape).replace(tzinfo=UTC).timestamp())
        except ValueError:
            pass
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"created {printable(text[:40])!r} is neither Unix seconds nor a "
                         "date such as 2026-12-05 08:34:48") from None
    if found.tzinfo is None:
        found = found.replace(tzinfo=UTC)
    return int(found.timestamp())


def parse(text: str, now: int) -> Parsed:
    """The suppressions of a SendGrid-shaped CSV ``text``; the header must name ``email``
    and only columns of SendGrid's bounce list (``email,created,status,reason``, in any
    order). A header that is not SendGrid's is one problem at line 1 and nothing else is
    read."""
    csv.field_size_limit(MAX_FIELD)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    good: list[Suppression] = []
    problems: list[Problem] = []
    try:
        header = next(reader, None)
    except csv.Error as exc:
        return Parsed([], [Problem(1, f"not CSV: {exc}")], 0)
    names = [name.strip().lower() for name in header or []]
    if not names or "email" not in names or any(n not in HEADER for n in names) or len(
            set(names)) != len(names):
        shown = printable(",".join(header or [])[:80])
        return Parsed([], [Problem(1, f"the header {shown!r} is not SendGrid's: expected "
                                      f"{','.join(HEADER)} (email, then any of the others)")],
                      0)
    where = {name: names.index(name) for name in names}
    lines = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(Problem(start, f"not CSV: {exc}"))
            lines += 1
            continue
        if not row or row == [""]:
            continue
        lines += 1
        if len(row) != len(names):
            problems.append(Problem(start, f"{len(row)} columns, the header has {len(names)}"))
            continue
        email = row[where["email"]]
        try:
            created = _created(row[where["created"]], now) if "created" in where else now
            status = row[where["status"]] if "status" in where else ""
            reason = row[where["reason"]] if "reason" in where else ""
            good.append(make(email, reason, status, created, "import"))
        except (UserError, ValueError) as exc:
            problems.append(Problem(start, str(exc) if isinstance(exc, ValueError) else
                                    f"not an address: '{printable(email[:100])}'"))
    return Parsed(good, problems, lines)


def write(out: TextIO, suppressions: Iterable[Suppression]) -> int:
    """``suppressions`` as CSV with SendGrid's header; how many rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    rows = 0
    for each in suppressions:
        writer.writerow([each.address, str(each.created), each.status, each.reason])
        rows += 1
    return rows


def write_file(path: str, suppressions: Iterable[Suppression]) -> int:
    """``write`` into ``path``, atomically (a file beside it, then renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".suppressions-", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            rows = write(handle, suppressions)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return rows
