"""Wire codecs of keyrelay-policyd: Dovecot auth (with the PLAIN and LOGIN machines), policy
delegation attributes and socketmap netstrings, without sockets or accounts.

Golden transcripts (tests/golden/policyd/*.transcript) record what Postfix 3.7.11 sends
(docs/postfix-hooks.md sections 1-3; the Dovecot lines follow the format strings of Postfix's
``xsasl_dovecot_server.c``) and the exact bytes the codec answers. The codecs decide nothing,
so where a real daemon would ask the decision engine these tests answer with a fixed fake
decision, named in each transcript's header; that keeps every transcript complete.

Bytes in a transcript are escaped one way only (``\\\\``, ``\\t``, ``\\n``, ``\\r``, ``\\xNN``
for other bytes outside printable ASCII), so comparing the text compares the bytes.
``KEYRELAY_UPDATE_GOLDEN=1 pytest tests/test_policyd_codecs.py`` rewrites the files; review the
diff before committing it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from keyrelay.decisions import Action, Reason, Verdict
from policyd import attributes, dovecot, netstring, sasl, server
from policyd.errors import BadRequest

GOLDEN = Path(__file__).parent / "golden" / "policyd"
UPDATE_GOLDEN = os.environ.get("KEYRELAY_UPDATE_GOLDEN") == "1"

# A recognisable secret: every refusal and every BadRequest below is checked not to contain it.
SECRET_PART = "TOPSECRET-never-log-me"
PASSWORD = "kr.abcdefghijklmnop." + SECRET_PART + "x" * (43 - len(SECRET_PART))
USERNAME = "apikey"
POSTFIX_PID = 31337  # CPID: Postfix's smtpd process id


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def show(data: bytes) -> str:
    """Bytes as one line of text; injective, so equal text means equal bytes."""
    out = []
    for byte in data:
        if byte == 0x5C:
            out.append("\\\\")
        elif byte == 0x09:
            out.append("\\t")
        elif byte == 0x0A:
            out.append("\\n")
        elif byte == 0x0D:
            out.append("\\r")
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


class Transcript:
    """C: client bytes, S: server bytes (one line each), ->: the codec's event."""

    def __init__(self, *header: str) -> None:
        self.lines = [f"# {text}" if text else "#" for text in header]
        self.lines.append(
            "# Regenerate: KEYRELAY_UPDATE_GOLDEN=1 pytest tests/test_policyd_codecs.py"
        )

    def _bytes(self, prefix: str, data: bytes) -> None:
        for line in data.splitlines(keepends=True):
            self.lines.append(f"{prefix}: {show(line)}")

    def client(self, data: bytes) -> None:
        self._bytes("C", data)

    def server(self, data: bytes) -> None:
        self._bytes("S", data)

    def event(self, text: str) -> None:
        self.lines.append(f"   -> {text}")

    def note(self, text: str) -> None:
        self.lines.extend(["", f"# {text}"])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run with KEYRELAY_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(encoding="utf-8"), f"{path} differs (see the diff above)"


def chunkings(data: bytes, seed: int = 20240611, random_runs: int = 20) -> Iterable[list[bytes]]:
    """The same bytes cut at every single position, byte by byte, and in random pieces."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for _ in range(random_runs):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 40))))
        bounds = [0, *cuts, len(data)]
        yield [data[a:b] for a, b in itertools.pairwise(bounds)]


def assert_no_secret(text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for secret in (SECRET_PART, PASSWORD, b64(PASSWORD)[:12], b64(SECRET_PART)[:12]):
        assert secret not in text, f"secret leaked into {text!r}"


# -- Dovecot auth protocol: what Postfix sends --------------------------------------------------
def postfix_handshake() -> list[str]:
    """``xsasl_dovecot_server_connect``: "VERSION\\t%u\\t%u\\n" "CPID\\t%u\\n", major 1 minor 0."""
    return ["VERSION\t1\t0", f"CPID\t{POSTFIX_PID}"]


def postfix_auth(
    request_id: int, mechanism: str, resp: str | None = None, *, secured: bool = True,
    client: str = "192.0.2.7",
) -> str:
    """``xsasl_dovecot_server_first``: the AUTH line byte for byte (service smtp, no escaping)."""
    line = f"AUTH\t{request_id}\t{mechanism}\tservice=smtp\tnologin\tlip=127.0.0.1\trip={client}"
    if secured:
        line += "\tsecured"
    if resp is not None:
        line += f"\tresp={resp}"  # the client's base64, verbatim (only its alphabet is checked)
    return line


def postfix_cont(request_id: int, response: str) -> str:
    """``xsasl_dovecot_server_next``: "CONT\\t%u\\t%s\\n" with the client's line verbatim."""
    return f"CONT\t{request_id}\t{response}"


def plain(authzid: str, authcid: str, password: str) -> str:
    return b64(f"{authzid}\0{authcid}\0{password}")


GREETING = dovecot.greeting(pid=4242, connection_number=7, cookie="c0ffee" * 5 + "00")


def fake_decision(attempt: dovecot.Attempt) -> bytes:
    """Stands in for the decision engine: every finished exchange is accepted."""
    return dovecot.ok(attempt.request_id, attempt.username)


