"""Fault-injection soak: mail accounting through the whole relay while its parts fail.

NAME
    soak.py - send a fixed number of messages while keyrelay's processes and directory fail

SYNOPSIS
    .venv/bin/python -m bench.soak [--backend yaml|ldap] [--messages N] [--concurrency C]
        [--size BYTES] [--faults-every SECONDS] [--max-seconds S] [--fault-seconds S]
        [--seed N] [--keep]

DESCRIPTION
    Builds the private relay of bench/e2e_bench.py (testkit/loadrelay.py; keyrelay
    complete: auth, policy, From check, DKIM signing; 2 accounts with 2 subusers each, each
    with a key) and sends N messages with testkit/loadgen.py: sessions like sending
    applications (STARTTLS, AUTH PLAIN, 20 messages per session). Like a real application
    the client sends again, in the next round, every message that got a temporary answer
    (4xx) or whose session broke; a permanent answer (5xx) to a valid message is a failure
    of the relay.

    Meanwhile a driver, at random moments (on average every --faults-every seconds), does
    one of these, each kind once in random order and then again: kill keyrelay-policyd
    with SIGKILL and start it again; the same for keyrelay-milter; and, with the YAML
    directory (the default), replace the directory file with garbage for a while, or
    remove it for a while (both holding the CLI's write lock, as a broken deployment
    would). Another thread keeps adding and removing accounts with the `keyrelay` CLI.
    Part-way through, the driver revokes one of the keys in use (an extra key of one
    subuser, used by its own sessions), and it keeps sending messages whose header From is
    not the principal's.

    With --backend ldap the directory is in a private slapd (testkit/slapd.py,
    StartTLS, the shipped schema; the daemons' refresh_interval and timeout 1 s) and the
    directory faults are LDAP's: slapd stopped (SIGTERM), killed (SIGKILL) or hung
    (SIGSTOP) for 0.5-5 s, long enough now and then for the daemons' copy to go stale;
    and one daemon killed while slapd is down, or while the server's ACLs hide the records
    from the service DN (the directory is unreadable though slapd answers): it must refuse
    to start (docs/ldap.md) and is started again, as systemd would, once LDAP is mended.

ACCOUNTING
    At the end, after Postfix's queue is empty, every file smtp-sink wrote is read:
      - every message the client saw accepted is at the sink exactly once (messages whose
        session broke after the end of DATA was sent are "in doubt": they may arrive once
        and are sent again, so they are counted apart);
      - nothing is at the sink that was not accepted (in doubt excepted);
      - every delivered message carries keyrelay's two DKIM signatures (nothing unchecked);
      - no message of the revoked key whose MAIL FROM was sent after the CLI returned was
        accepted (LDAP: sent more than 2 s after, refresh_interval + timeout; counted from
        the MAIL FROM, so how fast the server answers does not matter); no message with a
        foreign From was accepted;
      - no valid message got a permanent (5xx) answer; messages still refused when
        --max-seconds ran out are listed with their last (temporary) answer.
    The counts are printed; any loss, duplicate, unchecked or forbidden acceptance, or
    permanent refusal makes the exit status 1.

OPTIONS
    --backend yaml|ldap   where the directory is (default yaml: the demo's file)
    --messages N          messages to deliver (default 20000)
    --concurrency C       concurrent sessions (default 8)
    --size BYTES          body size (default 2000)
    --faults-every S      mean seconds between faults (default 3)
    --max-seconds S       give up re-sending after S seconds (default 1800)
    --fault-seconds S     inject faults only during the first S seconds, but every kind
                          at least once (default 0: all along); the rest of the run
                          shows the relay recovering
    --seed N              seed of the fault schedule (default: random, printed)
    --keep                keep the temporary folder

REQUIREMENTS
    Root, the virtual environment of `make deps`. A short run is part of `make test`
    (tests/test_soak.py); docs/RELIABILITY.md records the full run's figures.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import smtplib
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import soakbook
from bench.soakbook import Book
from keyrelay.demo import DemoError, keyrelay_cli
from testkit.loadgen import Load, Principal, make_body, send
from testkit.loadrelay import LoadRelay, LoadShape
from testkit.net import client_tls
from testkit.privaterelay import (
    FOREIGN_FROM,
    BenchError,
    bench_folder,
    leave_folder,
    run_guarded,
)
from testkit.slapd import KEYRELAY_INDEXES, Slapd, records_hidden_acls

# the daemons' LDAP settings in the soak: a change is seen within REFRESH; a copy older than
# REFRESH + TIMEOUT is not served (every answer temporary); docs/ldap.md
LDAP_REFRESH, LDAP_TIMEOUT = 1.0, 1.0
# seconds after the revocation (the CLI returned) within which a message of the revoked key
# whose MAIL FROM was sent may still be accepted. Counted from the MAIL FROM, so that how
# long the server then takes does not matter (every check of the message comes after it).
# YAML: none, every request sees the changed file. LDAP: a copy is served for at most
# refresh_interval + timeout after the moment it asked for the serial (docs/ldap.md).
REVOKE_GRACE = {"yaml": 0.0, "ldap": LDAP_REFRESH + LDAP_TIMEOUT}


class SoakError(BenchError):
    """A promise broken while the faults were injected."""


class Driver(threading.Thread):
    """Injects one fault at a time at random moments until stopped; keeps a journal."""

    def __init__(self, bench: LoadRelay, rng: random.Random, mean: float,
                 revoke: Callable[[], None], slapd: Slapd | None) -> None:
        super().__init__(daemon=True)
        self.bench, self.rng, self.mean, self.revoke = bench, rng, mean, revoke
        self.slapd = slapd
        self.halt = threading.Event()
        self.journal: Counter[str] = Counter()
        self.error: BaseException | None = None
        self.revoke_after = 0  # faults before the revocation
        self.until = 0.0  # time.monotonic() after which no more faults; 0: the whole run
        self.every_kind = threading.Event()  # set once each kind of fault was done

    def run(self) -> None:
        faults = [self.kill_policyd, self.kill_milter]
        faults += ([self.garbage, self.remove] if self.slapd is None else
                   [self.stop_slapd, self.kill_slapd, self.hang_slapd,
                    self.start_without_ldap, self.start_with_records_hidden])
        order: list[Callable[[], None]] = []
        done = 0
        try:
            while not self.halt.wait(self.rng.expovariate(1 / self.mean)):
                if self.until and time.monotonic() > self.until and done >= len(faults):
                    break  # every kind done once: the rest of the run on a healthy relay
                if done == self.revoke_after:
                    self.revoke()
                    self.journal["key revoked"] += 1
                if not order:  # every kind of fault once, in random order, then again
                    order = self.rng.sample(faults, len(faults))
                order.pop()()
                done += 1
                if done >= len(faults):
                    self.every_kind.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def restart(self, name: str) -> None:
        child = self.bench.relay.children[name]
        child.kill()  # SIGKILL: no clean shutdown
        time.sleep(self.rng.uniform(0.2, 1.5))
        child.start()

    def kill_policyd(self) -> None:
        self.restart("policyd")
        self.journal["keyrelay-policyd killed (SIGKILL) and restarted"] += 1

    def kill_milter(self) -> None:
        self.restart("milter")
        self.journal["keyrelay-milter killed (SIGKILL) and restarted"] += 1

    @contextmanager
    def directory_locked(self) -> Iterator[Path]:
        path = self.bench.relay.settings.run_dir / "directory.yaml"
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)

    def garbage(self) -> None:
        with self.directory_locked() as path:
            good = path.read_bytes()
            path.write_bytes(b"{ this is not a directory")
            time.sleep(self.rng.uniform(0.5, 2.0))
            path.write_bytes(good)
        self.journal["directory file garbage for a while"] += 1

    def remove(self) -> None:
        with self.directory_locked() as path:
            away = path.with_suffix(".away")
            path.rename(away)
            time.sleep(self.rng.uniform(0.5, 2.0))
            away.rename(path)
        self.journal["directory file removed for a while"] += 1


    # -- LDAP ------------------------------------------------------------------------------
    def outage(self) -> float:
        """How long slapd stays away: now and then longer than the daemons' copy is served."""
        return self.rng.uniform(0.5, 2 * (LDAP_REFRESH + LDAP_TIMEOUT) + 1)

    def slapd_away(self, what: str, fail: Callable[[], object],
                   mend: Callable[[], object]) -> None:
        fail()
        time.sleep(self.outage())
        mend()
        self.journal[what] += 1

    def stop_slapd(self) -> None:
        assert self.slapd is not None
        self.slapd_away("slapd stopped (SIGTERM) for a while", self.slapd.stop,
                        self.slapd.start)

    def kill_slapd(self) -> None:
        assert self.slapd is not None
        self.slapd_away("slapd killed (SIGKILL) and started again", self.slapd.kill,
                        self.slapd.start)

    def hang_slapd(self) -> None:
        assert self.slapd is not None
        self.slapd_away("slapd hung (SIGSTOP) for a while", self.slapd.pause,
                        self.slapd.resume)

    def start_without_ldap(self) -> None:
        assert self.slapd is not None
        self.kept_down("slapd was down", self.slapd.stop, self.slapd.start)

    def start_with_records_hidden(self) -> None:
        slapd = self.slapd
        assert slapd is not None
        self.kept_down("the ACLs hid the records",
                       lambda: slapd.set_acls(records_hidden_acls()),
                       lambda: slapd.set_acls(slapd.acls))

    def kept_down(self, what: str, fail: Callable[[], object],
                  mend: Callable[[], object]) -> None:
        """A daemon killed while LDAP cannot be read must not start (it would serve an
        empty copy); it is started again once LDAP is mended, as systemd's Restart= would.
        The other daemon keeps serving its copy meanwhile."""
        name = self.rng.choice(["policyd", "milter"])
        child = self.bench.relay.children[name]
        fail()
        child.kill()
        refused = False
        try:
            child.start(timeout=15)
        except DemoError:
            refused = True
        time.sleep(self.outage())
        mend()
        if not refused:
            raise SoakError(f"keyrelay-{name} started while {what}: it must not serve "
                            "without its directory (docs/ldap.md)")
        child.start()
        self.journal[f"keyrelay-{name} killed while {what}: refused to start, started "
                     "once LDAP was mended"] += 1


