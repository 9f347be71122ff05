"""keyrelay-milter's callbacks through pymilter's test context (``Milter.testctx.TestCtx``).

Each test drives one milter connection the way libmilter does for Postfix: negotiation (with
the macro lists the milter asks for), MAIL with ``{auth_authen}`` and ``{client_addr}``, the
headers as Postfix sends them (name, value without the first space, folds as LF + blank),
the body in chunks, end-of-message with ``i``. The directory is a real YAML file and the DKIM
keys real key files; signed messages are checked with dkimpy (tests/test_dkimsign.py helpers).
"""

from __future__ import annotations

import functools
import io
import json
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import Milter
import pytest
from Milter import testctx
from test_dkimsign import DnsZone, make_selectors, tags, verified, wire

from keyrelay import admin
from keyrelay.config import Config, parse_config
from keyrelay.directory import YamlDirectory
from keyrelay.directory.model import DomainState
from keyrelay.directory.yamlfile import render
from keyrelay.logs import DecisionLog
from milters import dkimsign
from milters import service as service_module
from milters.milter import KeyrelayMilter, reply_text
from milters.service import Message, MilterService
from testkit.factories import CREATED, NOW, World, key_id

CLIENT = "203.0.113.5"
QUEUE_ID = "4QxYz1ABCD"


# -- the directory -----------------------------------------------------------------------------
@dataclass
class MilterSite:
    """A directory file, its keys and DNS zone, and the API keys of the principals."""

    path: Path
    key_dir: Path
    world: World
    dns: DnsZone = field(default_factory=DnsZone)
    logins: dict[str, str] = field(default_factory=dict)  # principal -> {auth_authen}
    key_texts: dict[str, str] = field(default_factory=dict)  # principal -> full API key

    def signing_domain(self, pid: str, name: str) -> str:
        normal = admin.check_domain_free(self.world.data, name)
        selectors = make_selectors(self.key_dir, normal)
        admin.add_domain(self.world.data, pid, normal, selectors, CREATED)
        admin.mark_verified(self.world.data, normal, NOW - timedelta(days=1))
        self.dns.publish(normal, selectors)
        return normal

    def login(self, pid: str) -> None:
        text = self.world.key(pid)
        self.key_texts[pid] = text
        self.logins[pid] = f"{pid}:{key_id(text)}"

    def save(self) -> None:
        self.path.write_text(render(self.world.data), encoding="utf-8")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> MilterSite:
    """acme (subuser marketing), globex (IP rules); keys for everyone, real DKIM keys."""
    root = tmp_path_factory.mktemp("relay")
    r = MilterSite(root / "directory.yaml", root / "dkim", World())
    w = r.world
    w.account("acme")
    w.subuser("acme/marketing")
    w.account("globex", ip_allow=("192.0.2.0/24",))
    w.account("initech")
    r.signing_domain("acme", "acme.example")
    r.signing_domain("acme", "bücher.example")
    r.signing_domain("acme/marketing", "news.acme.example")
    r.signing_domain("globex", "globex.example")
    w.domain("acme", "pending.acme.example", state=DomainState.PENDING)
    w.sender("initech", "ceo@gmail.example")  # a verified single sender, no domain
    for pid in ("acme", "acme/marketing", "globex", "initech"):
        r.login(pid)
    r.save()
    return r


def make_config(relay: MilterSite, **milter: object) -> Config:
    extra = milter.pop("top", {})
    assert isinstance(extra, dict)
    return parse_config(
        {"directory": {"path": str(relay.path)}, "dkim": {"key_dir": str(relay.key_dir)},
         "milter": milter, **extra},
        "test",
    )