def dovecot_transcript(title: str, lines: list[str | tuple[str, str]]) -> str:
    """Feed the lines to one ServerSession; a (note, line) pair starts a commented section."""
    transcript = Transcript(
        title,
        "C: Postfix 3.7.11 smtpd (xsasl_dovecot_server.c); S: policyd's dovecot codec.",
        "Fake decision: each Attempt is answered dovecot.ok(request_id, username).",
    )
    transcript.server(GREETING)
    session = dovecot.ServerSession()
    for item in lines:
        if isinstance(item, tuple):
            transcript.note(item[0])
            line = item[1]
        else:
            line = item
        transcript.client(line.encode() + b"\n")
        event = session.receive(line)
        if event is None:
            transcript.event("(nothing to send)")
        elif isinstance(event, dovecot.Reply):
            transcript.event("Reply")
            transcript.server(event.data)
            assert_no_secret(event.data)
        else:
            assert event.password == PASSWORD
            assert PASSWORD not in repr(event)
            transcript.event(repr(event))
            transcript.server(fake_decision(event))
    return transcript.text()


def test_dovecot_logins_as_postfix_sends_them_match_the_golden_transcript() -> None:
    lines: list[str | tuple[str, str]] = [
        *postfix_handshake(),
        ("PLAIN with initial response, under STARTTLS", postfix_auth(
            1, "PLAIN", plain("", USERNAME, PASSWORD))),
        ("PLAIN without initial response: empty challenge (334 ), then the message",
         postfix_auth(2, "PLAIN")),
        postfix_cont(2, plain("", USERNAME, PASSWORD)),
        ("LOGIN without initial response: Username:, then Password:", postfix_auth(3, "LOGIN")),
        postfix_cont(3, b64(USERNAME)),
        postfix_cont(3, b64(PASSWORD)),
        ("LOGIN with the username as initial response (AUTH LOGIN YXBpa2V5)",
         postfix_auth(4, "LOGIN", b64(USERNAME))),
        postfix_cont(4, b64(PASSWORD)),
        ("mechanism as the client typed it, on a session without TLS",
         postfix_auth(5, "plain", plain("", USERNAME, PASSWORD), secured=False,
                      client="2001:db8::25")),
        ("authzid equal to authcid is the same login", postfix_auth(
            6, "PLAIN", plain(USERNAME, USERNAME, PASSWORD))),
    ]
    assert_golden("dovecot_logins.transcript", dovecot_transcript(
        "Dovecot auth protocol: successful exchanges on one persistent connection", lines))


def test_dovecot_refusals_of_the_codec_match_the_golden_transcript() -> None:
    lines: list[str | tuple[str, str]] = [
        *postfix_handshake(),
        ("AUTH PLAIN = (RFC 4954: empty initial response) is a PLAIN message without NULs",
         postfix_auth(1, "PLAIN", "=")),
        ("AUTH LOGIN = (empty initial response) asks for the username like Dovecot",
         postfix_auth(2, "LOGIN", "=")),
        postfix_cont(2, b64(USERNAME)),
        postfix_cont(2, b64(PASSWORD)),
        ("base64 without its padding passes Postfix's alphabet check, not ours",
         postfix_auth(3, "PLAIN", plain("", USERNAME, PASSWORD).rstrip("="))),
        ("invalid base64 in a continued response",
         postfix_auth(4, "LOGIN")),
        postfix_cont(4, b64(USERNAME)),
        postfix_cont(4, "not*base64"),
        ("acting as someone else (authzid) is not offered",
         postfix_auth(5, "PLAIN", plain("admin", USERNAME, PASSWORD))),
        ("PLAIN message with one NUL instead of two",
         postfix_auth(6, "PLAIN", b64(f"{USERNAME}\0{PASSWORD}"))),
        ("PLAIN message with three NULs",
         postfix_auth(7, "PLAIN", b64(f"\0{USERNAME}\0{PASSWORD}\0"))),
        ("username that is not UTF-8",
         postfix_auth(8, "PLAIN", b64(b"\0api\xffkey\0" + PASSWORD.encode()))),
        ("password that is not UTF-8",
         postfix_auth(9, "PLAIN", b64(b"\0apikey\0" + PASSWORD.encode() + b"\xc3"))),
        ("LOGIN username with a NUL byte", postfix_auth(10, "LOGIN", b64(b"api\0key"))),
        ("a mechanism we do not offer (Postfix itself never sends one)",
         postfix_auth(11, "CRAM-MD5")),
        ("the client aborted with '*' (Postfix answers 501 itself and tells us nothing); "
         "the next AUTH on the connection works", postfix_auth(12, "LOGIN")),
        postfix_auth(13, "PLAIN", plain("", USERNAME, PASSWORD)),
    ]
    assert_golden("dovecot_refusals.transcript", dovecot_transcript(
        "Dovecot auth protocol: exchanges the codec itself answers with FAIL", lines))


def test_greeting_is_version_1_with_plain_and_login_marked_plaintext_then_done() -> None:
    assert GREETING.decode().split("\n") == [
        "VERSION\t1\t2", "MECH\tPLAIN\tplaintext", "MECH\tLOGIN\tplaintext", "SPID\t4242",
        "CUID\t7", f"COOKIE\t{'c0ffee' * 5}00", "DONE", "",
    ]


def ready_session() -> dovecot.ServerSession:
    session = dovecot.ServerSession()
    for line in postfix_handshake():
        assert session.receive(line) is None
    return session


def test_login_attempt_carries_client_address_tls_flag_service_and_password() -> None:
    event = ready_session().receive(postfix_auth(9, "PLAIN", plain("", USERNAME, PASSWORD)))
    assert event == dovecot.Attempt(
        request_id="9", mechanism="PLAIN", username=USERNAME, password=PASSWORD,
        client_address="192.0.2.7", secured=True, service="smtp",
        # Postfix's parameters as sent, for a login passed on to the site's Dovecot; never
        # the response (resp=), which holds the password
        params=("service=smtp", "nologin", "lip=127.0.0.1", "rip=192.0.2.7", "secured"),
    )


