"""The private relay of bench/e2e_bench.py and bench/soak.py: many principals under the load
of testkit/loadgen.py, one setup of the comparison at a time.

The directory holds A accounts with U subusers each (one ``keyrelay sync``); every account
and every subuser is a sending principal with its own API key, From address (the account's
verified domain, granted to its subusers) and recipient. The setups (``SETUPS``) differ only
in the measured submission service's restrictions and milters (``select``: `postconf -P`,
`postfix reload`):

  baseline        Postfix with TLS and keyrelay's auth service; no policy service, no milter
  keyrelay        keyrelay complete, as `keyrelay postfix apply` configures it
  keyrelay-redis  keyrelay complete with its counters in Redis: a second keyrelay-policyd
                  (``counters.backend: redis``, a private redis-server over loopback TCP,
                  testkit/redis.py) on sockets of its own, which the measured service's
                  smtpd_sasl_path and policy restrictions name instead of the first one's
  opendkim        the baseline plus OpenDKIM, rsa-sha256 (testkit/othermilters.py)
  dkimpy          the baseline plus dkimpy-milter, rsa-sha256

``warm_up`` sends mail until it all arrives signed as the setup signs; ``sink_census`` counts
a run's messages at the sink by Message-ID and those not signed as the setup signs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field

from keyrelay.demo import Child, keyrelay_cli
from testkit.loadgen import Load, Principal, make_body, send
from testkit.net import free_port, unix_accepts, wait_until
from testkit.othermilters import MilterUnderTest, dkimpy_child, opendkim_child
from testkit.privaterelay import BenchError, PrivateRelay, postconf, signatures
from testkit.redis import RedisServer

SETUPS = ("baseline", "keyrelay", "keyrelay-redis", "opendkim", "dkimpy")
REDIS_SETUP = "keyrelay-redis"
# (smtpd_relay_restrictions, smtpd_data_restrictions) of the submission service
RESTRICTIONS = {
    "keyrelay": ("$keyrelay_submission_relay_restrictions",
                 "$keyrelay_submission_data_restrictions"),
    # main.cf parameters of the second policyd's (``LoadRelay._redis_policyd``)
    REDIS_SETUP: ("$keyrelay_redis_relay_restrictions", "$keyrelay_redis_data_restrictions"),
    "auth-only": ("permit_sasl_authenticated,reject", ""),  # postconf -P: no spaces
}
SASL_PATHS = {REDIS_SETUP: "$keyrelay_redis_sasl_path", "": "$keyrelay_sasl_path"}
ID_RE = re.compile(rb"^Message-ID: <([^.>]+)\.(\d+)@([^>]+)>", re.M | re.I)


@dataclass(frozen=True)
class LoadShape:
    """What the relay is built for and how the load reaches it."""

    setups: tuple[str, ...] = SETUPS  # which of SETUPS are built (their milters started)
    tls: str = "starttls"  # "starttls" on submission, or "implicit" on submissions
    accounts: int = 2
    subusers: int = 2  # per account
    warmup: int = 20  # warm-up messages after each switch
    concurrency: int = 16  # concurrent sessions


@dataclass
class LoadRelay(PrivateRelay):
    shape: LoadShape = field(default_factory=LoadShape)
    principals: list[Principal] = field(default_factory=list)
    selectors: dict[str, set[str]] = field(default_factory=dict)  # keyrelay's, by domain
    milters: dict[str, MilterUnderTest] = field(default_factory=dict)
    port: int = 0
    checked: set[str] = field(default_factory=set)
    redis: RedisServer | None = None  # the keyrelay-redis setup's
    redis_policyd: Child | None = None

    # -- building --------------------------------------------------------------------------
    def build(self) -> None:
        s = self.prepare()
        self.rewrite_config("e2e_bench.py: the demo's configuration, rate limits lifted",
                            limits={"messages_per_minute": 1_000_000,  # the maxima
                                    "messages_per_hour": 60_000_000})
        self.port = s.submissions_port if self.shape.tls == "implicit" else s.submission_port
        self.service = f"{s.host}:{self.port}"
        self._principals()
        folder = self.milter_folder()
        domains = sorted({p.domain for p in self.principals})
        self.milters = {"baseline": MilterUnderTest("baseline", ""),
                        "keyrelay": MilterUnderTest("keyrelay", "$keyrelay_milter")}
        if REDIS_SETUP in self.shape.setups:
            self.milters[REDIS_SETUP] = MilterUnderTest(REDIS_SETUP, "$keyrelay_milter")
            self._redis_policyd()
        for name, make in (("opendkim", opendkim_child), ("dkimpy", dkimpy_child)):
            if name in self.shape.setups:
                child, record = make(self.root, folder, domains)
                self.milters[name] = MilterUnderTest(name, f"unix:{folder / (name + '.sock')}",
                                                     child)
                for domain in domains:
                    self.records[f"{name}._domainkey.{domain}"] = record.encode()

    def _principals(self) -> None:
        """A accounts with U subusers each, a verified domain per account, a key each."""
        s = self.relay.settings
        subusers = range(1, self.shape.subusers + 1)
        accounts: dict[str, dict[str, dict[str, object]]] = {
            f"bench{i}": {"subusers": {f"app{j}": {} for j in subusers}}
                    for i in range(1, self.shape.accounts + 1)}
        domains = {f"{name}.example": {"owner": name, "grants": [
            f"{name}/app{j}" for j in subusers]} for name in accounts}
        declared = self.root / "bench-directory.yaml"
        declared.write_text(json.dumps({"accounts": accounts, "domains": domains}))
        keyrelay_cli(s, "sync", str(declared))
        for domain in domains:
            keyrelay_cli(s, "domain", "mark-verified", domain)
            printed = json.loads(keyrelay_cli(s, "domain", "dns", domain, "--json"))
            for record in printed["records"]:
                if record["type"] == "TXT" and "._domainkey." in record["name"]:
                    name = record["name"].rstrip(".").lower()
                    self.records[name] = record["value"].encode()
                    self.selectors.setdefault(domain, set()).add(name.split(".")[0])
        for account in accounts:
            for pid in (account, *(f"{account}/app{j}" for j in subusers)):
                key = json.loads(keyrelay_cli(s, "key", "create", pid, "--name", "bench",
                                              "--json"))["key"]
                who = pid.replace("/", "-")
                self.principals.append(Principal(pid, key, f"{who}@{account}.example",
                                                 f"{who}@sink.example"))

    def _redis_policyd(self) -> None:
        """The keyrelay-redis setup: a redis-server (started with the others), a second
        keyrelay-policyd on the relay's configuration with ``counters.backend: redis`` and
        sockets of its own (no socketmap or control service: the first one's serve), and the
        main.cf parameters that name it: ``keyrelay_redis_sasl_path``,
        ``keyrelay_redis_policy`` and the relay and data restrictions with that policy."""
        s = self.relay.settings
        self.redis = RedisServer()
        path = s.config
        config = json.loads(path.read_text()[path.read_text().index("{"):])
        sockets = {name: s.socket(f"redis-{name}") for name in ("auth", "policy")}
        config["policyd"].update(auth_listen=f"unix:{sockets['auth']}",
                                 policy_listen=f"unix:{sockets['policy']}",
                                 socketmap_listen="", control_listen="")
        if config["policyd"].get("metrics_listen"):  # its own endpoint, as the first has one
            config["policyd"]["metrics_listen"] = f"127.0.0.1:{free_port()}"
        # loopback TCP: how nodes reach a shared Redis (the unix socket is root's only)
        config["counters"] = self.redis.counters_settings(via="tcp")
        redis_config = path.with_name("keyrelay-redis.yaml")
        redis_config.write_text("# e2e_bench.py: keyrelay.yaml with the counters in Redis\n"
                                + json.dumps(config, indent=2) + "\n")
        shutil.copymode(path, redis_config)
        os.chown(redis_config, path.stat().st_uid, path.stat().st_gid)
        first = self.relay.policyd()
        self.redis_policyd = Child(
            "keyrelay-policyd (Redis counters)",
            [str(redis_config) if arg == str(path) else arg for arg in first.argv],
            s.logs / "policyd-redis.log",
            lambda: all(unix_accepts(sock) for sock in sockets.values()))
        etc = s.postfix_etc
        main = {name: postconf(etc, "-h", name) for name in (
            "keyrelay_sasl_path", "keyrelay_submission_policy",
            "keyrelay_submission_relay_restrictions", "keyrelay_submission_data_restrictions")}
        policy = main["keyrelay_submission_policy"].replace(
            str(s.socket("policy")).rpartition("/")[2], sockets["policy"].name)
        sasl = main["keyrelay_sasl_path"].replace(
            str(s.socket("auth")).rpartition("/")[2], sockets["auth"].name)
        if policy == main["keyrelay_submission_policy"] or sasl == main["keyrelay_sasl_path"]:
            raise BenchError(f"cannot find keyrelay-policyd's sockets in main.cf: {main}")
        lists = {kind: main[f"keyrelay_submission_{kind}_restrictions"].replace(
            "$keyrelay_submission_policy", "$keyrelay_redis_policy") for kind in ("relay", "data")}
        postconf(etc, "-e", f"keyrelay_redis_sasl_path={sasl}", f"keyrelay_redis_policy={policy}",
                 f"keyrelay_redis_relay_restrictions={lists['relay']}",
                 f"keyrelay_redis_data_restrictions={lists['data']}")

    # -- processes -------------------------------------------------------------------------
    def start_all(self) -> None:
        if self.redis is not None:
            self.redis.start()
        others = [m.child for m in self.milters.values()
                  if m.child is not None and not m.name.startswith("keyrelay")]
        if self.redis_policyd is not None:
            others.append(self.redis_policyd)
        self.start(True, others)
        self.milters["keyrelay"].child = self.relay.children["milter"]
        if REDIS_SETUP in self.milters:
            self.milters[REDIS_SETUP].child = self.relay.children["milter"]

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.redis is not None:
                self.redis.close()

    def policyd(self, name: str) -> Child:
        """The keyrelay-policyd that serves setup ``name``."""
        if name == REDIS_SETUP and self.redis_policyd is not None:
            return self.redis_policyd
        return self.relay.children["policyd"]

    # -- one setup at a time ---------------------------------------------------------------
    def select(self, name: str) -> None:
        relay, data = RESTRICTIONS[name if name in RESTRICTIONS else "auth-only"]
        extra = {}
        if REDIS_SETUP in self.milters:  # two policyds: the login goes to the setup's one
            extra["smtpd_sasl_path"] = SASL_PATHS.get(name, SASL_PATHS[""])
        self.switch(name, smtpd_milters=self.milters[name].endpoint,
                    smtpd_relay_restrictions=relay, smtpd_data_restrictions=data, **extra)

    def signed_as(self, name: str, domain: str, raw: bytes) -> bool:
        found = signatures(raw)
        if name == "baseline":
            return found == []
        if name.startswith("keyrelay"):
            return (sorted(a for a, _, _ in found) == ["ed25519-sha256", "rsa-sha256"]
                    and all(d == domain and s in self.selectors.get(domain, ())
                            for _, s, d in found))
        return found == [("rsa-sha256", name, domain)]

    def load(self, count: int, size: int, per_session: int, run: str,
             rate: float | None = None) -> Load:
        return Load(host=self.relay.settings.host, port=self.port,
                    implicit_tls=self.shape.tls == "implicit", principals=self.principals,
                    body=make_body(size), tag=run, count=count, per_session=per_session,
                    concurrency=self.shape.concurrency, rate=rate)

    def sink_census(self, run: str, name: str) -> tuple[Counter[int], int]:
        """How often each message of ``run`` is at the sink, and how many are not signed as
        ``name`` signs."""
        seen: Counter[int] = Counter()
        unsigned = 0
        for path in self.outbox():
            with path.open("rb") as handle:
                head = handle.read(32768)
            found = ID_RE.search(head)
            if found is None or found.group(1).decode() != run:
                continue
            seen[int(found.group(2))] += 1
            if not self.signed_as(name, found.group(3).decode(), head):
                unsigned += 1
        return seen, unsigned

    def warm_up(self, name: str, size: int) -> None:
        """Warm-up mail until all of it arrives signed as ``name`` signs (an smtpd of before
        the reload may still serve the first session); the first time, verify signatures."""
        count = max(1, self.shape.warmup)
        for attempt in range(10):
            self.clear_outbox()
            run = f"warm{attempt}{name}{size}"
            result = send(self.load(count, size, max(1, count // 2), run))
            self.wait_drained()
            if result.errors:
                raise BenchError(f"{name}: warm-up refused: {dict(result.errors)}")
            wait_until(lambda: len(self.outbox()) >= count, 30,
                       f"{count} warm-up messages at the sink")
            seen, unsigned = self.sink_census(run, name)
            if sum(seen.values()) == count and unsigned == 0:
                break
            if attempt == 9:
                raise BenchError(f"{name}: {unsigned} of {count} warm-up messages were not "
                                 f"signed as {name} signs")
            time.sleep(0.5)
        if name not in self.checked:
            self.verify(name, self.outbox()[-1])
            if name.startswith("keyrelay"):
                who = self.principals[0]
                self.check_from_refused(who.key, who.mail_from, who.rcpt_to,
                                        starttls=True)  # the submission service: STARTTLS
            self.checked.add(name)
