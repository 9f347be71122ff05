"""Hostile headers through the real Postfix and keyrelay-milter (hypothesis).

Each example is one message from a logged-in tenant, sent with smtplib on one kept
session: a header From that is the tenant's own address in some shape (bare, bracketed,
with an arbitrary display name, encoded words, comments, folded) or a hostile one (another
address, two addresses, the own address hidden in a display name, a group, arbitrary text),
an arbitrary Subject, arbitrary extra headers and an arbitrary body, with arbitrary
characters (8-bit included; CR and LF only as folding).

Whatever arrives, the relay must answer it, for the sender's sake and for the recipient's:

- accepted (250): the message reaches smtp-sink exactly once, carries keyrelay's two
  DKIM signatures of the tenant's domain, both verify (dkimpy, against the records the CLI
  publishes), and every address an independent parser (``email.utils.getaddresses``, not
  the header registry keyrelay uses) finds in the delivered From is the tenant's own: an
  accepted message never shows the recipient someone else's From;
- refused: permanently (5xx) with a text; never temporarily, which for a message that is
  the sender's fault would mean retrying it forever (a 4xx here is an internal error of
  ours).

``make test`` runs 60 messages; ``KEYRELAY_FUZZ_PROFILE=long`` runs 2,000.
"""

from __future__ import annotations

import base64
import email.utils
import os
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyrelay.demo import Relay
from keyrelay.demo.processes import tail
from testkit.net import wait_until
from testkit.relay import Tenant, as_sent, connect, new_tenant, published_records, queue_empty

EXAMPLES = 2000 if os.environ.get("KEYRELAY_FUZZ_PROFILE") == "long" else 60
# setup.cfg's 300 s per test is too short here: 60 messages, each waited for at the sink
# (up to 60 s each on a loaded machine); the long profile runs for hours by design
pytestmark = pytest.mark.timeout(7200 if EXAMPLES > 60 else 1800)
RECIPIENT = "rcpt@example.net"
FOREIGN = "ceo@bank.example"

# anything but CR, LF (added only as folding) and surrogates; 8-bit and control characters
# included
text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"),
               max_size=60)
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
names = st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z")


def own_from(tenant: Tenant) -> st.SearchStrategy[str]:
    me = tenant.sender
    return st.one_of(
        st.just(me),
        st.just(f"<{me}>"),
        st.just(me.upper()),
        text.map(lambda name: f"{name} <{me}>"),
        printable.map(lambda name: '"' + name.replace("\\", "\\\\").replace('"', '\\"')
                      + f'" <{me}>'),
        text.map(lambda name: f"=?utf-8?b?{base64.b64encode(name.encode()).decode()}?="
                 f" <{me}>"),
        printable.map(lambda comment: f"{me} ({comment})"),
        st.just(f"App\r\n <{me}>"),
    )


def hostile_from(tenant: Tenant) -> st.SearchStrategy[str]:
    me = tenant.sender
    return st.one_of(
        st.just(FOREIGN),
        st.just(f"{me} <{FOREIGN}>"),
        st.just(f'"{me}" <{FOREIGN}>'),
        st.just(f"{FOREIGN}, {me}"),
        st.just(f"{me}, {FOREIGN}"),
        st.just(f"friends: {me}, {FOREIGN};"),
        st.just(f"<{FOREIGN}> <{me}>"),
        st.just(f"{me}@bank.example"),
        st.just(f"{FOREIGN} ({me})"),
        text,
        text.map(lambda junk: f"{junk} <{me}>{junk}"),
        text.map(lambda junk: f"{me}{junk}"),
    )


@pytest.fixture(scope="module")
def tenant(demo_relay: Relay) -> Tenant:
    return new_tenant(demo_relay)


@pytest.fixture(scope="module")
def records(demo_relay: Relay, tenant: Tenant) -> dict[str, bytes]:
    return published_records(demo_relay, tenant.domain)


@pytest.fixture(scope="module")
def session(demo_relay: Relay, tenant: Tenant) -> Iterator[list[smtplib.SMTP]]:
    """One logged-in session, opened again after a refusal or when the relay closed it."""
    holder: list[smtplib.SMTP] = []
    yield holder
    for client in holder:
        client.close()


