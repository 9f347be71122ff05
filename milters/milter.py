"""The pymilter glue: milter callbacks in, a ``MilterService`` outcome rendered back out.

Negotiated with Postfix (docs/postfix-hooks.md section 4): only MAIL, the headers, the body and
end-of-message are sent to us, all but end-of-message without waiting for a reply
(``@noreply``), and only the macros used are asked for: ``{auth_authen}`` and
``{client_addr}`` at MAIL, ``i`` (the queue id) at end-of-message; Postfix then sends these
instead of its default lists for those two stages.

A callback that Postfix does not wait for cannot answer, so a failure in one is kept on the
message and answered at end-of-message, temporarily (451 4.3.0).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import Milter

from keyrelay.decisions import Action, Reason, temporary

from .service import Message, MessageOutcome, MilterService

log = logging.getLogger("keyrelay.milter")

# -- typed views of pymilter's untyped decorators ---------------------------------------------
_F = TypeVar("_F", bound=Callable[..., Any])


def _noreply(func: _F) -> _F:
    return cast(_F, Milter.noreply(func))


def _symlist(*macros: str) -> Callable[[_F], _F]:
    return cast(Callable[[_F], _F], Milter.symlist(*macros))


def _raw_bytes(func: _F) -> _F:
    return cast(_F, Milter.decode("bytes")(func))


CONTINUE: int = Milter.CONTINUE
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL
_MAX_REPLY_TEXT = 400  # SMTP reply lines stay under RFC 5321's 512 octets


def reply_text(text: str) -> str:
    """``text`` made safe for ``smfi_setreply``: one line of printable ASCII, ``%`` doubled."""
    text = "".join(c if " " <= c <= "~" else _escape(c) for c in text)
    if len(text) > _MAX_REPLY_TEXT:
        text = text[: _MAX_REPLY_TEXT - 3] + "..."
    return text.replace("%", "%%")  # libmilter drops a reply with a lone %


def _escape(char: str) -> str:
    if char in "\t\r\n":
        return " "
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else (
        f"\\U{code:08x}"
    )


class KeyrelayMilter(Milter.Base):  # type: ignore[misc]  # pymilter has no type hints
    """One instance per Postfix connection (pymilter's factory gets a ``functools.partial``)."""

    def __init__(self, service: MilterService) -> None:
        self.service = service
        self.message: Message | None = None

    def negotiate(self, opts: list[int]) -> int:
        result: int = super().negotiate(opts)
        if result != CONTINUE:  # pymilter swallows the reason
            log.error("milter negotiation failed: Postfix will send every event and wait for "
                      "a reply to each")
        return result

    def setsymlist(self, stage: int, *macros: str) -> None:
        # pymilter 1.0.5 hands the C module bytes where its "is" format wants str; the
        # TypeError made negotiate() give up silently: no skipped callbacks, no @noreply
        if not self._actions & Milter.SETSYMLIST:
            raise Milter.DisabledAction("SETSYMLIST")
        self._ctx.setsymlist(stage, " ".join(macros))

    @_noreply
    @_symlist("{auth_authen}", "{client_addr}")
    def envfrom(self, sender: str, *params: str) -> int:
        self._done()  # a message begun and never finished on this connection
        try:
            self.message = self.service.begin(
                self.getsymval("{auth_authen}") or "", self.getsymval("{client_addr}") or ""
            )
        except Exception as exc:  # noqa: BLE001 - answered at end-of-message
            self.message = Message("", "", hash_body=False)
            self.message.fault = exc
        return CONTINUE

    @_noreply
    @_raw_bytes
    def header(self, name: str, value: bytes) -> int:
        message = self.message
        if message is not None and message.identity and message.fault is None:
            try:
                message.header(name, value, self.service.kept_headers)
            except Exception as exc:  # noqa: BLE001 - answered at end-of-message
                message.fault = exc
        return CONTINUE

    @_noreply
    def body(self, chunk: bytes) -> int:
        message = self.message
        if message is not None and message.body_hash is not None and message.fault is None:
            try:
                message.body(chunk)
            except Exception as exc:  # noqa: BLE001 - answered at end-of-message
                message.fault = exc
        return CONTINUE

    @_symlist("i")
    def eom(self) -> int:
        message = self.message
        try:
            outcome = self.service.finish(message, self.getsymval("i") or "")  # never raises
        finally:
            self._done()
        try:
            return self.render(outcome)
        except Exception:  # e.g. the MTA refused an action: never let the mail through
            log.exception("cannot answer Postfix for this message")
            return self.render(MessageOutcome(temporary(Reason.INTERNAL_ERROR)))

    def abort(self) -> int:
        self._done()
        return CONTINUE

    def close(self) -> int:
        self._done()
        return CONTINUE

    def _done(self) -> None:
        if self.message is not None:
            self.message = None
            self.service.end()

    def render(self, outcome: MessageOutcome) -> int:
        """The one place a verdict becomes a milter answer."""
        verdict = outcome.verdict
        if verdict.action is Action.REFUSE:
            self.setreply(str(verdict.code), verdict.status, reply_text(verdict.text))
            return REJECT
        if verdict.action is Action.TEMPFAIL:
            self.setreply(str(verdict.code or 451), verdict.status or "4.3.0",
                          reply_text(verdict.text))
            return TEMPFAIL
        # Inserted at the very top, above Postfix's Received: (index 0, Postfix 2.8+),
        # in the order the signer returned them.
        for value in reversed(outcome.signatures):
            self.addheader("DKIM-Signature", value.decode("ascii"), 0)
        return CONTINUE
