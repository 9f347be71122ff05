"""A classic Postfix site moved onto keyrelay, through real Postfix (issue 24, section 5).

"Before": a private Postfix instance (loopback only, its own queue; /etc/postfix untouched)
configured the classic way. Cyrus SASL reads a real sasldb2 made by ``saslpasswd2``
(``smtpd_sasl_type = cyrus``; ``pwcheck_method: auxprop``, ``auxprop_plugin: sasldb``,
``mech_list: PLAIN LOGIN``). A hash ``smtpd_sender_login_maps`` binds each login to its
senders, and the submission service refuses the rest with ``reject_sender_login_mismatch``
(Debian's master.cf shape: ``-o smtpd_sender_restrictions=$mua_sender_restrictions``),
TLS required, mail relayed to a real smtp-sink. Two applications send through it, each
with its own SASL login:

- ``crm`` (realm = ``myhostname``, so it logs in as plain ``crm``) owns ``@crm.example``;
- ``billing@site.example`` (realm ``site.example``) owns ``invoices@billing.example``.

Debian 12's Postfix 3.7 with its libsasl2 reads smtpd.conf from ``CONFIG_DIR/sasl/`` (then
/usr/lib/sasl/; seen with strace: a ``cyrus_sasl_config_path`` elsewhere was not opened), so
the file goes there and main.cf's ``cyrus_sasl_config_path`` names the same folder, for a
Postfix that reads it. Without the file Cyrus falls back to /etc/sasldb2 and every login
gets 454 4.7.0.

Then the runbook of docs/migration.md, with the real CLI at every step: ``keyrelay migrate
postfix --sunset`` (a date ahead), ``keyrelay sync`` of what it wrote, the DNS step (the
test has no DNS server: the imported domain is marked verified, as the demo's is), ``keyrelay
postfix apply`` (refused: the site's Cyrus SASL, its map and its mismatch check are on the
submission service; then ``--replace-site-sasl``, the documented way off Cyrus) and a
Postfix reload. After that the same two applications, unchanged (host, port, username,
password), send as their own senders through keyrelay (its log says ``legacy_password``;
crm's message is DKIM-signed and verifies), are still refused as each other's sender, get
the 535 naming the sunset and the command once ``keyrelay legacy sunset --all`` moved it into
the past, and send again with new API keys.

Every wait is on a condition with a deadline (30 s each, as testkit/relay.py's; several
times what each takes on a loaded 2-core machine), never a timed assertion. No login of
the test is a guess (docs/policyd.md, "Brute-force protection"), so all come from 127.0.0.1.
"""

from __future__ import annotations

import email.message
import json
import os
import shutil
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dkim
import pytest
import yaml

from keyrelay.demo import Relay, Settings
from keyrelay.demo.postfix import write_postfix_base
from keyrelay.demo.processes import BIN
from keyrelay.postfixconf import run_postfix
from testkit.net import client_tls, free_ports, reply_text, wait_until
from testkit.privaterelay import signatures
from testkit.relay import (
    delivered,
    log_of,
    message,
    outbox,
    published_records,
    queue_empty,
    reply_of,
)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("postfix", "postmap", "saslpasswd2", "db_dump"))
    or os.geteuid() != 0,
    reason="needs root, postfix, sasl2-bin and db-util (make test installs them)")

WAIT = 30.0  # seconds; see the module's docstring
HOSTNAME = "relay.site.example"  # the site's myhostname: Cyrus's default realm
ACCOUNT = "site"


@dataclass(frozen=True)
class App:
    """An application as it was configured for the old relay; nothing here changes."""

    username: str
    password: str
    sender: str
    subuser: str

    @property
    def principal(self) -> str:
        return f"{ACCOUNT}/{self.subuser}"


CRM = App("crm", "Crm-Old-Secret-4711", "orders@crm.example", "crm")
BILLING = App("billing@site.example", "Billing-Old-Secret-0815", "invoices@billing.example",
              "billing")
APPS = (CRM, BILLING)


# -- the site ----------------------------------------------------------------------------------
def _postconf(etc: Path, *args: str) -> None:
    subprocess.run(["postconf", "-c", str(etc), *args], check=True, timeout=60,
                   capture_output=True)