def test_ok_and_fail_replies_replace_control_characters_that_would_break_the_line() -> None:
    assert dovecot.ok("3", "acme:abc\tdef\n") == b"OK\t3\tuser=acme:abc def \n"
    assert dovecot.fail("3", "no\tway\r\nout\x01") == b"FAIL\t3\treason=no way  out \n"
    assert dovecot.cont("3", b"") == b"CONT\t3\t\n"
    assert dovecot.cont("3", b"Username:") == b"CONT\t3\tVXNlcm5hbWU6\n"


def test_postfix_sends_nothing_escaped_so_fields_are_taken_verbatim() -> None:
    """Postfix formats AUTH/CONT with plain %s (no Dovecot tab-escaping): the values are IP
    addresses, smtpd_sasl_service and base64 it checked against [A-Za-z0-9+/=]. A byte 0x01
    (Dovecot's escape character) therefore never needs un-escaping; were it ever sent, it is
    kept as it is, never interpreted."""
    session = ready_session()
    event = session.receive(
        "AUTH\t1\tPLAIN\tservice=sm\x01ttp\tnologin\tlip=127.0.0.1\trip=192.0.2.7\tresp="
        + plain("", USERNAME, PASSWORD)
    )
    assert isinstance(event, dovecot.Attempt)
    assert event.service == "sm\x01ttp"


# -- Dovecot: protocol violations close the connection ------------------------------------------
def feed_lines(lines: list[str]) -> list[dovecot.Attempt | dovecot.Reply | None]:
    session = dovecot.ServerSession()
    return [session.receive(line) for line in lines]


