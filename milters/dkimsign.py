"""DKIM signing without a milter: header values and body bytes in, DKIM-Signature values out.

What it signs (docs/milters.md, "DKIM details"): ``c=relaxed/relaxed``, one signature per
active selector, ``rsa-sha256`` (RFC 6376) with the domain's RSA-2048 key and
``ed25519-sha256`` (RFC 8463) with its Ed25519 key; both hash the same canonical body, so the
body is hashed once.

- The body is canonicalised while it streams in (``RelaxedBodyHash``), so memory does not grow
  with the message: Postfix hands a milter the body in 64 KB chunks.
- Header canonicalisation and header selection are dkimpy's (``dkim.canonicalization.Relaxed``,
  ``dkim.hash_headers``); the private-key operations are OpenSSL's, through ``cryptography``.
  dkimpy's own RSA is pure Python and costs several milliseconds per signature.
- Private keys are loaded once per key file and kept (``KeyStore``); a replaced file (new
  inode, size or mtime) or a changed selector loads again. A ``SigningKey`` never shows its
  key in a ``repr``, and no error message here contains key material.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import Relaxed

from keyrelay.directory.model import Algorithm, Selector
from keyrelay.dkimkeys import PrivateKey, public_key_value
from keyrelay.errors import KeyrelayError

log = logging.getLogger("keyrelay.milter")

# RFC 6376 section 5.4.1's list, plus the MIME headers, Message-ID, Sender and RFC 8058's
# List-Unsubscribe-Post (one-click unsubscribe is only honoured when it is signed).
SIGNED_HEADERS = frozenset({
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "in-reply-to", "references",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc",
    "resent-message-id",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe",
    "list-post", "list-owner", "list-archive",
})
# Signed once more than they occur (once when absent), so that nobody can add one later
# without breaking the signature (RFC 6376 section 8.15). From is the one DMARC and mail
# programs show; the others change what a reader sees or where a reply goes.
OVERSIGNED = ("from", "reply-to", "subject", "to", "cc")
# A header repeated more often than this is signed only in its last instances: the h= list
# (and so the DKIM-Signature header) stays short whatever the message holds.
MAX_SIGNED_INSTANCES = 10

_ALGORITHM_TAG = {Algorithm.RSA_SHA256: b"rsa-sha256", Algorithm.ED25519_SHA256: b"ed25519-sha256"}
_PKCS1 = padding.PKCS1v15()
_PREHASHED = utils.Prehashed(hashes.SHA256())
_WIDTH = 78  # fold the DKIM-Signature header before this column (RFC 5322 section 2.1.1)
_NAME_WIDTH = len("DKIM-Signature: ")


class KeyUnavailable(KeyrelayError):
    """A selector's private key cannot be used (unreadable, malformed, not the published one).

    Our fault, never the sender's: the milter answers temporarily (docs/milters.md, "What it
    answers").
    """


# -- body ----------------------------------------------------------------------------------
# WSP is SP and HTAB (RFC 5234). Tabs become spaces first, so that the regular expression only
# has to touch runs of two or more: about seven times faster on ordinary text than [ \t]+.
_TAB_TO_SPACE = bytes.maketrans(b"\t", b" ")
_SPACE_RUN = re.compile(rb"  +")


class RelaxedBodyHash:
    """SHA-256 of a body under "relaxed" canonicalisation (RFC 6376 section 3.4.4), streamed.

    Feed the body in chunks of any size with ``update()``; memory stays constant whatever the
    body size or line length. A line end is CRLF or a bare LF (what Postfix delivers as CRLF);
    a CR on its own is line content. Runs of WSP become one SP, WSP at line ends and empty
    lines at the end of the body are dropped, a non-empty body ends with CRLF, and an empty
    one (or one of blank lines only) canonicalises to nothing, as dkimpy and Mail::DKIM do.
    """

    __slots__ = ("_any", "_cr", "_hash", "_newlines", "_space")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._cr = False  # the last chunk ended in CR: it may start a CRLF
        self._space = False  # the current line ends in WSP that may still be followed by text
        self._newlines = 0  # line ends not yet hashed: they count only if text follows
        self._any = False  # some text was hashed

    def update(self, chunk: bytes) -> None:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        self._feed(chunk.replace(b"\r\n", b"\n"))

    def _feed(self, data: bytes) -> None:
        data = _SPACE_RUN.sub(b" ", data.translate(_TAB_TO_SPACE))
        if self._space and not data.startswith(b" "):
            data = b" " + data
        self._space = False
        data = data.replace(b" \n", b"\n")  # WSP at the end of a line
        if data.endswith(b" "):  # may be trailing WSP of this line: decide with the next chunk
            data = data[:-1]
            self._space = True
        text = data.rstrip(b"\n")
        newlines = len(data) - len(text)
        if text:
            if self._newlines:
                self._hash.update(b"\r\n" * self._newlines)
            self._hash.update(text.replace(b"\n", b"\r\n"))
            self._newlines = newlines
            self._any = True
        else:
            self._newlines += newlines

    def digest(self) -> bytes:
        """The body hash (``bh=``); call once, after the last chunk."""
        if self._cr:  # a CR at the very end is line content
            self._cr = False
            self._feed(b"\r")
        if self._any:
            self._hash.update(b"\r\n")
        return self._hash.digest()


# -- keys ----------------------------------------------------------------------------------

class SigningKey:
    """One selector's private key, ready to sign. Its ``repr`` never shows the key."""

    __slots__ = ("_private", "algorithm", "selector")

    def __init__(self, selector: str, algorithm: Algorithm, private: PrivateKey) -> None:
        self.selector = selector
        self.algorithm = algorithm
        self._private = private

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign the SHA-256 ``digest`` of the signed headers."""
        if isinstance(self._private, rsa.RSAPrivateKey):
            # RSASSA-PKCS1-v1_5 over SHA-256 (RFC 6376 section 3.3.1)
            return self._private.sign(digest, _PKCS1, _PREHASHED)
        # PureEdDSA over the SHA-256 hash (RFC 8463 section 3)
        return self._private.sign(digest)

    def __repr__(self) -> str:
        return f"<SigningKey selector={self.selector} {self.algorithm} (private key not shown)>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SigningKey is not copied or pickled")


@dataclass(frozen=True, slots=True)
class _Cached:
    file_id: tuple[int, int, int, int]
    identity: tuple[str, Algorithm, str]  # selector name, algorithm, public key
    key: SigningKey


class KeyStore:
    """Private keys by key file, loaded once, reloaded when the file or the selector changes.

    Each use costs one ``stat`` of the key file: rotation writes new files and a changed
    directory names them, and an admin replacing a file in place is noticed too.
    """

    def __init__(self, max_keys: int = 4096) -> None:
        self._keys: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self._max_keys = max_keys

    def __repr__(self) -> str:
        return f"<KeyStore {len(self._keys)} keys (not shown)>"

    def __len__(self) -> int:
        return len(self._keys)

    def keys_for(self, selectors: Iterable[Selector]) -> tuple[SigningKey, ...]:
        """A key for each selector; raises ``KeyUnavailable`` naming the file at fault."""
        return tuple(self.key(selector) for selector in selectors)

    def key(self, selector: Selector) -> SigningKey:
        path = selector.key_file
        try:
            st = os.stat(path)
        except OSError as exc:
            raise KeyUnavailable(f"{path}: {exc.strerror or exc}") from None
        file_id = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        identity = (selector.name, selector.algorithm, selector.public_key)
        cached = self._keys.get(path)
        if cached is not None and cached.file_id == file_id and cached.identity == identity:
            return cached.key
        key = _load(selector, st)
        with self._lock:
            self._keys.pop(path, None)
            self._keys[path] = _Cached(file_id, identity, key)
            while len(self._keys) > self._max_keys:  # the longest unloaded go first
                del self._keys[next(iter(self._keys))]
        return key


def _load(selector: Selector, st: os.stat_result) -> SigningKey:
    path = selector.key_file
    try:
        with open(path, "rb") as handle:
            pem = handle.read()
    except OSError as exc:
        raise KeyUnavailable(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # the library's message is not passed on: nothing derived from the file is shown
        raise KeyUnavailable(f"{path}: not an unencrypted PKCS#8 PEM private key") from None
    finally:
        del pem
    if selector.algorithm is Algorithm.RSA_SHA256:
        if not isinstance(private, rsa.RSAPrivateKey):
            raise KeyUnavailable(f"{path}: not an RSA key, but selector {selector.name} is "
                                 f"{selector.algorithm}")
    elif not isinstance(private, ed25519.Ed25519PrivateKey):
        raise KeyUnavailable(f"{path}: not an Ed25519 key, but selector {selector.name} is "
                             f"{selector.algorithm}")
    if public_key_value(private) != selector.public_key:
        # signing with it would give signatures that fail against the published DNS record
        raise KeyUnavailable(f"{path}: does not match the public key of selector "
                             f"{selector.name} (its DNS record)")
    key = SigningKey(selector.name, selector.algorithm, private)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("DKIM key file %s is accessible to group or others (mode %04o); "
                    "chmod 600 it", path, stat.S_IMODE(st.st_mode))
    log.info("loaded DKIM key of selector %s (%s) from %s", selector.name, selector.algorithm,
             path)
    return key


# -- headers -------------------------------------------------------------------------------
def signed_header_names(names: Iterable[str]) -> list[bytes]:
    """The ``h=`` list for a message with these header names (in message order).

    Every signable header present, in message order (the last ``MAX_SIGNED_INSTANCES`` of a
    repeated one), then one more of each ``OVERSIGNED`` name.
    """
    counts: dict[str, int] = {}
    for name in names:
        lower = name.lower()
        if lower in SIGNED_HEADERS:
            counts[lower] = counts.get(lower, 0) + 1
    listed: list[bytes] = []
    for name, count in counts.items():
        listed.extend([name.encode("ascii")] * min(count, MAX_SIGNED_INSTANCES))
    listed.extend(name.encode("ascii") for name in OVERSIGNED)
    return listed


class _Folder:
    """Builds a header value from atoms, folding (LF or CRLF, then a tab) before _WIDTH."""

    __slots__ = ("column", "fold", "parts")

    def __init__(self, linesep: bytes, column: int = _NAME_WIDTH) -> None:
        self.parts: list[bytes] = []
        self.column = column
        self.fold = linesep + b"\t"

    def add(self, separator: bytes, atom: bytes) -> None:
        """Append ``atom`` after ``separator``, or on a new line in its place."""
        if not self.parts:
            pass  # the first atom opens the value (or its line)
        elif self.column + len(separator) + len(atom) > _WIDTH:
            self.parts.append(self.fold)
            self.column = 8  # a tab
        else:
            self.parts.append(separator)
            self.column += len(separator)
        self.parts.append(atom)
        self.column += len(atom)

    def fill(self, text: bytes) -> None:
        """End the value with ``text`` (base64), broken wherever a line is full."""
        room = max(_WIDTH - self.column, 0)
        self.parts.append(text[:room])
        for i in range(room, len(text), _WIDTH - 8):
            self.parts.append(self.fold)
            self.parts.append(text[i : i + _WIDTH - 8])

    def value(self) -> bytes:
        return b"".join(self.parts)


def _crlf(value: bytes) -> bytes:
    """``value`` with its line ends as CRLF. A milter's header values are folded with LF, and
    dkimpy before 1.1.5 (Debian 12's python3-dkim is 1.1.4) unfolds only CRLF in relaxed
    canonicalisation; later dkimpy unfolds both, to the same result.

    Every LF not after a CR gains one; a CR before an LF is neither doubled nor lost (the
    first replace takes exactly the CR of each CRLF, the second gives each LF exactly one
    back). Most header values are not folded and are returned as they are.
    """
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class _FoldedNames:
    """The folded ``h=`` list by header names and line separator, made once per shape.

    An application sends the same headers in every message, so its ``h=`` list is folded
    once and kept. Bounded: emptied when full (a message with unusual headers folds anew).
    """

    def __init__(self, max_entries: int = 512) -> None:
        self._folded: dict[tuple[tuple[bytes, ...], bytes], bytes] = {}
        self._max = max_entries

    def get(self, include: Sequence[bytes], linesep: bytes) -> bytes:
        key = (tuple(include), linesep)
        folded = self._folded.get(key)
        if folded is None:
            names = _Folder(linesep, column=8)
            last = len(include) - 1
            for i, name in enumerate(include):
                names.add(b"", (b"" if i else b"h=") + name + (b";" if i == last else b":"))
            folded = names.value()
            if len(self._folded) >= self._max:
                self._folded.clear()
            self._folded[key] = folded  # a race only folds the same value twice
        return folded


_FOLDED_NAMES = _FoldedNames()


def sign(
    headers: Sequence[tuple[str, bytes]],
    body_hash: bytes,
    domain: str,
    keys: Sequence[SigningKey],
    timestamp: int,
    linesep: bytes = b"\r\n",
) -> list[bytes]:
    """The DKIM-Signature header values (without the name), one per key, in ``keys`` order.

    ``headers`` are the message's headers in order, as (name, value) with the value as the
    MTA has it (folded or not, with or without the space after the colon: relaxed
    canonicalisation ignores both). ``body_hash`` is ``RelaxedBodyHash.digest()``.
    ``domain`` is the ``d=`` domain (IDNs as A-labels, as the directory stores them).
    ``linesep`` folds the returned values: CRLF for a message on the wire, LF for a milter.
    """
    include = signed_header_names(name for name, _ in headers)
    canonical = Relaxed.canonicalize_headers(
        [(name.encode("utf-8", "surrogateescape"), _crlf(value)) for name, value in headers]
    )
    # RFC 6376 section 3.7: the selected headers, bottom-up per name, each "name:value CRLF",
    # then this DKIM-Signature with an empty b= and no final CRLF. Selected once for all keys.
    signed_part = b"".join(name + b":" + value for name, value in
                           dkim.select_headers(canonical, include))
    d = domain.encode("idna") if not domain.isascii() else domain.encode("ascii")
    t = b"t=" + str(timestamp).encode("ascii") + b";"
    # h= and bh= are the same for every key: folded once, each on lines of their own. A fold
    # inside h= comes after a colon (verifiers split h= at colons and FWS). b= comes last.
    fold = linesep + b"\t"
    bh = b"bh=" + base64.b64encode(body_hash) + b"; b="
    tail = fold + _FOLDED_NAMES.get(include, linesep) + fold + bh
    values = []
    for key in keys:
        folder = _Folder(linesep)
        for atom in (b"v=1;", b"a=" + _ALGORITHM_TAG[key.algorithm] + b";",
                     b"c=relaxed/relaxed;", b"d=" + d + b";",
                     b"s=" + key.selector.encode("ascii") + b";", t):
            folder.add(b" ", atom)
        folder.parts.append(tail)
        folder.column = 8 + len(bh)
        unsigned = folder.value()
        ((_, canonical_value),) = Relaxed.canonicalize_headers(
            [(b"DKIM-Signature", _crlf(unsigned))])
        digest = hashlib.sha256(
            signed_part + b"dkim-signature:" + canonical_value.rstrip()
        ).digest()
        folder.fill(base64.b64encode(key.sign_digest(digest)))
        values.append(folder.value())
    return values
