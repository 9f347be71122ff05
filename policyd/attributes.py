"""Postfix's policy delegation protocol (SMTPD_POLICY_README; docs/postfix-hooks.md section 2).

A request is ``name=value`` lines ended by an empty line; the answer is ``action=...`` and an
empty line. Connections stay open across requests. This module splits a byte stream into
attribute dictionaries and renders an action; it knows nothing about accounts.
"""

from __future__ import annotations

from .errors import BadRequest

# Postfix 3.7 sends about 30 attributes; a client sending far more is not Postfix.
MAX_ATTRIBUTES = 200


class RequestReader:
    """Incremental parser: ``feed`` bytes, get back every complete request in them."""

    def __init__(self, max_request_size: int) -> None:
        self._buffer = bytearray()
        self._searched = 0  # bytes of _buffer already searched for the end of a request
        self._max = max_request_size

    @property
    def pending(self) -> bool:
        """A request has begun but not ended."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, str]]:
        # Usually one whole request arrives at once and nothing is buffered: parse it in place.
        if not self._buffer and len(data) > 2 and data.find(b"\n\n") == len(data) - 2:
            if len(data) - 2 > self._max:
                raise BadRequest(f"policy request longer than {self._max} bytes")
            return [parse_block(data[:-2])]
        # Otherwise append, and search only the new bytes (a request sent in many small pieces
        # costs linear time, not quadratic).
        buffer: bytes | bytearray = data
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        requests: list[dict[str, str]] = []
        start = 0
        search = max(0, self._searched - 1)  # the previous piece may have ended with "\n"
        while True:
            end = buffer.find(b"\n\n", max(start, search))
            if end < 0:
                break
            if end - start > self._max:
                raise BadRequest(f"policy request longer than {self._max} bytes")
            requests.append(parse_block(bytes(buffer[start:end])))
            start = end + 2
        if start or buffer is not self._buffer:
            self._buffer = bytearray(buffer[start:])
        rest = self._buffer
        self._searched = len(rest)
        if rest[:1] == b"\n":
            raise BadRequest("empty policy request (a blank line without attributes)")
        # A final LF may be the first half of the request's end, which is not counted above.
        if len(rest) - rest.endswith(b"\n") > self._max:
            raise BadRequest(f"policy request longer than {self._max} bytes")
        return requests


def parse_block(block: bytes) -> dict[str, str]:
    """One request without its ending blank line."""
    if b"\0" in block:
        raise BadRequest("policy request contains a NUL byte")
    # Postfix sends what the SMTP client said (HELO names, addresses) without recoding;
    # undecodable bytes are kept as surrogates so they can never match a real name.
    text = block.decode("utf-8", "surrogateescape")
    if not text:
        raise BadRequest("empty policy request (a blank line without attributes)")
    lines = text.split("\n")
    if len(lines) > MAX_ATTRIBUTES:
        raise BadRequest(f"policy request with more than {MAX_ATTRIBUTES} attributes")
    attributes: dict[str, str] = {}
    for line in lines:
        name, eq, value = line.partition("=")
        if not eq or not name:
            raise BadRequest(f"policy request line is not name=value: {line[:60]!r}")
        attributes[name] = value
    return attributes


def encode_action(action: str) -> bytes:
    """``action=...`` plus the empty line; line breaks in the text would end the reply early."""
    clean = action.replace("\r", " ").replace("\n", " ")
    return f"action={clean}\n\n".encode("utf-8", "surrogateescape")