class Writer(threading.Thread):
    """Keeps writing the directory with the CLI (accounts added and removed)."""

    def __init__(self, bench: LoadRelay) -> None:
        super().__init__(daemon=True)
        self.bench = bench
        self.halt = threading.Event()
        self.done = Counter[str]()

    def run(self) -> None:
        number = 0
        while not self.halt.wait(0.2):
            number += 1
            for action in ("add", "remove"):
                try:
                    keyrelay_cli(self.bench.relay.settings, "account", action, f"soak{number}")
                    self.done[f"account {action}: done"] += 1
                except Exception:  # noqa: BLE001 - the directory may be broken right now
                    self.done[f"account {action}: refused (directory broken)"] += 1


class Spoofer(threading.Thread):
    """Keeps sending messages whose header From is not the principal's."""

    def __init__(self, bench: LoadRelay, who: Principal) -> None:
        super().__init__(daemon=True)
        self.bench, self.who = bench, who
        self.halt = threading.Event()
        self.answers = Counter[str]()

    def run(self) -> None:
        s, who = self.bench.relay.settings, self.who
        while not self.halt.wait(0.5):
            text = (f"From: <{FOREIGN_FROM}>\r\nTo: <{who.rcpt_to}>\r\nSubject: spoof\r\n"
                    f"Message-ID: <spoof.{time.time_ns()}@{who.domain}>\r\n\r\nhello\r\n")
            try:
                with smtplib.SMTP(s.host, s.submission_port, timeout=60) as client:
                    client.starttls(context=client_tls())
                    client.login("apikey", who.key)
                    client.sendmail(who.mail_from, [who.rcpt_to], text)
                self.answers["250 accepted"] += 1
            except smtplib.SMTPResponseException as exc:
                self.answers[f"{exc.smtp_code}"] += 1
            except (OSError, smtplib.SMTPException) as exc:
                self.answers[f"connection: {type(exc).__name__}"] += 1


