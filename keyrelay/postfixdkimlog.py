"""How the DKIM domain of each signed message reaches Postfix's log, for keyrelay-events
(docs/events.md, "The DKIM domain"): the part of ``keyrelay postfix apply``'s plan
(keyrelay/postfixconf.py) that extends a site's ``milter_header_checks``.

cleanup applies ``milter_header_checks`` to the headers a milter adds, and this table's INFO
action logs "QUEUEID: milter-header-info: header DKIM-Signature: ...: keyrelay-dkim
d=DOMAIN", which keyrelay/events/maillog.py reads. Postfix logs only the first 60 characters
of the header, hence the domain in the INFO text. ``([^;]*;)*`` walks whole tags, so d= is the
tag's name, not text inside another tag's value. ``$$2`` is ``$2`` once main.cf has expanded
it (regexp_table(5): the second group). Inline tables: Postfix 3.7 and later.

A site's own tables come first and are kept as written in main.cf: postconf prints a value
with its inner runs of spaces collapsed, and a pattern's spaces matter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

PARAMETER = "milter_header_checks"
DKIM_HEADER_CHECKS = ("regexp:{{/^DKIM-Signature:([^;]*;)*[[:space:]]*d=([^;[:space:]]+);/ "
                      "INFO keyrelay-dkim d=$$2}}")
DKIM_HEADER_CHECKS_REF = "$keyrelay_dkim_header_checks"
# the reference as one item of a Postfix list ($name or ${name}), wherever in it
_NAMED = re.compile(r"(?:^|[\s,])\$(?:keyrelay_dkim_header_checks|\{keyrelay_dkim_header_checks\})"
                    r"(?=$|[\s,])")


def inline_tables(version: str) -> bool:
    """Whether a Postfix of ``version`` (``mail_version``) has inline tables (3.7 and later);
    an unknown version counts as new enough."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is None or (int(found[1]), int(found[2])) >= (3, 7)


def merge_header_checks(value: str) -> str:
    """The site's ``milter_header_checks`` with keyrelay's table added last: a site's own rule
    for DKIM-Signature headers keeps its effect (the first table that matches a header wins).
    The site's text is kept as it is; a value that already names keyrelay's table, wherever,
    is left alone."""
    value = value.strip()
    if _NAMED.search(value):
        return value
    return f"{value}, {DKIM_HEADER_CHECKS_REF}" if value else DKIM_HEADER_CHECKS_REF


def plan(site: str, as_written: bool, mail_version: str) -> tuple[dict[str, str], list[str]]:
    """The main.cf settings for the site's current ``milter_header_checks`` (``site``; taken
    from main.cf itself when ``as_written``) and the notes for the admin."""
    if not inline_tables(mail_version):
        return {}, [f"Postfix {mail_version} has no inline tables (3.7 and later): "
                    f"{PARAMETER} is left as it is, and delivery events carry no dkim_domain "
                    "(docs/events.md)"]
    merged = merge_header_checks(site)
    notes = []
    if site and not as_written and merged != site:
        notes.append(f"{PARAMETER} spans several lines in main.cf: keyrelay's table is added "
                     "to it on one line, as postconf prints it (a run of spaces inside a "
                     "pattern becomes one); look at it after the change")
    return {"keyrelay_dkim_header_checks": DKIM_HEADER_CHECKS, PARAMETER: merged}, notes


def as_written(main_cf: Path, printed: str) -> str | None:
    """``milter_header_checks`` as main.cf has it, when it is one line (the last one of that
    name) and postconf's ``printed`` value agrees with it but for runs of spaces; else
    None (postconf's value is used)."""
    try:
        lines = main_cf.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError:
        return None
    found: str | None = None
    for i, line in enumerate(lines):
        name, sep, value = line.partition("=")
        if not sep or name.strip() != PARAMETER or line[:1].isspace():
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        continued = (following[:1].isspace() and following.strip()
                     and not following.lstrip().startswith("#"))
        found = None if continued else value.strip()
    if found is None or " ".join(found.split()) != " ".join(printed.split()):
        return None
    return found


__all__: Sequence[str] = ["DKIM_HEADER_CHECKS", "DKIM_HEADER_CHECKS_REF", "PARAMETER",
                          "as_written", "inline_tables", "merge_header_checks", "plan"]