HANDSHAKE = postfix_handshake()
BAD_DOVECOT: dict[str, list[str]] = {
    "garbage_first_line": ["\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    "http_request": ["GET / HTTP/1.1"],
    "missing_version_handshake": [f"CPID\t{POSTFIX_PID}"],
    "auth_without_any_handshake": [postfix_auth(1, "PLAIN", plain("", USERNAME, PASSWORD))],
    "wrong_major_version": ["VERSION\t2\t0"],
    "version_without_numbers": ["VERSION"],
    "version_major_not_a_number": ["VERSION\tone\t0"],
    "auth_before_cpid": ["VERSION\t1\t0", postfix_auth(1, "PLAIN", plain("", "a", PASSWORD))],
    "cont_before_cpid": ["VERSION\t1\t0", postfix_cont(1, b64(PASSWORD))],
    "unknown_command": [*HANDSHAKE, "USER\tapikey"],
    "version_twice": [*HANDSHAKE, "VERSION\t1\t0"],
    "auth_without_fields": [*HANDSHAKE, "AUTH"],
    "auth_without_mechanism": [*HANDSHAKE, "AUTH\t1"],
    "auth_with_non_numeric_id": [*HANDSHAKE, "AUTH\tx1\tPLAIN"],
    "auth_with_eleven_digit_id": [*HANDSHAKE, "AUTH\t12345678901\tPLAIN"],
    "cont_for_unknown_id": [*HANDSHAKE, postfix_cont(99, b64(PASSWORD))],
    "cont_for_finished_id": [*HANDSHAKE, postfix_auth(1, "PLAIN", plain("", "a", PASSWORD)),
                             postfix_cont(1, b64(PASSWORD))],
    "cont_for_failed_id": [*HANDSHAKE, postfix_auth(1, "LOGIN"), postfix_cont(1, "!!"),
                           postfix_cont(1, b64(PASSWORD))],
    "cont_without_data_field": [*HANDSHAKE, postfix_auth(1, "LOGIN"), "CONT\t1"],
    "cont_with_extra_field": [*HANDSHAKE, postfix_auth(1, "LOGIN"),
                              postfix_cont(1, b64(USERNAME)) + "\textra"],
    "reused_id_in_progress": [*HANDSHAKE, postfix_auth(1, "LOGIN"), postfix_auth(1, "LOGIN")],
    "spaces_instead_of_tabs_with_password": [*HANDSHAKE, f"CONT 1 {b64(PASSWORD)}"],
    "password_alone_on_a_line": [*HANDSHAKE, PASSWORD],
    "password_as_first_line": [PASSWORD],
    "nul_in_command": [*HANDSHAKE, "AUTH\x00\t1\tPLAIN"],
}


@pytest.mark.parametrize("lines", BAD_DOVECOT.values(), ids=BAD_DOVECOT.keys())
def test_dovecot_protocol_violation_raises_bad_request_without_the_secret(
    lines: list[str],
) -> None:
    with pytest.raises(BadRequest) as caught:
        feed_lines(lines)
    assert_no_secret(str(caught.value))


def test_abandoned_exchanges_never_block_later_logins_on_the_connection() -> None:
    """Postfix does not tell the server when a client aborts ('*') or disconnects mid-exchange,
    and reuses the connection for the life of the smtpd process: the oldest abandoned exchanges
    are forgotten instead of the connection being closed."""
    session = ready_session()
    for request_id in range(1, 4 * dovecot.MAX_EXCHANGES):
        reply = session.receive(postfix_auth(request_id, "LOGIN"))
        assert reply == dovecot.Reply(dovecot.cont(str(request_id), b"Username:"))
    last = 4 * dovecot.MAX_EXCHANGES
    event = session.receive(postfix_auth(last, "PLAIN", plain("", USERNAME, PASSWORD)))
    assert isinstance(event, dovecot.Attempt)


def test_too_many_exchanges_keep_only_the_newest_in_memory() -> None:
    session = ready_session()
    for request_id in range(1, dovecot.MAX_EXCHANGES + 2):
        session.receive(postfix_auth(request_id, "LOGIN"))
    with pytest.raises(BadRequest, match="not in progress"):
        session.receive(postfix_cont(1, b64(USERNAME)))  # the oldest was forgotten
    for request_id in range(2, dovecot.MAX_EXCHANGES + 2):  # every newer one still works
        reply = session.receive(postfix_cont(request_id, b64(USERNAME)))
        assert reply == dovecot.Reply(dovecot.cont(str(request_id), b"Password:"))


def test_exchanges_with_different_ids_interleave_independently() -> None:
    session = ready_session()
    session.receive(postfix_auth(1, "LOGIN"))
    session.receive(postfix_auth(2, "LOGIN"))
    session.receive(postfix_cont(2, b64("two")))
    session.receive(postfix_cont(1, b64("one")))
    second = session.receive(postfix_cont(2, b64("pw2")))
    first = session.receive(postfix_cont(1, b64("pw1")))
    assert isinstance(first, dovecot.Attempt) and isinstance(second, dovecot.Attempt)
    assert (first.username, first.password) == ("one", "pw1")
    assert (second.username, second.password) == ("two", "pw2")


def test_a_finished_request_id_may_start_again() -> None:
    session = ready_session()
    for _ in range(2):
        event = session.receive(postfix_auth(1, "PLAIN", plain("", USERNAME, PASSWORD)))
        assert isinstance(event, dovecot.Attempt)


FAILING_EXCHANGES: dict[str, list[str]] = {
    "invalid_base64_initial_response": [postfix_auth(1, "PLAIN", "AGFwaWtleQBrci5")],
    "non_ascii_initial_response": [postfix_auth(1, "PLAIN", "AGFwaWtleQ\u00e9")],
    "invalid_base64_continued_response": [postfix_auth(1, "LOGIN"), postfix_cont(1, "#")],
    "authzid_other_than_authcid": [postfix_auth(1, "PLAIN", plain("root", USERNAME, PASSWORD))],
    "plain_with_one_nul": [postfix_auth(1, "PLAIN", b64(f"{USERNAME}\0{PASSWORD}"))],
    "plain_without_nul": [postfix_auth(1, "PLAIN", b64(PASSWORD))],
    "plain_with_three_nuls": [postfix_auth(1, "PLAIN", b64(f"\0{USERNAME}\0{PASSWORD}\0x"))],
    "plain_empty_message": [postfix_auth(1, "PLAIN"), postfix_cont(1, "")],
    "plain_non_utf8_username": [postfix_auth(1, "PLAIN", b64(b"\0\xff\0" + PASSWORD.encode()))],
    "plain_non_utf8_password": [
        postfix_auth(1, "PLAIN", b64(b"\0apikey\0" + PASSWORD.encode() + b"\xff"))],
    "login_nul_in_username": [postfix_auth(1, "LOGIN"), postfix_cont(1, b64(b"a\0b"))],
    "login_nul_in_password": [
        postfix_auth(1, "LOGIN", b64(USERNAME)), postfix_cont(1, b64(PASSWORD + "\0"))],
    "login_non_utf8_password": [
        postfix_auth(1, "LOGIN", b64(USERNAME)), postfix_cont(1, b64(PASSWORD.encode() + b"\xfe"))],
    "unsupported_mechanism": [postfix_auth(1, "DIGEST-MD5")],
}


@pytest.mark.parametrize("lines", FAILING_EXCHANGES.values(), ids=FAILING_EXCHANGES.keys())
def test_bad_sasl_exchange_gets_a_fail_reply_without_the_secret_and_keeps_the_connection(
    lines: list[str],
) -> None:
    session = ready_session()
    events = [session.receive(line) for line in lines]
    last = events[-1]
    assert isinstance(last, dovecot.Reply)
    assert last.data.startswith(b"FAIL\t1\treason=") and last.data.endswith(b"\n")
    assert last.data.count(b"\n") == 1 and last.data.count(b"\t") == 2
    assert_no_secret(last.data)
    # the connection goes on: the same id may start again and succeed
    event = session.receive(postfix_auth(1, "PLAIN", plain("", USERNAME, PASSWORD)))
    assert isinstance(event, dovecot.Attempt)


# -- SASL machines on their own -----------------------------------------------------------------
def test_plain_machine_returns_credentials_and_hides_the_password_in_repr() -> None:
    step = sasl.Plain().start(f"\0{USERNAME}\0{PASSWORD}".encode())
    assert step == sasl.Credentials(USERNAME, PASSWORD)
    assert PASSWORD not in repr(step)


def test_plain_without_initial_response_challenges_with_empty_data() -> None:
    machine = sasl.Plain()
    assert machine.start(None) == sasl.Challenge(b"")
    assert machine.step(f"\0{USERNAME}\0{PASSWORD}".encode()) == sasl.Credentials(
        USERNAME, PASSWORD)


def test_login_machine_asks_username_then_password() -> None:
    machine = sasl.Login()
    assert machine.start(None) == sasl.Challenge(b"Username:")
    assert machine.step(USERNAME.encode()) == sasl.Challenge(b"Password:")
    assert machine.step(PASSWORD.encode()) == sasl.Credentials(USERNAME, PASSWORD)


def test_login_machine_with_empty_initial_response_asks_for_the_username() -> None:
    assert sasl.Login().start(b"") == sasl.Challenge(b"Username:")


def test_plain_allows_empty_password_and_empty_username_for_the_engine_to_refuse() -> None:
    assert sasl.Plain().start(b"\0\0") == sasl.Credentials("", "")


@pytest.mark.parametrize("text", ["", "YXBpa2V5", "AA==", "////"])
def test_decode_response_accepts_strict_base64(text: str) -> None:
    assert sasl.decode_response(text) == base64.b64decode(text)


@pytest.mark.parametrize("text", ["=", "A", "AA", "YXBpa2V5\n", "YXB pa2V5", "YXBp*2V5", "\u00e9"])
def test_decode_response_rejects_anything_else(text: str) -> None:
    assert sasl.decode_response(text) is None


# -- Dovecot line framing (server.AuthConnection: the codec takes whole lines) ------------------
class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        pass


class _AcceptEveryone:
    """Fake AuthService: allows every attempt as its username (same as fake_decision)."""

    def login(self, attempt: dovecot.Attempt) -> Verdict:
        return Verdict(Action.ALLOW, Reason.OK, identity=attempt.username)

    def log(self, attempt: dovecot.Attempt, verdict: Verdict, seconds: float | None = None
            ) -> None:
        pass

    def log_exchange_failure(self, reply: dovecot.Reply) -> None:
        pass


def auth_connection(limit: int = 4096) -> tuple[server.AuthConnection, _Sink]:
    listener = SimpleNamespace(name="auth", limits=SimpleNamespace(max_request_size=limit))
    conn = server.AuthConnection(cast(Any, listener), cast(Any, _AcceptEveryone()), cuid=1)
    sink = _Sink()
    conn.transport = cast(Any, sink)
    return conn, sink


def run_auth(chunks: list[bytes], limit: int = 4096) -> bytes:
    conn, sink = auth_connection(limit)
    for chunk in chunks:
        conn.received(chunk)
    assert not conn.pending()
    return sink.data


DOVECOT_STREAM = "".join(f"{line}\n" for line in [
    *postfix_handshake(),
    postfix_auth(1, "PLAIN", plain("", USERNAME, PASSWORD)),
    postfix_auth(2, "PLAIN"), postfix_cont(2, plain("", USERNAME, PASSWORD)),
    postfix_auth(3, "LOGIN"), postfix_cont(3, b64(USERNAME)), postfix_cont(3, b64(PASSWORD)),
    postfix_auth(4, "LOGIN", b64(USERNAME)), postfix_cont(4, "%%"),
]).encode()


def test_auth_stream_split_anywhere_gives_the_same_replies() -> None:
    expected = run_auth([DOVECOT_STREAM])
    assert expected.count(b"OK\t") == 3 and expected.count(b"FAIL\t") == 1
    for chunks in chunkings(DOVECOT_STREAM):
        assert run_auth(chunks) == expected


def test_auth_line_at_the_size_bound_passes_and_one_byte_more_closes_whatever_the_chunks() -> None:
    limit = 1024
    prefix = "".join(f"{line}\n" for line in postfix_handshake()).encode()
    base = postfix_auth(1, "PLAIN", plain("", USERNAME, PASSWORD), client="")
    for size, allowed in ((limit, True), (limit + 1, False)):
        line = base.replace("rip=", "rip=" + "9" * (size - len(base)))
        data = prefix + line.encode() + b"\n"
        assert len(line) == size
        for cut in range(len(prefix), len(data) + 1):
            if allowed:
                assert b"OK\t1\t" in run_auth([data[:cut], data[cut:]], limit)
            else:
                with pytest.raises(BadRequest, match="longer than"):
                    run_auth([data[:cut], data[cut:]], limit)


@pytest.mark.parametrize("data", [
    b"VERSION\t1\t0\nCPID\t1\nAUTH\t1\tPLAIN\tresp=\x00" + PASSWORD.encode() + b"\n",
    b"VERSION\t1\t0\nCPID\t1\nAUTH\t1\tPLAIN\tservice=smtp\xff\n",
    b"VERSION\t1\t0\n" + b"A" * 5000,
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)) + b"\n",
], ids=["nul_byte", "not_utf8", "over_long_unterminated", "tls_client_hello"])
def test_bad_auth_bytes_raise_bad_request_without_the_secret(data: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        run_auth([data])
    assert_no_secret(str(caught.value))


def test_auth_lines_may_end_in_crlf() -> None:
    data = DOVECOT_STREAM.replace(b"\n", b"\r\n")
    assert run_auth([data]) == run_auth([DOVECOT_STREAM])


# -- Policy delegation --------------------------------------------------------------------------
def postfix_policy_request(**values: str) -> bytes:
    """The attributes of smtpd_check.c check_policy_service() in 3.7.11, in its order."""
    names = [
        "request", "protocol_state", "protocol_name", "client_address", "client_name",
        "client_port", "reverse_client_name", "server_address", "server_port", "helo_name",
        "sender", "recipient", "recipient_count", "queue_id", "instance", "size",
        "etrn_domain", "stress", "sasl_method", "sasl_username", "sasl_sender",
        "ccert_subject", "ccert_issuer", "ccert_fingerprint", "ccert_pubkey_fingerprint",
        "encryption_protocol", "encryption_cipher", "encryption_keysize", "policy_context",
    ]
    defaults = {
        "request": "smtpd_access_policy", "protocol_name": "ESMTP",
        "client_address": "192.0.2.7", "client_name": "mail.example.net",
        "client_port": "52814", "reverse_client_name": "mail.example.net",
        "server_address": "198.51.100.25", "server_port": "587",
        "helo_name": "mail.example.net", "recipient_count": "0", "size": "0",
        "encryption_keysize": "0",
    }
    unknown = set(values) - set(names)
    assert not unknown, unknown
    merged = {**defaults, **values}
    return b"".join(f"{name}={merged.get(name, '')}\n".encode() for name in names) + b"\n"


TLS = {"encryption_protocol": "TLSv1.3", "encryption_cipher": "TLS_AES_256_GCM_SHA384",
       "encryption_keysize": "256"}
LOGGED_IN = {"sasl_method": "PLAIN", "sasl_username": "acme:abcdefghijklmnop", **TLS}
POLICY_REQUESTS = [
    ("CONNECT with smtpd_delay_reject = no: client and server data only, no TLS yet",
     postfix_policy_request(protocol_state="CONNECT", protocol_name="SMTP", helo_name="")),
    ("first RCPT of a logged-in client: queue id still empty, recipient_count 0",
     postfix_policy_request(protocol_state="RCPT", sender="alice@example.com",
                            recipient="bob@example.org", instance="1f3a.6581c2d4.a7b1c.0",
                            size="2048", **LOGGED_IN)),
    ("END-OF-MESSAGE: queue id, real size, recipient empty after two recipients",
     postfix_policy_request(protocol_state="END-OF-MESSAGE", sender="alice@example.com",
                            recipient_count="2", queue_id="4VxT2L1Kz9z9sQ3",
                            instance="1f3a.6581c2d4.a7b1c.0", size="3187", **LOGGED_IN)),
    ("port 25, no TLS: a HELO name with bytes that are not UTF-8 (kept as surrogates)",
     postfix_policy_request(protocol_state="RCPT", server_port="25", helo_name="h\xe9lo",
                            sender="", recipient="postmaster@example.com").replace(
                                b"h\xc3\xa9lo", b"h\xe9lo")),
]


def fake_policy_decision(request: dict[str, str]) -> str:
    """Stands in for the decision engine: a fixed action per protocol state."""
    return {"RCPT": "FILTER pool_a:", "END-OF-MESSAGE": "DUNNO"}.get(
        request["protocol_state"], "DUNNO")


def test_policy_requests_as_postfix_sends_them_match_the_golden_transcript() -> None:
    transcript = Transcript(
        "Policy delegation (check_policy_service): requests fed in turn to one RequestReader",
        "C: Postfix 3.7.11 smtpd (smtpd_check.c check_policy_service); S: policyd's codec.",
        "Fake decision: FILTER pool_a: at RCPT, DUNNO otherwise. -> shows the parsed request.",
    )
    reader = attributes.RequestReader(max_request_size=65536)
    for note, request in POLICY_REQUESTS:
        transcript.note(note)
        transcript.client(request)
        parsed = reader.feed(request)
        assert len(parsed) == 1 and not reader.pending
        transcript.event(json.dumps(parsed[0]))
        transcript.server(attributes.encode_action(fake_policy_decision(parsed[0])))
    assert_golden("policy_requests.transcript", transcript.text())


def test_policy_request_parses_to_every_attribute_with_empty_values_kept() -> None:
    request = attributes.RequestReader(65536).feed(POLICY_REQUESTS[1][1])[0]
    assert len(request) == 29
    assert request["queue_id"] == "" and request["sasl_username"] == "acme:abcdefghijklmnop"
    assert request["protocol_state"] == "RCPT"


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_the_benchs_postfix_shaped_request_has_postfix_s_attributes_in_postfix_s_order(
        stage: str) -> None:
    """bench/policyd_bench.py --postfix measures policyd on what Postfix 3.7.11 sends: the
    same 29 attributes, in the same order, as the golden transcript's request."""
    from bench.policyd_bench import POSTFIX_POLICY

    text = POSTFIX_POLICY.format(
        stage=stage, port=41234, sender="app@bench.example", recipient="rcpt@example.net",
        count=int(stage == "DATA"), queue_id="4VxT2L1Kz9z9sQ3" if stage == "DATA" else "",
        instance="1f3a.6581c2d4.a7b1c.0", login="bench/s1:abcdefghijklmnop")
    reader = attributes.RequestReader(65536)
    [bench] = reader.feed(text.encode())
    [postfix] = reader.feed(POLICY_REQUESTS[1][1])
    assert list(bench) == list(postfix)
    assert bench["protocol_state"] == stage and bench["policy_context"] == "submission"
    assert (bench["queue_id"] != "") == (bench["recipient_count"] == "1") == (stage == "DATA")


STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 30.50    0.042236          10      4062           newfstatat
 27.93    0.038682          11      3390           write
 15.52    0.021488          10      2072         3 read
  0.00    0.000000           0         1           accept4
------ ----------- ----------- --------- --------- ----------------
100.00    0.138486          10      9525         3 total
"""


def test_the_bench_reads_system_calls_from_strace_s_summary_with_or_without_errors() -> None:
    from bench.policyd_bench import strace_counts

    assert strace_counts(STRACE_SUMMARY) == {"newfstatat": 4062, "write": 3390, "read": 2072,
                                             "accept4": 1}


@pytest.mark.slow
def test_the_benchs_postfix_shaped_load_runs_closed_then_paced_and_reports_cpu() -> None:
    """bench/policyd_bench.py --postfix against a real policyd: every answer was the pool's
    FILTER and every login OK (anything else stops the bench), one line per load with the
    CPU per message and per request (2 requests and 1/per-session login per message)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.policyd_bench", "--postfix", "--keys", "200",
         "--smtpd", "2", "--per-session", "4", "--seconds", "1", "--load", "20"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "RCPT and DATA per message (2.25 requests)" in out, out
    assert re.search(r"^ +closed +\d+ +\d+% +[\d.]+ +[\d.]+ .*\(\d+ messages, \d+ logins\)",
                     out, re.M), out
    assert re.search(r"^ +20 % +\d+ +\d+% +[\d.]+ +[\d.]+ .*offered \d+/s\)", out, re.M), out


def test_policy_value_keeps_equals_signs_and_spaces_after_the_first_equals() -> None:
    assert attributes.parse_block(b"ccert_subject=CN=a b, O=x=y") == {
        "ccert_subject": "CN=a b, O=x=y"}


def test_policy_non_utf8_values_survive_the_round_trip_into_the_action() -> None:
    request = attributes.parse_block(b"helo_name=h\xe9lo")
    assert request["helo_name"] == "h\udce9lo"
    assert attributes.encode_action(f"REJECT bad HELO {request['helo_name']}") == (
        b"action=REJECT bad HELO h\xe9lo\n\n")


def test_encode_action_cannot_end_the_reply_early() -> None:
    assert attributes.encode_action("REJECT a\nb\r\nc") == b"action=REJECT a b  c\n\n"


POLICY_STREAM = b"".join(request for _, request in POLICY_REQUESTS)


def test_policy_stream_split_anywhere_gives_the_same_requests() -> None:
    expected = attributes.RequestReader(65536).feed(POLICY_STREAM)
    assert len(expected) == len(POLICY_REQUESTS)
    for chunks in chunkings(POLICY_STREAM, random_runs=50):
        reader = attributes.RequestReader(65536)
        got = [request for chunk in chunks for request in reader.feed(chunk)]
        assert got == expected
        assert not reader.pending


@pytest.mark.parametrize("size, allowed", [(1024, True), (1025, False)])
def test_policy_request_at_the_size_bound_is_judged_the_same_whatever_the_chunks(
    size: int, allowed: bool,
) -> None:
    block = b"request=smtpd_access_policy\nhelo_name="
    block += b"h" * (size - len(block))
    data = block + b"\n\n"
    for cut in range(len(data) + 1):
        reader = attributes.RequestReader(max_request_size=1024)
        if allowed:
            got = reader.feed(data[:cut]) + reader.feed(data[cut:])
            assert len(got) == 1, f"cut at {cut}"
        else:
            with pytest.raises(BadRequest, match="longer than 1024"):
                reader.feed(data[:cut])
                reader.feed(data[cut:])


def test_policy_reader_reports_a_started_request_as_pending() -> None:
    reader = attributes.RequestReader(65536)
    assert reader.feed(b"request=smtpd_access_policy\n") == [] and reader.pending
    assert len(reader.feed(b"\n")) == 1 and not reader.pending


def test_exactly_200_attributes_are_accepted() -> None:
    block = b"".join(b"a%d=%d\n" % (i, i) for i in range(attributes.MAX_ATTRIBUTES))
    assert len(attributes.RequestReader(65536).feed(block + b"\n")[0]) == 200


BAD_POLICY: dict[str, bytes] = {
    "garbage_bytes": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\xfe\n\n",
    "http_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\n\n",
    "line_without_equals": b"request=smtpd_access_policy\nprotocol_state\n\n",
    "line_with_empty_name": b"request=smtpd_access_policy\n=RCPT\n\n",
    "empty_request": b"\n",
    "empty_request_two_lfs": b"\n\n",
    "blank_line_after_a_request": b"request=smtpd_access_policy\n\n\n",
    "blank_line_inside_a_request": b"request=smtpd_access_policy\n\n\nsender=a@b\n\n",
    "nul_byte": b"request=smtpd_access_policy\nsender=a\x00b\n\n",
    "more_than_200_attributes": b"".join(b"a%d=1\n" % i for i in range(201)) + b"\n",
    "over_long_complete": b"helo_name=" + b"x" * 2000 + b"\n\n",
    "over_long_unterminated": b"helo_name=" + b"x" * 2000,
    "over_long_lines_without_end": b"a=b\n" * 600,
}


@pytest.mark.parametrize("data", BAD_POLICY.values(), ids=BAD_POLICY.keys())
def test_bad_policy_input_raises_bad_request(data: bytes) -> None:
    with pytest.raises(BadRequest):
        attributes.RequestReader(max_request_size=1024).feed(data)


@pytest.mark.parametrize("data", BAD_POLICY.values(), ids=BAD_POLICY.keys())
def test_bad_policy_input_fed_byte_by_byte_raises_bad_request_too(data: bytes) -> None:
    reader = attributes.RequestReader(max_request_size=1024)
    with pytest.raises(BadRequest):
        for i in range(len(data)):
            reader.feed(data[i : i + 1])


# -- Socketmap ----------------------------------------------------------------------------------
def postfix_lookup(map_name: str, key: str) -> bytes:
    """dict_sockmap.c: the netstring "<name> <key>"."""
    payload = f"{map_name} {key}".encode()
    return b"%d:%s," % (len(payload), payload)


SENDER_LOGINS = {"alice@example.com": "acme:abcdefghijklmnop,acme:qrstuvwxyz234567"}


def fake_socketmap_decision(lookup: netstring.Lookup) -> bytes:
    """Stands in for the socketmap service: a two-entry table, one failing key, one map."""
    if lookup.map_name != "sender_login":
        return netstring.perm(f"unknown map {lookup.map_name}")
    if lookup.key == "slow@example.com":
        return netstring.temp("account directory temporarily unavailable")
    if lookup.key in SENDER_LOGINS:
        return netstring.ok(SENDER_LOGINS[lookup.key])
    return netstring.not_found()


SOCKETMAP_LOOKUPS = [
    ("smtpd_sender_login_maps: the lowercased resolved sender",
     postfix_lookup("sender_login", "alice@example.com")),
    ("a sender nobody owns", postfix_lookup("sender_login", "mallory@example.org")),
    ("a quoted local part with a space: the key is everything after the first space",
     postfix_lookup("sender_login", '"alice smith"@example.com')),
    ("the null sender as sender_dependent_default_transport_maps sends it, on a map we lack",
     postfix_lookup("sender_transport", "<>")),
    ("a lookup the directory cannot answer now", postfix_lookup("sender_login",
                                                                "slow@example.com")),
    ("an empty key", postfix_lookup("sender_login", "")),
]


def test_socketmap_lookups_as_postfix_sends_them_match_the_golden_transcript() -> None:
    transcript = Transcript(
        "Socketmap (dict_sockmap.c): lookups on one connection",
        "C: Postfix 3.7.11 (dict_sockmap.c); S: policyd's netstring codec.",
        "Fake decision: a fixed table; PERM for other maps, TEMP for slow@example.com.",
    )
    reader = netstring.NetstringReader(max_request_size=65536)
    for note, request in SOCKETMAP_LOOKUPS:
        transcript.note(note)
        transcript.client(request)
        lookups = reader.feed(request)
        assert len(lookups) == 1 and not reader.pending
        transcript.event(repr(lookups[0]))
        transcript.server(fake_socketmap_decision(lookups[0]))
    assert_golden("socketmap_lookups.transcript", transcript.text())


def test_netstring_replies_match_postfix_socketmap_syntax() -> None:
    assert netstring.ok("a:b,c:d") == b"10:OK a:b,c:d,"
    assert netstring.not_found() == b"9:NOTFOUND ,"
    assert netstring.temp("later") == b"10:TEMP later,"
    assert netstring.perm("no") == b"7:PERM no,"
    assert netstring.encode("\u00e9") == b"2:\xc3\xa9,"


def test_netstring_reply_over_postfix_limit_becomes_a_temporary_error() -> None:
    assert netstring.ok("x" * (netstring.MAX_REPLY - 3)) == (
        b"%d:OK " % netstring.MAX_REPLY + b"x" * (netstring.MAX_REPLY - 3) + b",")
    too_long = netstring.ok("x" * (netstring.MAX_REPLY - 2))
    assert too_long.startswith(b"50:TEMP ") and too_long.endswith(b",")


SOCKETMAP_STREAM = b"".join(request for _, request in SOCKETMAP_LOOKUPS)


def test_socketmap_stream_split_anywhere_gives_the_same_lookups() -> None:
    expected = netstring.NetstringReader(65536).feed(SOCKETMAP_STREAM)
    assert len(expected) == len(SOCKETMAP_LOOKUPS)
    for chunks in chunkings(SOCKETMAP_STREAM, random_runs=50):
        reader = netstring.NetstringReader(65536)
        got = [lookup for chunk in chunks for lookup in reader.feed(chunk)]
        assert got == expected
        assert not reader.pending


@pytest.mark.parametrize("length, allowed", [(1024, True), (1025, False)])
def test_netstring_at_the_size_bound_is_judged_the_same_whatever_the_chunks(
    length: int, allowed: bool,
) -> None:
    payload = b"sender_login " + b"k" * (length - 13)
    data = b"%d:%s," % (len(payload), payload)
    for cut in range(len(data) + 1):
        reader = netstring.NetstringReader(max_request_size=1024)
        if allowed:
            assert len(reader.feed(data[:cut]) + reader.feed(data[cut:])) == 1
        else:
            with pytest.raises(BadRequest, match="longer than 1024"):
                reader.feed(data[:cut])
                reader.feed(data[cut:])


def test_netstring_non_utf8_key_is_kept_as_surrogates() -> None:
    lookup = netstring.parse_lookup(b"sender_login a\xff@example.com")
    assert lookup == netstring.Lookup("sender_login", "a\udcff@example.com")


BAD_NETSTRINGS: dict[str, bytes] = {
    "garbage_bytes": b"\x16\x03\x01\x00\xa5\x01",
    "http_request": b"GET / HTTP/1.1\r\n\r\n",
    "letters_in_length": b"1a:sender_login x,",
    "negative_length": b"-5:a b c,",
    "empty_length": b":sender_login x,",
    "leading_zero": b"014:sender_login x,",
    "zero_with_leading_zero": b"00:,",
    "missing_comma": b"14:sender_login xX",
    "length_too_short": b"5:sender_login x,",
    "eleven_digit_length": b"12345678901:x",
    "length_over_bound": b"1025:sender_login ",
    "ten_digit_length_over_bound": b"9999999999:",
    "payload_without_space": b"12:sender_login,",
    "empty_payload": b"0:,",
    "empty_map_name": b"2: x,",
    "nul_byte": b"14:sender_login \x00,",
    "second_netstring_bad": postfix_lookup("sender_login", "a@b") + b"x:",
}


@pytest.mark.parametrize("data", BAD_NETSTRINGS.values(), ids=BAD_NETSTRINGS.keys())
def test_bad_netstring_raises_bad_request(data: bytes) -> None:
    with pytest.raises(BadRequest):
        netstring.NetstringReader(max_request_size=1024).feed(data)


@pytest.mark.parametrize("data", BAD_NETSTRINGS.values(), ids=BAD_NETSTRINGS.keys())
def test_bad_netstring_fed_byte_by_byte_raises_bad_request_too(data: bytes) -> None:
    reader = netstring.NetstringReader(max_request_size=1024)
    with pytest.raises(BadRequest):
        for i in range(len(data)):
            reader.feed(data[i : i + 1])


# -- Every bad input: BadRequest (or a FAIL reply), never another exception ---------------------
def _random_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = b"0123456789:, =\n\tAUTHCONTVERSIONCPIDPLAINLOGIN\x00\xff\xc3"
    return [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_give_bad_request_or_results_never_another_exception(seed: int) -> None:
    for data in _random_inputs(seed, 400):
        conn, _ = auth_connection(limit=64)
        attempts: list[tuple[Callable[[bytes], object], bytes]] = [
            (attributes.RequestReader(64).feed, data),
            (netstring.NetstringReader(64).feed, data),
            (conn.received, b"VERSION\t1\t0\nCPID\t1\n" + data),
        ]
        for feed, chunk in attempts:
            with contextlib.suppress(BadRequest):
                feed(chunk)