def wait_accepted(bench: LoadRelay, who: Principal, seconds: float = 60) -> None:
    """Until a login with ``who``'s key succeeds: with LDAP the daemons take a new key
    within refresh_interval, and the key must not be refused as unknown once the load runs."""
    s = bench.relay.settings
    deadline = time.monotonic() + seconds
    while True:
        try:
            with smtplib.SMTP(s.host, s.submission_port, timeout=30) as client:
                client.starttls(context=client_tls())
                client.login("apikey", who.key)
                return
        except smtplib.SMTPException as exc:
            # only a temporary answer is waited out: a 535 is final (and every retry of it
            # would count towards the address's lock-out)
            code = getattr(exc, "smtp_code", 0)
            if 500 <= code < 600 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def soak(bench: LoadRelay, args: argparse.Namespace, rng: random.Random,
         slapd: Slapd | None) -> bool:
    s = bench.relay.settings
    grace = REVOKE_GRACE[args.backend]
    bench.select("keyrelay")
    bench.warm_up("keyrelay", args.size)
    bench.clear_outbox()
    victim = bench.principals[1]
    created = json.loads(keyrelay_cli(s, "key", "create", victim.pid, "--name", "revokee",
                                      "--json"))
    revokee = Principal(f"{victim.pid} (key to revoke)", created["key"], victim.mail_from,
                        victim.rcpt_to)
    principals = [*bench.principals, revokee]
    wait_accepted(bench, revokee)
    revoked_at: list[float] = []

    def revoke() -> None:
        keyrelay_cli(s, "key", "revoke", created["key_id"])
        revoked_at.append(time.time())

    driver = Driver(bench, rng, args.faults_every, revoke, slapd)
    driver.revoke_after = 1
    if args.fault_seconds:
        driver.until = time.monotonic() + args.fault_seconds
    writer, spoofer = Writer(bench), Spoofer(bench, bench.principals[0])
    run, body = f"soak{rng.randrange(10**6)}", make_body(args.size)
    todo = list(range(args.messages))
    book = Book()
    revoked_refusals: Counter[str] = Counter()
    rounds = 0
    start = time.monotonic()
    for thread in (driver, writer, spoofer):
        thread.start()

    def revoked(number: int, label: str) -> bool:
        """The revoked key refused, at login or (a session that logged in before the
        revocation) at RCPT: right; another principal sends it again."""
        if outcome.refused_by[number] == revokee.pid and label[:1] == "5":
            revoked_refusals[label] += 1
            return True
        return False

    try:
        # a driver that failed ends the run at once (its error is raised below)
        while (todo and time.monotonic() - start < args.max_seconds
               and driver.error is None):
            rounds += 1
            outcome = send(Load(host=s.host, port=s.submission_port, implicit_tls=False,
                                principals=principals, body=body, tag=run, count=len(todo),
                                per_session=20, concurrency=args.concurrency, numbers=todo))
            todo = book.sort(outcome, revoked)
            print(f"  round {rounds}: {len(outcome.accepted)} accepted, {len(todo)} to send "
                  f"again, {len(book.permanent)} refused permanently so far", flush=True)
            if todo:
                time.sleep(0.5)
        if driver.until:
            # a fast run may end before every kind of fault was done: the rest of them
            # happen while the foreign-From sender and the CLI writer keep going
            deadline = time.monotonic() + 180
            while (driver.is_alive() and not driver.every_kind.wait(0.5)
                   and time.monotonic() < deadline):
                pass  # a driver that failed ends the wait at once (its error is raised below)
    finally:
        for thread in (driver, writer, spoofer):
            thread.halt.set()
        for thread in (driver, writer, spoofer):
            thread.join()
    if driver.error is not None:
        raise driver.error
    if slapd is not None and not slapd.running:
        slapd.start()
    for name in ("policyd", "milter"):  # a fault may have been the last thing done
        if not bench.relay.children[name].running():
            bench.relay.children[name].start()
    bench.wait_drained()
    time.sleep(1)
    seen, unsigned = bench.sink_census(run, "keyrelay")

    accepted = book.accepted
    after = [n for n, who in accepted.items() if who == revokee.pid and revoked_at
             and book.mail_sent_at[n] > revoked_at[0] + grace]
    before = sum(1 for who in accepted.values() if who == revokee.pid) - len(after)
    spoofs = spoofer.answers.get("250 accepted", 0)
    print(f"\n{args.messages} messages ({args.backend} directory), {rounds} rounds, "
          f"{time.monotonic() - start:.0f} s; faults injected:")
    for what, count in sorted(driver.journal.items()):
        print(f"  {count:5} {what}")
    for what, count in sorted(writer.done.items()):
        print(f"  {count:5} CLI {what}")
    print("answers that made the client send again or give up:")
    for what, count in sorted(book.replies.items()):
        print(f"  {count:5} {what}")
    lines, broken = book.ledger(seen, unsigned)
    print("accounting:\n" + "\n".join(lines) + "\n"
          f"  revoked key: accepted before the revocation {before}, after it "
          f"(+{grace:g} s) {len(after)}; its refusals {dict(revoked_refusals)}\n"
          f"  foreign From: {dict(spoofer.answers)} (accepted: {spoofs})")
    failed = bool(broken or after or spoofs or not revoked_at)
    if not revoked_at:
        print("the key was never revoked: the run was too short for the driver "
              "(fewer than 2 faults); use more --messages or a smaller --faults-every")
    print("\nRESULT: " + ("FAILED" if failed else "every promise kept"))
    return not failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return soakbook.parse_args(
        argv, __doc__ or "", "python -m bench.soak", messages=20000, concurrency=8,
        more=lambda parser: parser.add_argument("--backend", choices=("yaml", "ldap"),
                                                default="yaml"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = bench_folder("soak.py", "krsoak-", None)
    if root is None:
        return 1
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    slapd: Slapd | None = None
    directory = None
    if args.backend == "ldap":
        slapd = Slapd(indexes=KEYRELAY_INDEXES)
        directory = slapd.directory_config(refresh_interval=LDAP_REFRESH,
                                           timeout=LDAP_TIMEOUT)
    shape = LoadShape(setups=("keyrelay",), tls="starttls", accounts=2, subusers=2, warmup=10,
                      concurrency=args.concurrency)
    bench = LoadRelay(root, shape=shape, directory=directory)
    kept: list[bool] = []

    def body() -> None:
        if slapd is not None:
            slapd.start()
        bench.build()
        bench.start_all()
        kept.append(soak(bench, args, rng, slapd))

    try:
        status = run_guarded("soak.py", bench, body)
    finally:
        if slapd is not None:
            slapd.close()
    if status == 0 and kept and not kept[0]:
        status = 1
    return leave_folder(root, status, args.keep)


if __name__ == "__main__":
    sys.exit(main())