def _classic_site(s: Settings) -> Path:
    """Cyrus SASL with a sasldb2, a hash sender-login map and reject_sender_login_mismatch
    on a submission service with TLS required, in the demo's Postfix instance, which
    ``write_postfix_base`` set back to a Postfix that never heard of keyrelay."""
    etc = s.postfix_etc
    write_postfix_base(s)
    sasl = etc / "sasl"
    sasl.mkdir(mode=0o755)
    sasldb = etc / "sasldb2"
    (sasl / "smtpd.conf").write_text(
        "pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
        f"sasldb_path: {sasldb}\nmech_list: PLAIN LOGIN\n")
    for app in APPS:
        user, _, realm = app.username.partition("@")
        subprocess.run(["saslpasswd2", "-f", str(sasldb), "-p", "-c", "-u", realm or HOSTNAME,
                        user], input=app.password, text=True, check=True, timeout=60)
    shutil.chown(sasldb, "root", "postfix")  # as Debian's sasl group: smtpd reads it
    sasldb.chmod(0o640)
    (etc / "senders").write_text("# address or @domain   SASL login(s)\n"
                                 "@crm.example              crm\n"
                                 "invoices@billing.example  billing@site.example\n")
    subprocess.run(["postmap", "-c", str(etc), f"hash:{etc / 'senders'}"], check=True,
                   timeout=60)
    tls = s.run_dir / "tls"
    _postconf(etc, "-e", f"myhostname = {HOSTNAME}", "smtpd_sasl_type = cyrus",
              "smtpd_sasl_path = smtpd", f"cyrus_sasl_config_path = {sasl}",
              f"smtpd_sender_login_maps = hash:{etc / 'senders'}",
              "mua_sender_restrictions = reject_sender_login_mismatch, permit",
              f"smtpd_tls_chain_files = {tls / 'key.pem'}, {tls / 'cert.pem'}")
    service = f"{s.host}:{s.submission_port}"
    _postconf(etc, "-M", f"{service}/inet={service} inet n - n - - smtpd")
    _postconf(etc, "-P", *(f"{service}/inet/{name}={value}" for name, value in (
        ("syslog_name", "postfix/submission"), ("smtpd_tls_security_level", "encrypt"),
        ("smtpd_sasl_auth_enable", "yes"), ("smtpd_tls_auth_only", "yes"),
        ("smtpd_sender_restrictions", "$mua_sender_restrictions"),
        ("smtpd_relay_restrictions", "permit_sasl_authenticated,reject"))))
    check = subprocess.run(["postfix", "-c", str(etc), "check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    return etc


@pytest.fixture
def site() -> Iterator[Relay]:
    """The demo relay's state (keyrelay.yaml, an empty-but-demo directory, certificate) with
    the classic site above as its Postfix instance, and smtp-sink: keyrelay-policyd and
    keyrelay-milter are not started; everything started is stopped afterwards."""
    run_dir = Path(tempfile.mkdtemp(prefix="kr-mig-"))  # short: unix socket paths
    smtp, submission, alt, submissions, sink = free_ports(5)
    settings = Settings(run_dir=run_dir, smtp_port=smtp, submission_port=submission,
                        alt_submission_port=alt, submissions_port=submissions,
                        sink_port=sink, pool_address="127.0.0.2", policyd_metrics_port=0,
                        milter_metrics_port=0)
    relay = Relay(settings, say=lambda text: None)
    try:
        relay.prepare()
        _classic_site(settings)
        relay.children["sink"] = relay.sink()
        relay.children["sink"].start()
        status, output = run_postfix(settings.postfix_etc, "start")
        assert status == 0, output
        relay.postfix_started = True
        wait_until(lambda: _greets(settings, settings.submission_port), WAIT,
                   "the site's submission service")
        yield relay
    finally:
        relay.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _greets(s: Settings, port: int) -> bool:
    try:
        with smtplib.SMTP(s.host, port, timeout=5) as client:
            return client.noop()[0] == 250
    except OSError:
        return False


# -- the applications ----------------------------------------------------------------------------
def _client(relay: Relay) -> smtplib.SMTP:
    """The application's connection: the same host and port before and after, STARTTLS."""
    s = relay.settings
    client = smtplib.SMTP(s.host, s.submission_port, timeout=30)
    client.starttls(context=client_tls())
    return client


def _send(relay: Relay, username: str, password: str, sender: str,
          subject: str) -> email.message.EmailMessage:
    """Log in, send one message as ``sender``; the message as the sink got it."""
    mid, text = message(sender, "someone@example.net", subject)
    with _client(relay) as client:
        client.login(username, password)
        assert client.sendmail(sender, ["someone@example.net"], text) == {}
    wait_until(lambda: bool(delivered(relay, mid)), WAIT, f"{mid} at the sink")
    wait_until(lambda: queue_empty(relay), WAIT, "Postfix's queue to empty")
    found = delivered(relay, mid)
    assert len(found) == 1, f"{mid} delivered {len(found)} times"
    return found[0][1]


def _refused_as(relay: Relay, app: App, sender: str) -> tuple[int, str]:
    """The reply to RCPT after logging in as ``app`` and MAIL FROM ``sender``."""
    with _client(relay) as client:
        client.login(app.username, app.password)
        assert client.mail(sender)[0] == 250
        return reply_of(lambda: client.rcpt("someone@example.net"))


def _login_reply(relay: Relay, app: App) -> tuple[int, str]:
    with _client(relay) as client:
        try:
            code, text = client.login(app.username, app.password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, reply_text(exc.smtp_error)
    return code, reply_text(text)


def _kr(relay: Relay, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real ``keyrelay`` CLI on the relay's configuration."""
    done = subprocess.run([str(BIN / "keyrelay"), "--config", str(relay.settings.config),
                           *args], capture_output=True, text=True, timeout=180, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _dkim_verified(relay: Relay, raw: bytes, domain: str) -> list[bool]:
    """Whether each DKIM-Signature verifies (dkimpy) with the records ``keyrelay domain dns``
    tells the customer to publish."""
    records = published_records(relay, domain)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())

    verifier = dkim.DKIM(raw)
    return [bool(verifier.verify(idx=i, dnsfunc=dnsfunc)) for i in range(len(signatures(raw)))]


def _raw(relay: Relay, parsed: email.message.EmailMessage) -> bytes:
    (path,) = [p for p, m in outbox(relay) if m["Message-ID"] == parsed["Message-ID"]]
    return path.read_bytes()


# -- the test ------------------------------------------------------------------------------------
def test_a_cyrus_site_moves_onto_keyrelay_and_its_applications_keep_sending(
        site: Relay) -> None:
    s = site.settings
    etc = s.postfix_etc

    # -- before: each application sends as itself and is refused as the other ----------------
    for app in APPS:
        got = _send(site, app.username, app.password, app.sender, "before")
        assert "DKIM-Signature" not in got  # the old relay does not sign
    for app, other in ((CRM, BILLING), (BILLING, CRM)):
        code, text = _refused_as(site, app, other.sender)
        assert (code, text) == (553, f"5.7.1 <{other.sender}>: Sender address rejected: not "
                                     f"owned by user {app.username}")

    # -- 1. import, with the password bridge until a day ahead ---------------------------------
    sunset = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    out = s.run_dir / "migrated.yaml"
    done = subprocess.run(
        [str(BIN / "keyrelay"), "migrate", "postfix", "--config-dir", str(etc), "--sasldb",
         str(etc / "sasldb2"), "--account", ACCOUNT, "--sunset", sunset, "--out", str(out)],
        capture_output=True, text=True, timeout=180, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done
    report = (s.run_dir / "migrated.report.md").read_text()
    written = out.read_text()
    for app in APPS:
        assert app.password not in written + report + done.stdout
    declared = yaml.safe_load(written)
    subusers = declared["accounts"][ACCOUNT]["subusers"]
    assert {name: (body["senders"], body["legacy_login"]["username"],
                   body["legacy_login"]["sunset"]) for name, body in subusers.items()} == {
        "crm": ([], "crm", sunset),
        "billing": (["invoices@billing.example"], "billing@site.example", sunset)}
    assert declared["domains"] == {"crm.example": {"owner": ACCOUNT, "grants": ["site/crm"]}}
    assert "`crm.example`" in report and "keyrelay domain dns" in report

    _kr(site, "sync", str(out))
    legacy = json.loads(_kr(site, "legacy", "list", "--json").stdout)
    assert sorted((e["principal"], e["username"], e["sunset"]) for e in legacy) == [
        ("site/billing", "billing@site.example", sunset), ("site/crm", "crm", sunset)]

    # -- 3. DNS: the imported domain is pending until verified ----------------------------------
    _kr(site, "domain", "mark-verified", "crm.example")

    # -- keyrelay takes the submission service over --------------------------------------------
    files = [(etc / name).read_bytes() for name in ("main.cf", "master.cf")]
    refused = _kr(site, "postfix", "apply", "--config-dir", str(etc), check=False)
    assert refused.returncode == 1
    service = f"{s.host}:{s.submission_port}/inet"
    for needle in (
            f"{service}: smtpd_sasl_path = smtpd (main.cf) is the site's own SASL "
            "(smtpd_sasl_type = cyrus)",
            f"{service}: smtpd_sender_login_maps = hash:{etc / 'senders'} (main.cf) is the "
            "site's own sender-login map",
            f"{service}: smtpd_sender_restrictions = $mua_sender_restrictions (master.cf -o) "
            "holds reject_sender_login_mismatch"):
        assert needle in refused.stderr, refused.stderr
    assert [(etc / name).read_bytes() for name in ("main.cf", "master.cf")] == files

    applied = _kr(site, "postfix", "apply", "--config-dir", str(etc), "--replace-site-sasl")
    assert "--replace-site-sasl: replaced the site's own SASL settings" in applied.stdout
    for name, child in (("policyd", site.policyd()), ("milter", site.milter())):
        site.children[name] = child  # stopped by the fixture's relay.stop()
        child.start()
    maillog_before = s.maillog.read_text(errors="replace").count("reload -- version")
    status, output = run_postfix(etc, "reload")
    assert status == 0, output
    # the master has read the new master.cf: it logged the reload and listens on the service
    # apply added; the site's old smtpd processes exit once idle
    wait_until(lambda: s.maillog.read_text(errors="replace").count("reload -- version")
               > maillog_before, WAIT, "Postfix to log its reload")
    wait_until(lambda: _greets(s, s.alt_submission_port), WAIT, "keyrelay's second submission "
               "service")

    # -- after: the same applications, unchanged, through keyrelay ------------------------------
    for app in APPS:
        got = _send(site, app.username, app.password, app.sender, "after")
        logins = [line for line in log_of(site, "policyd").splitlines()
                  if "reason=legacy_password" in line and app.principal in line]
        assert logins, f"no legacy_password login of {app.principal} in the policyd log"
        if app is CRM:  # its domain is verified: keyrelay signs
            raw = _raw(site, got)
            assert {d for _, _, d in signatures(raw)} == {"crm.example"}
            assert _dkim_verified(site, raw, "crm.example") == [True] * len(signatures(raw))
    for app, other in ((CRM, BILLING), (BILLING, CRM)):
        code, text = _refused_as(site, app, other.sender)
        assert code == 550, text
        assert text == (f"5.7.1 <someone@example.net>: Recipient address rejected: envelope "
                        f"sender: {other.sender} is not a verified domain or sender of "
                        f"{app.principal}")
    for app in APPS:
        assert app.password not in log_of(site, "policyd")

    # -- 6. sunset: a date in the past ends every password login at once -----------------------
    ended = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    _kr(site, "legacy", "sunset", "--all", ended)
    for app in APPS:
        expected = (f"5.7.8 Error: authentication failed: password logins for {app.principal} "
                    f"ended on {ended}; the application must use an API key (keyrelay key "
                    f"create {app.principal})")
        replies: list[tuple[int, str]] = []

        def sunset_answered(app: App = app, expected: str = expected,
                            replies: list[tuple[int, str]] = replies) -> bool:
            replies.append(_login_reply(site, app))
            return replies[-1] == (535, expected)

        try:
            wait_until(sunset_answered, WAIT, f"the 535 naming the sunset for {app.principal}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the last replies: {replies[-3:]}") from None

    # -- with new API keys they send again ---------------------------------------------------
    for app in APPS:
        created = json.loads(_kr(site, "key", "create", app.principal, "--name", app.subuser,
                                 "--scope", "mail.send", "--json").stdout)
        got = _send(site, "apikey", created["key"], app.sender, "with a key")
        assert got["From"] == app.sender
        assert created["key"] not in log_of(site, "policyd")
