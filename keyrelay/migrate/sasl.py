"""The SASL logins of a Postfix site: a Cyrus ``sasldb2`` and a Dovecot ``passwd-file``.

Login names are kept, and with ``passwords`` (an import with ``--sunset``: the password
bridge, docs/migration.md) each login's password as a hash. A ``sasldb2`` is a Berkeley DB
whose keys are ``USER NUL REALM NUL PROPERTY`` and whose values are the plaintext secrets; it
is read with ``db_dump`` (Debian's db-util), whose exit status says whether the file is a
Berkeley DB at all. ``sasldblistusers2`` is not used: it exits 0 after "listusers failed" on
a missing or foreign file, and loops forever on some Berkeley DB files that are not a
sasldb2 (a Postfix ``hash`` map). Each ``userPassword`` value is hashed with Argon2id as it is
read (keyrelay/passwords.py) and the plaintext dropped at once; without ``passwords`` the
values are skipped unread. Nothing here prints or writes a secret. A ``passwd-file`` line is
``user:password:...``: its first field, and with ``passwords`` its second (a hash, kept as
it is when its scheme is supported), are kept; a bad line is named by its number, never
quoted (it may hold a password).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field

from .. import passwords as hashes
from ..errors import UserError, one_line, printable
from .plan import MigrateError

_DUMP_TOOLS = ("db_dump", "db5.3_dump")
_DUMP_SECONDS = 60


@dataclass(frozen=True)
class Login:
    name: str  # what Postfix sees as sasl_username and the sender map names
    source: str  # "sasldb2 FILE" or "passwd-file FILE"
    aliases: tuple[str, ...] = ()  # other names the sender map may use for it
    password_hash: str | None = field(default=None, repr=False)  # {SCHEME}hash, if imported

    @property
    def username(self) -> str:
        """What applications send as the login name: the plain user where the realm is the
        site's default (Cyrus adds it), else the whole name."""
        return self.aliases[0] if self.aliases else self.name


def _unescape(text: str) -> bytes:
    """A ``db_dump -p`` line: printable bytes as they are, ``\\\\`` a backslash, ``\\XX`` hex."""
    out = bytearray()
    i = 0
    raw = text.encode("latin-1", "replace")
    while i < len(raw):
        if raw[i] == 0x5C and i + 1 < len(raw) and raw[i + 1] == 0x5C:
            out.append(0x5C)
            i += 2
        elif raw[i] == 0x5C and i + 2 < len(raw):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def read_sasldb(path: str, default_realm: str, passwords: bool = False) -> list[Login]:
    """The logins of a sasldb2, as Postfix names them: ``user@realm``, and also plain
    ``user`` when the realm is the site's default (``smtpd_sasl_local_domain``, else
    ``myhostname``: what Cyrus uses for a login without a realm); with ``passwords``, each
    with its secret hashed (Argon2id)."""
    tool = next((t for t in _DUMP_TOOLS if shutil.which(t)), None)
    if tool is None:
        raise MigrateError(f"{path}: reading a sasldb2 needs db_dump (Debian: apt-get install "
                           "db-util)")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise MigrateError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        done = subprocess.run([tool, "-p", path], capture_output=True, timeout=_DUMP_SECONDS,
                              check=False)
    except subprocess.TimeoutExpired:
        raise MigrateError(f"{path}: db_dump did not finish within {_DUMP_SECONDS} s") from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = why[-1].split(": ", 2)[-1] if why else f"exit {done.returncode}"
        raise MigrateError(f"{path}: not a sasldb2 (not a Berkeley DB file that db_dump can "
                           f"read: {one_line(detail)})")
    lines = done.stdout.decode("latin-1").splitlines()
    del done  # the dump holds the secrets: let it go at once
    try:
        start = lines.index("HEADER=END") + 1
    except ValueError:
        raise MigrateError(f"{path}: not a sasldb2 (db_dump gave no data section)") from None
    kind = next((h.split("=", 1)[1] for h in lines[:start] if h.startswith("type=")), "")
    if kind not in ("hash", "btree"):
        raise MigrateError(f"{path}: not a sasldb2 (a Berkeley DB of type {kind or 'unknown'}"
                           ", not hash or btree)")
    found: dict[tuple[str, str], str | None] = {}
    body = lines[start:]
    for i in range(0, len(body), 2):  # key, value, key, value ...
        line = body[i]
        if line == "DATA=END":
            break
        parts = _unescape(line[1:]).split(b"\0")
        if len(parts) != 3 or not parts[0] or not parts[2]:
            raise MigrateError(
                f"{path}: not a sasldb2 (its entries are not USER, REALM and PROPERTY "
                "separated by NUL bytes: is it a Postfix hash map or another Berkeley DB?)")
        user = parts[0].decode("utf-8", "replace")
        realm = parts[1].decode("utf-8", "replace")
        stored = found.get((user, realm))
        if (passwords and parts[2] in (b"userPassword", b"cmusaslsecretPLAIN")
                and i + 1 < len(body)):
            # hashed at once; the plaintext is never kept past this statement
            stored = hashes.hash_plaintext(
                _unescape(body[i + 1][1:]).decode("utf-8", "surrogateescape"))
        found[(user, realm)] = stored
    del lines, body
    logins = []
    for (user, realm), stored in found.items():
        name = f"{user}@{realm}" if realm else user
        aliases = (user,) if realm and realm.lower() == default_realm.lower() else ()
        logins.append(Login(name, f"sasldb2 {path}", aliases, stored))
    return logins


def read_passwd_file(path: str, passwords: bool = False) -> tuple[list[Login], list[str]]:
    """The logins of a Dovecot passwd-file and the report's lines about bad or repeated
    lines (named by number only: a line may hold a password); with ``passwords``, each
    login's hash as it is, when its scheme is one keyrelay verifies."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise MigrateError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if b"\0" in raw:
        raise MigrateError(f"{path}: not a Dovecot passwd-file (it holds NUL bytes: a "
                           "database file? --sasldb reads a sasldb2)")
    logins: dict[str, Login] = {}
    problems = []
    for number, line in enumerate(raw.decode("utf-8", "surrogateescape").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        user, colon, rest = text.partition(":")
        if not colon or not user or user != printable(user) or any(c.isspace() for c in user):
            problems.append(f"{path} line {number}: not `user:password:...` (a passwd-file "
                            "line); skipped (not quoted here: it may hold a password)")
            continue
        if user in logins:
            problems.append(f"{path} line {number}: login `{user}` again (Dovecot uses its "
                            "first line); imported once")
            continue
        stored = None
        if passwords:
            stored = _dovecot_hash(rest.partition(":")[0])
            if stored is None:
                problems.append(f"{path} line {number}: login `{user}`: its password is not a "
                                "hash keyrelay verifies (" + ", ".join(hashes.SCHEMES) + "): "
                                "it gets no password login, only API keys")
        logins[user] = Login(user, f"passwd-file {path}", password_hash=stored)
    return list(logins.values()), problems


def _dovecot_hash(value: str) -> str | None:
    """A passwd-file password field as ``{SCHEME}hash``, or None when keyrelay cannot
    verify it. Without a ``{SCHEME}`` prefix (Dovecot's default_pass_scheme) the scheme is
    told by the hash's own prefix (``$6$`` SHA512-CRYPT ...)."""
    if not value.startswith("{"):
        scheme = next((name for name, prefixes in hashes.SCHEMES.items()
                       if value.startswith(prefixes)), None)
        if scheme is None:
            return None
        value = "{" + scheme + "}" + value
    try:
        return hashes.checked(value)
    except UserError:
        return None