def client_of(relay: Relay, tenant: Tenant, holder: list[smtplib.SMTP]) -> smtplib.SMTP:
    if holder:
        try:
            holder[0].rset()
            return holder[0]
        except (smtplib.SMTPException, OSError):
            holder.pop().close()
    client = connect(relay, "submission")
    client.login("apikey", tenant.key)
    holder.append(client)
    return client


def arrived(relay: Relay, token: bytes, timeout: float = 60.0) -> list[Path]:
    """The sink's files holding ``token``, once one is there and Postfix's queue is empty
    (so that a second copy would be there too); ``timeout`` for each (generous: a slow
    machine)."""
    seen: dict[tuple[Path, int], bool] = {}

    def holding() -> list[Path]:
        found = []
        for path in relay.settings.outbox.iterdir():
            # read each file again only when it grew: smtp-sink may still be writing it
            key = (path, path.stat().st_size)
            if key not in seen:
                seen[key] = token in path.read_bytes()
            if seen[key]:
                found.append(path)
        return found

    wait_until(holding, timeout, "the message at the sink")
    wait_until(lambda: queue_empty(relay), timeout, "Postfix's queue to empty")
    return holding()


def build(header_from: str, subject: str, extra: list[tuple[str, str]], body: str,
          token: str) -> bytes:
    lines = [f"From: {header_from}", f"To: <{RECIPIENT}>", f"Subject: {subject}",
             f"Message-ID: <{token}@fuzz.test>", "Date: Thu, 03 Dec 2026 10:00:00 +0000"]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode("utf-8", "surrogatepass")


@given(data=st.data())
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_whatever_headers_arrive_the_message_is_signed_and_honest_or_refused_5xx(
        demo_relay: Relay, tenant: Tenant, records: dict[str, bytes],
        session: list[smtplib.SMTP], data: st.DataObject) -> None:
    header_from = data.draw(st.one_of(own_from(tenant), hostile_from(tenant)), "From")
    subject = data.draw(text, "Subject")
    extra = data.draw(st.lists(st.tuples(names, text), max_size=4), "extra headers")
    body = data.draw(st.text(st.characters(codec="utf-8"), max_size=300)
                     .map(lambda b: b.replace("\r", "").replace("\n", "\r\n")), "body")
    token = uuid.uuid4().hex
    raw = build(header_from, subject, extra, body, token)

    client = client_of(demo_relay, tenant, session)
    try:
        client.sendmail(tenant.sender, [RECIPIENT], raw)
    except smtplib.SMTPResponseException as exc:
        # a new session for the next message: Postfix slows a session down after errors
        # (smtpd_soft_error_limit, smtpd_error_sleep_time)
        session.pop().close()
        # a temporary answer is a fault of ours: say what the daemons logged about it (the
        # relay's folder is gone once the module ends)
        assert 500 <= exc.smtp_code < 600, (
            f"temporary answer to a message: {exc}\n--- milter.log\n"
            + tail(demo_relay.settings.logs / "milter.log", 40) + "\n--- policyd.log\n"
            + tail(demo_relay.settings.logs / "policyd.log", 40))
        assert exc.smtp_error.strip(), "a refusal without a text"
        return

    found = arrived(demo_relay, token.encode())
    assert len(found) == 1, f"accepted, at the sink {len(found)} times"
    wire = as_sent(found[0].read_bytes())
    signatures = dkim.DKIM(wire)
    for index in range(2):  # rsa-sha256 and ed25519-sha256
        assert signatures.verify(idx=index, dnsfunc=lambda name, timeout=5: records.get(
            name.decode().rstrip(".").lower())), f"signature {index} of {wire[:600]!r}"
    shown = email.message_from_bytes(wire).get_all("From") or []
    addresses = [address.lower() for _, address in email.utils.getaddresses(
        [str(value) for value in shown])]
    assert addresses == [tenant.sender.lower()], (
        f"accepted From {header_from!r}, which a mail program reads as {addresses}")
