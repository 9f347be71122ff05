"""Postfix socketmap tables: netstrings (docs/postfix-hooks.md section 3; ``dict_sockmap.c``).

A request is the netstring ``<len>:<name> <key>,``; the reply is a netstring holding
``OK <value>``, ``NOTFOUND ``, ``TEMP <reason>``, ``TIMEOUT <reason>`` or ``PERM <reason>``.
Postfix refuses replies over 100000 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadRequest

MAX_REPLY = 100000
_MAX_DIGITS = 10


@dataclass(frozen=True, slots=True)
class Lookup:
    map_name: str
    key: str


class NetstringReader:
    """Incremental parser of netstrings (https://cr.yp.to/proto/netstrings.txt)."""

    def __init__(self, max_request_size: int) -> None:
        self._buffer = bytearray()
        self._max = max_request_size

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[Lookup]:
        # Append to a bytearray (amortised O(1)) and cut each request off once: a request sent
        # in many small pieces costs linear time, not quadratic.
        self._buffer += data
        buffer = self._buffer
        lookups: list[Lookup] = []
        start = 0
        while start < len(buffer):
            colon = buffer.find(b":", start, start + _MAX_DIGITS + 1)
            if colon < 0:
                head = buffer[start:]
                if len(head) > _MAX_DIGITS or not head.isdigit():
                    raise BadRequest("socketmap request is not a netstring (<length>:<data>,)")
                break
            digits = buffer[start:colon]
            if not digits.isdigit() or (len(digits) > 1 and digits.startswith(b"0")):
                raise BadRequest("socketmap request is not a netstring (<length>:<data>,)")
            length = int(digits)
            if length > self._max:
                raise BadRequest(f"socketmap request longer than {self._max} bytes")
            end = colon + 1 + length
            if len(buffer) <= end:
                break
            if buffer[end : end + 1] != b",":
                raise BadRequest("socketmap netstring does not end with ','")
            lookups.append(parse_lookup(bytes(buffer[colon + 1 : end])))
            start = end + 1
        if start:
            del buffer[:start]
        return lookups


def parse_lookup(payload: bytes) -> Lookup:
    if b"\0" in payload:
        raise BadRequest("socketmap request contains a NUL byte")
    text = payload.decode("utf-8", "surrogateescape")
    name, space, key = text.partition(" ")
    if not space or not name:
        raise BadRequest("socketmap request is not '<map name> <key>'")
    return Lookup(name, key)


def encode(reply: str) -> bytes:
    data = reply.encode("utf-8", "surrogateescape")
    if len(data) > MAX_REPLY:
        # Postfix would refuse it anyway; a temporary answer makes the admin look at the logs.
        data = b"TEMP reply too long for Postfix's socketmap client"
    return b"%d:%s," % (len(data), data)


def ok(value: str) -> bytes:
    return encode(f"OK {value}")


def not_found() -> bytes:
    return encode("NOTFOUND ")


def temp(reason: str) -> bytes:
    return encode(f"TEMP {reason}")


def perm(reason: str) -> bytes:
    return encode(f"PERM {reason}")