# -- driving a milter connection ---------------------------------------------------------------
class RecordingCtx(testctx.TestCtx):  # type: ignore[misc]
    """TestCtx that records header insertions with their index, and is as strict as the C
    module about ``setsymlist`` (its "is" format: a str, which TestCtx does not check)."""

    def __init__(self) -> None:
        super().__init__()
        self.inserted: list[tuple[str, str, int]] = []

    def setsymlist(self, stage: int, macros: object) -> None:
        if not isinstance(macros, str):
            raise TypeError("setsymlist() argument 2 must be str")
        super().setsymlist(stage, macros)

    def addheader(self, name: str, value: str, idx: int) -> None:
        self.inserted.append((name, value, idx))


@dataclass
class Result:
    rc: int
    reply: tuple[str, ...] | None
    inserted: list[tuple[str, str, int]]
    callbacks: list[int]  # what MAIL, each header and each body chunk returned

    @property
    def signatures(self) -> list[bytes]:
        assert all(name == "DKIM-Signature" and idx == 0 for name, _, idx in self.inserted)
        # every insert goes to index 0, so the last one ends up on top
        return [value.encode("ascii") for _, value, _ in reversed(self.inserted)]


class Connection:
    """One Postfix-to-milter connection; ``send`` runs one message through it."""

    def __init__(self, service: MilterService, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(Milter, "factory", functools.partial(KeyrelayMilter, service))
        self.ctx = RecordingCtx()
        assert self.ctx._connect() == Milter.CONTINUE  # negotiation; connect is not sent

    @property
    def milter(self) -> KeyrelayMilter:
        milter: KeyrelayMilter = self.ctx.getpriv()
        return milter

    def send(
        self,
        headers: Sequence[tuple[str, bytes]],
        body: bytes | Sequence[bytes] = b"Hello\r\n",
        login: str = "",
        client: str = CLIENT,
        queue_id: str = QUEUE_ID,
    ) -> Result:
        ctx = self.ctx
        ctx._macros.clear()
        if login:
            ctx._setsymval("{auth_authen}", login)
        ctx._setsymval("{client_addr}", client)
        ctx._setsymval("i", queue_id)
        ctx._reply = None
        ctx.inserted = []
        callbacks = [ctx._envfrom("<app@example.org>")]
        for name, value in headers:
            callbacks.append(self.milter.header_bytes(name, value))
        chunks = [body] if isinstance(body, bytes) else body
        callbacks += [self.milter.body(chunk) for chunk in chunks if chunk]
        rc = ctx._eom()
        return Result(rc, ctx._reply, ctx.inserted, callbacks)

    def close(self) -> None:
        self.ctx._close()


@dataclass
class Harness:
    relay: MilterSite
    service: MilterService
    log: io.StringIO
    connection: Connection

    def send(self, headers: Sequence[tuple[str, bytes]], body: bytes | Sequence[bytes] = b"Hi\r\n",
             login: str | None = "acme", **kwargs: Any) -> Result:
        identity = self.relay.logins[login] if login in self.relay.logins else (login or "")
        return self.connection.send(headers, body, identity, **kwargs)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def verify(self, result: Result, headers: Sequence[tuple[str, bytes]], body: bytes) -> None:
        assert result.rc == Milter.CONTINUE and result.reply is None
        assert len(result.signatures) == 2
        assert verified(wire(headers, body, result.signatures), self.relay.dns) == [True, True]


def harness(relay: MilterSite, monkeypatch: pytest.MonkeyPatch, config: Config | None = None,
            directory: Any = None) -> Harness:
    config = config or make_config(relay)
    log = io.StringIO()
    decisions = DecisionLog(parse_config({"logging": {"format": "json"}}, "t").logging, log)
    service = MilterService(config, directory or YamlDirectory(str(relay.path)), decisions,
                            clock=lambda: NOW)
    return Harness(relay, service, log, Connection(service, monkeypatch))


@pytest.fixture
def h(relay: MilterSite, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    harness_ = harness(relay, monkeypatch)
    yield harness_
    harness_.connection.close()
    assert harness_.service.in_progress == 0


def message(from_: bytes | None = b"Alice <alice@acme.example>",
            *extra: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    headers = [("From", from_)] if from_ is not None else []
    return [*headers, ("To", b"bob@example.net"), ("Subject", b"hello"),
            ("Date", b"Mon, 02 Jun 2025 12:00:00 +0000"), *extra]


# -- negotiation -------------------------------------------------------------------------------
def test_negotiates_only_the_callbacks_and_macros_it_uses(h: Harness) -> None:
    ctx = h.connection.ctx
    protocol = ctx._protocol
    for skipped in ("P_NOCONNECT", "P_NOHELO", "P_NORCPT", "P_NODATA", "P_NOEOH",
                    "P_NOUNKNOWN"):
        assert protocol & getattr(Milter, skipped), skipped
    for sent in ("P_NOMAIL", "P_NOHDRS", "P_NOBODY"):
        assert not protocol & getattr(Milter, sent), sent
    for no_reply in ("P_NR_MAIL", "P_NR_HDR", "P_NR_BODY"):
        assert protocol & getattr(Milter, no_reply), no_reply
    assert ctx._symlist[Milter.M_ENVFROM] == {b"{auth_authen}", b"{client_addr}"}
    assert ctx._symlist[Milter.M_EOM] == {b"i"}
    assert [s for i, s in enumerate(ctx._symlist) if i not in (Milter.M_ENVFROM, Milter.M_EOM)
            ] == [None] * 5


# -- signing -------------------------------------------------------------------------------------
def test_authenticated_mail_from_own_domain_is_signed_rsa_and_ed25519_on_top(h: Harness) -> None:
    headers = message()
    result = h.send(headers, b"Hello Bob\r\n")
    h.verify(result, headers, b"Hello Bob\r\n")
    assert all(callback == Milter.NOREPLY for callback in result.callbacks)
    found = [tags(value) for value in result.signatures]
    assert [(t["a"], t["d"]) for t in found] == [("rsa-sha256", "acme.example"),
                                                 ("ed25519-sha256", "acme.example")]
    assert all(t["t"] == str(int(NOW.timestamp())) for t in found)
    assert all(b"\r" not in value for value in result.signatures)  # libmilter folds with LF


def test_one_decision_line_per_message_with_queue_id_principal_key_and_dkim(h: Harness) -> None:
    h.send(message())
    (line,) = h.lines()
    assert line["logger"] == "keyrelay.milter"
    assert line["service"] == "milter"
    assert line["queue_id"] == QUEUE_ID
    assert line["client"] == CLIENT
    assert line["principal"] == "acme"
    assert line["key_id"] == key_id(h.relay.key_texts["acme"])
    assert (line["verdict"], line["reason"]) == ("allow", "ok")
    assert line["dkim_domain"] == "acme.example"
    assert line["dkim_selectors"] == "kr20250601-rsa,kr20250601-ed"
    secret = h.relay.key_texts["acme"].rsplit(".", 1)[1]
    assert secret not in h.log.getvalue()


def test_subuser_signs_with_its_own_domain(h: Harness) -> None:
    headers = message(b"news@news.acme.example")
    result = h.send(headers, login="acme/marketing")
    h.verify(result, headers, b"Hi\r\n")
    assert tags(result.signatures[0])["d"] == "news.acme.example"


@pytest.mark.parametrize(
    "from_",
    [
        b'"Alice \\"Al\\" Example" <alice@acme.example>',
        b"alice@acme.example (Alice in a comment)",
        b"=?utf-8?q?Al=C3=AFce_Exampl=C3=A9?= <alice@acme.example>",
        "Alïce Exämple <alice@acme.example>".encode(),
        b"Alice <ALICE@ACME.EXAMPLE>",
        b"alice@Acme.Example",
        "Jörg <joerg@bücher.example>".encode(),
        b"joerg@xn--bcher-kva.example",
        b"Team: alice@acme.example;",
        b"Alice\n <alice@acme.example>",
    ],
    ids=["quoted", "comment", "encoded_word", "utf8_name", "upper_case", "mixed_case_domain",
         "idn_u_label", "idn_punycode", "group_one_member", "folded"],
)
def test_owned_from_in_any_shape_is_signed(h: Harness, from_: bytes) -> None:
    headers = message(from_)
    result = h.send(headers)
    h.verify(result, headers, b"Hi\r\n")
    domain = tags(result.signatures[0])["d"]
    assert domain in ("acme.example", "xn--bcher-kva.example")


def test_several_authors_with_an_owned_sender_are_signed_for_the_sender(h: Harness) -> None:
    headers = message(b"alice@acme.example, bob@acme.example",
                      ("Sender", b"Alice <alice@acme.example>"))
    result = h.send(headers)
    h.verify(result, headers, b"Hi\r\n")


BODIES = {
    "bare_lf": b"line one\nline two  \n\n",
    "crlf": b"line one\r\nline two\r\n",
    "8bit": "Grüße aus Köln\r\n".encode("latin-1"),
    "binary": bytes(range(256)) * 300,
    "empty": b"",
    "no_final_line_end": b"no newline at the end",
}


@pytest.mark.parametrize("name", BODIES)
def test_every_kind_of_body_is_signed_verifiably(h: Harness, name: str) -> None:
    body = BODIES[name]
    headers = message()
    chunks = [body[i : i + 65535] for i in range(0, len(body), 65535)]  # Postfix's chunk size
    h.verify(h.send(headers, chunks), headers, body)


def test_very_long_folded_headers_are_signed_verifiably(h: Harness) -> None:
    subject = b"\n\t".join(b"part%04d of a long subject" % i for i in range(400))
    to = b",\n ".join(b"user%d@example.net" % i for i in range(500))
    headers = [("From", b"Alice <alice@acme.example>"), ("Subject", subject), ("To", to),
               ("X-Long", b"x" * 20000)]
    h.verify(h.send(headers), headers, b"Hi\r\n")


def test_several_messages_on_one_connection_are_decided_independently(h: Harness) -> None:
    first = h.send(message())
    refused = h.send(message(b"someone@elsewhere.example"))
    again = h.send(message(), login=None)
    assert len(first.signatures) == 2
    assert refused.rc == Milter.REJECT
    assert again.rc == Milter.CONTINUE and again.inserted == [] and again.reply is None
    assert [line["verdict"] for line in h.lines()] == ["allow", "refuse", "allow"]


# -- refusals ------------------------------------------------------------------------------------
def refused(result: Result) -> str:
    assert result.rc == Milter.REJECT
    assert result.inserted == []
    assert result.reply is not None
    code, status, text = result.reply
    assert (code, status) == ("550", "5.7.1")
    return text


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        (message(b"Eve <eve@elsewhere.example>"),
         "From: eve@elsewhere.example is not a verified domain or sender of acme"),
        (message(b"news@news.acme.example"),  # the subuser's domain, not the account's
         "From: news@news.acme.example is not a verified domain or sender of acme"),
        (message(None), "the message has no From: header"),
        (message(b"alice@acme.example", ("From", b"alice@acme.example")),
         "the message has 2 From: headers"),
        (message(b"alice@acme.example, bob@acme.example"),
         "the From: header has 2 addresses; add a Sender: header"),
        (message(b"alice@acme.example", ("Sender", b"eve@elsewhere.example")),
         "Sender: eve@elsewhere.example is not a verified domain"),
        (message(b"alice@acme.example, eve@elsewhere.example",
                 ("Sender", b"alice@acme.example")),
         "From: eve@elsewhere.example is not a verified domain"),
        (message(b"Team: alice@acme.example, bob@acme.example;"),
         "the From: header has 2 addresses"),
        (message(b""), "the From: header is empty"),
        (message(b"info@pending.acme.example"), "domain pending.acme.example is not verified"),
    ],
    ids=["not_owned", "subuser_domain", "no_from", "two_from", "two_authors_no_sender",
         "sender_not_owned", "author_not_owned_with_sender", "group_two_members", "empty_from",
         "unverified_domain"],
)
def test_from_or_sender_not_the_principals_is_refused_550_saying_what_to_fix(
    h: Harness, headers: list[tuple[str, bytes]], says: str
) -> None:
    assert says in refused(h.send(headers))
    (line,) = h.lines()
    assert (line["verdict"], line["reason"]) == ("refuse", "header_from_not_owned")
    assert line["reply"].startswith("550 5.7.1 ")


def test_refusal_text_doubles_percent_signs_for_libmilter(h: Harness) -> None:
    text = refused(h.send(message(b"100%off@elsewhere.example")))
    assert "100%%off@elsewhere.example" in text
    assert reply_text("5% off") == "5%% off"


def test_refusal_text_is_one_line_of_ascii(h: Harness) -> None:
    text = refused(h.send(message("Eve <eve@bösewicht.example>".encode())))
    assert text.isascii() and "\n" not in text and "\r" not in text
    assert "eve@xn--bsewicht-" in text  # the address as the engine normalised it


def test_client_outside_the_accounts_ip_rules_is_refused_554(h: Harness) -> None:
    result = h.send(message(b"ops@globex.example"), login="globex")
    assert result.rc == Milter.REJECT
    assert result.reply is not None and result.reply[:2] == ("554", "5.7.1")
    inside = h.send(message(b"ops@globex.example"), login="globex", client="192.0.2.9")
    assert len(inside.signatures) == 2


def test_single_verified_sender_passes_unsigned(h: Harness) -> None:
    # a gmail address verified as a sender: allowed, but there is no key of ours to sign with
    result = h.send(message(b"ceo@gmail.example"), login="initech")
    assert (result.rc, result.reply, result.inserted) == (Milter.CONTINUE, None, [])
    (line,) = h.lines()
    assert line["verdict"] == "allow" and "dkim_domain" not in line


# -- unauthenticated, monitor mode, switches -------------------------------------------------
def test_unauthenticated_mail_is_left_untouched_without_reading_the_directory(
    relay: MilterSite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = YamlDirectory(str(tmp_path / "no-such-directory.yaml"))
    h = harness(relay, monkeypatch, directory=missing)
    result = h.send(message(b"anyone@anywhere.example"), login=None)
    assert (result.rc, result.reply, result.inserted) == (Milter.CONTINUE, None, [])
    (line,) = h.lines()
    assert (line["verdict"], line["reason"]) == ("allow", "unauthenticated")


def test_monitor_mode_logs_the_refusal_and_lets_the_mail_pass_unsigned(
    relay: MilterSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(relay, monkeypatch, make_config(relay, top={"monitor_mode": True}))
    result = h.send(message(b"eve@elsewhere.example"))
    assert (result.rc, result.reply, result.inserted) == (Milter.CONTINUE, None, [])
    (line,) = h.lines()
    assert line["verdict"] == "monitor-allow"
    assert line["reason"] == "header_from_not_owned"
    assert line["would_be"].startswith("550 5.7.1 From: eve@elsewhere.example")
    owned = h.send(message())
    assert len(owned.signatures) == 2  # monitor mode still signs what is the principal's


def test_sender_check_switched_off_logs_and_passes_unsigned(
    relay: MilterSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(relay, monkeypatch, make_config(relay, check_sender=False))
    result = h.send(message(b"eve@elsewhere.example"))
    assert (result.rc, result.reply, result.inserted) == (Milter.CONTINUE, None, [])
    assert h.lines()[0]["would_be"].startswith("550 5.7.1")
    assert len(h.send(message()).signatures) == 2


def test_signing_switched_off_checks_but_neither_hashes_nor_signs(
    relay: MilterSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(relay, monkeypatch, make_config(relay, sign=False))
    hashed: list[bytes] = []
    monkeypatch.setattr(dkimsign.RelaxedBodyHash, "update",
                        lambda self, chunk: hashed.append(chunk))
    result = h.send(message())
    assert (result.rc, result.reply, result.inserted) == (Milter.CONTINUE, None, [])
    assert hashed == []
    assert "dkim_domain" not in h.lines()[0]
    assert h.send(message(b"eve@elsewhere.example")).rc == Milter.REJECT


# -- our faults: always 451 ------------------------------------------------------------------
def tempfailed(result: Result) -> str:
    assert result.rc == Milter.TEMPFAIL
    assert result.inserted == []
    assert result.reply is not None
    code, status, text = result.reply
    assert (code, status) == ("451", "4.3.0")
    return text


def test_directory_unavailable_is_a_temporary_failure(
    relay: MilterSite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "directory.yaml"
    broken.write_text("accounts: [not, a, mapping\n")
    h = harness(relay, monkeypatch, directory=YamlDirectory(str(broken)))
    assert "directory temporarily unavailable" in tempfailed(h.send(message()))
    (line,) = h.lines()
    assert (line["verdict"], line["reason"]) == ("tempfail", "directory_unavailable")
    assert line["principal"] == "acme" and line["queue_id"] == QUEUE_ID


def test_missing_client_address_macro_defers_authenticated_mail_never_refuses_it(
    h: Harness,
) -> None:
    # without {client_addr} (macro negotiation failed) the IP rules cannot be checked: an
    # empty address must not read as "outside the rules", which would be a permanent 554
    assert "temporary relay failure" in tempfailed(h.send(message(), client=""))
    (line,) = h.lines()
    assert (line["verdict"], line["reason"]) == ("tempfail", "client_address_missing")


def test_internal_error_is_a_temporary_failure_with_a_traceback_in_the_log(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise ZeroDivisionError("engine bug")

    monkeypatch.setattr(service_module, "decide_headers", broken)
    assert "try again later" in tempfailed(h.send(message()))
    assert "ZeroDivisionError: engine bug" in caplog.text
    assert h.lines()[0]["reason"] == "internal_error"


def test_failure_in_a_no_reply_callback_is_answered_451_at_end_of_message(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Message, chunk: bytes) -> None:
        raise MemoryError

    monkeypatch.setattr(Message, "body", broken)
    result = h.send(message(), [b"a\r\n", b"b\r\n"])
    assert all(callback == Milter.NOREPLY for callback in result.callbacks)  # still no reply
    tempfailed(result)


def test_unusable_dkim_key_defers_rather_than_sending_unsigned(
    relay: MilterSite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    world.account("acme")
    text = world.key("acme")
    selectors = make_selectors(tmp_path / "dkim", "acme.example")
    admin.add_domain(world.data, "acme", "acme.example", selectors, CREATED)
    admin.mark_verified(world.data, "acme.example", NOW - timedelta(days=1))
    Path(selectors[1].key_file).unlink()
    path = tmp_path / "directory.yaml"
    path.write_text(render(world.data))
    h = harness(relay, monkeypatch, directory=YamlDirectory(str(path)))
    result = h.connection.send(message(), b"x\r\n", f"acme:{key_id(text)}")
    assert "DKIM signing temporarily unavailable" in tempfailed(result)
    assert selectors[1].key_file in caplog.text
    assert h.lines()[0]["reason"] == "dkim_key_unavailable"


def test_revoked_key_since_login_is_refused(relay: MilterSite, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    world = World()
    world.account("acme")
    text = world.key("acme")
    world.revoke(text)
    path = tmp_path / "directory.yaml"
    path.write_text(render(world.data))
    h = harness(relay, monkeypatch, directory=YamlDirectory(str(path)))
    result = h.connection.send(message(), b"x\r\n", f"acme:{key_id(text)}")
    assert "was revoked" in refused(result)


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_50_mb_body_streams_through_in_bounded_memory(h: Harness) -> None:
    chunk = (b"0123456789 abcdefghij\tABCDEFGHIJ  \r\n" * 2000)[:65535]
    count = 50 * 1024 * 1024 // len(chunk) + 1
    tracemalloc.start()
    try:
        result = h.send(message(), (chunk for _ in range(count)))  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.rc == Milter.CONTINUE and len(result.signatures) == 2
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes while streaming 50 MB"
