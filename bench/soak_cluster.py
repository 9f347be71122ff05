"""Fault-injection soak of two relay nodes sharing one LDAP and one Redis.

NAME
    soak_cluster.py - send a fixed number of messages through two nodes while Redis and the
    nodes' policy daemons fail

SYNOPSIS
    .venv/bin/python -m bench.soak_cluster [--messages N] [--concurrency C] [--size BYTES]
        [--faults-every SECONDS] [--fault-seconds S] [--max-seconds S] [--seed N] [--keep]

DESCRIPTION
    Starts the two-node cluster of `make run-cluster` (testkit/cluster.py: one private
    slapd with the directory, one private redis-server with the counters,
    `counters.on_unavailable: tempfail`; two nodes, each a private Postfix with
    keyrelay-policyd, keyrelay-milter and smtp-sink) with 2 accounts of 2 subusers each,
    each with its own key, and sends N messages with testkit/loadgen.py, half of every round
    through node A and half through node B at the same time (STARTTLS, AUTH PLAIN, 20
    messages per session, C sessions per node). Like a real application, the client sends
    again, in the next round and through the other node, every message that got a temporary
    answer (4xx) or whose session broke; a permanent answer (5xx) to a valid message is a
    failure of the relay.

    Meanwhile a driver, at random moments (on average every --faults-every seconds), does
    one of these, each kind once in random order and then again: redis-server killed
    (SIGKILL) and started again (empty: every count restarts at zero), redis-server hung
    (SIGSTOP) and resumed, redis-server stopped (SIGTERM) and started again, each for
    0.5-4 s; and one node's keyrelay-policyd killed (SIGKILL) and started again.

ACCOUNTING
    At the end, after both nodes' queues are empty, every file both smtp-sinks wrote is read:
      - every message the client saw accepted, by either node, is at a sink exactly once
        (messages whose session broke after the end of DATA was sent are "in doubt": they
        may arrive once and are sent again, so they are counted apart);
      - nothing is at a sink that was not accepted (in doubt excepted);
      - every delivered message carries keyrelay's two DKIM signatures (nothing unchecked);
      - no valid message got a permanent (5xx) answer; messages still refused when
        --max-seconds ran out are listed with their last (temporary) answer;
      - while Redis was away the nodes answered 451 4.3.0 (counted), never 5xx.
    The counts are printed; any loss, duplicate, unchecked acceptance or permanent refusal
    makes the exit status 1.

OPTIONS
    --messages N          messages to deliver (default 5000)
    --concurrency C       concurrent sessions per node (default 4)
    --size BYTES          body size (default 2000)
    --faults-every S      mean seconds between faults (default 3)
    --fault-seconds S     inject faults only during the first S seconds, but every kind
                          at least once (default 0: all along)
    --max-seconds S       give up re-sending after S seconds (default 1800)
    --seed N              seed of the fault schedule (default: random, printed)
    --keep                keep the temporary folder

REQUIREMENTS
    Root, slapd, redis-server and Postfix (make deps). A short run is part of `make test`
    (tests/test_soak_cluster.py); docs/RELIABILITY.md records a full run's figures.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench import soakbook
from bench.soakbook import Book
from keyrelay.demo import DemoError, Relay, Settings, keyrelay_cli
from testkit.cluster import Cluster
from testkit.loadgen import Load, LoadResult, Principal, make_body, send
from testkit.loadrelay import ID_RE
from testkit.net import free_ports, wait_until
from testkit.privaterelay import BenchError, bench_folder, leave_folder, signatures

PROG = "soak_cluster.py"


class Driver(threading.Thread):
    """Injects one fault at a time at random moments until stopped; keeps a journal."""

    def __init__(self, cluster: Cluster, rng: random.Random, mean: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.rng, self.mean = cluster, rng, mean
        self.halt = threading.Event()
        self.journal: Counter[str] = Counter()
        self.error: BaseException | None = None
        self.until = 0.0  # time.monotonic() after which no more faults; 0: the whole run
        self.every_kind = threading.Event()

    def run(self) -> None:
        faults = [self.kill_redis, self.hang_redis, self.stop_redis, self.kill_policyd]
        order: list[Callable[[], None]] = []
        done = 0
        try:
            while not self.halt.wait(self.rng.expovariate(1 / self.mean)):
                if self.until and time.monotonic() > self.until and done >= len(faults):
                    break
                if not order:
                    order = self.rng.sample(faults, len(faults))
                order.pop()()
                done += 1
                if done >= len(faults):
                    self.every_kind.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def away(self) -> float:
        return self.rng.uniform(0.5, 4.0)

    def kill_redis(self) -> None:
        redis = self.cluster.redis
        assert redis is not None
        redis.kill()
        time.sleep(self.away())
        redis.start()
        self.journal["redis-server killed (SIGKILL) and started again, empty"] += 1

    def hang_redis(self) -> None:
        redis = self.cluster.redis
        assert redis is not None
        redis.pause()
        time.sleep(self.away())
        redis.resume()
        self.journal["redis-server hung (SIGSTOP) for a while"] += 1

    def stop_redis(self) -> None:
        redis = self.cluster.redis
        assert redis is not None
        redis.stop()
        time.sleep(self.away())
        redis.start()
        self.journal["redis-server stopped (SIGTERM) and started again, empty"] += 1

    def kill_policyd(self) -> None:
        name = self.rng.choice(["a", "b"])
        child = self.cluster.nodes[name].children["policyd"]
        child.kill()
        time.sleep(self.rng.uniform(0.2, 1.5))
        child.start()
        self.journal[f"node {name.upper()}'s keyrelay-policyd killed (SIGKILL) and "
                     "restarted"] += 1


def make_principals(cluster: Cluster, root: Path) -> tuple[list[Principal], dict[str, str]]:
    """2 accounts with 2 subusers each, a verified domain per account, a key each (through
    node A's configuration, into the shared LDAP directory), rate limits lifted; the
    principals and each domain's DKIM selectors."""
    node = cluster.nodes["a"].settings
    accounts: dict[str, dict[str, dict[str, object]]] = {
        f"soak{i}": {"subusers": {f"app{j}": {} for j in (1, 2)}} for i in (1, 2)}
    domains = {f"{name}.example": {"owner": name, "grants": [f"{name}/app{j}" for j in (1, 2)]}
               for name in accounts}
    declared = root / "soak-directory.yaml"
    declared.write_text(json.dumps({"accounts": accounts, "domains": domains}))
    keyrelay_cli(node, "sync", str(declared))
    selectors: dict[str, str] = {}
    principals = []
    for account in accounts:
        domain = f"{account}.example"
        keyrelay_cli(node, "domain", "mark-verified", domain)
        keyrelay_cli(node, "limits", "set", account, "--per-minute", "1000000",
                     "--per-hour", "60000000")
        printed = json.loads(keyrelay_cli(node, "domain", "dns", domain, "--json"))
        selectors[domain] = " ".join(sorted(
            r["name"].split(".")[0] for r in printed["records"]
            if r["type"] == "TXT" and "._domainkey." in r["name"]))
        for pid in (account, f"{account}/app1", f"{account}/app2"):
            key = json.loads(keyrelay_cli(node, "key", "create", pid, "--name", "soak",
                                          "--json"))["key"]
            who = pid.replace("/", "-")
            principals.append(Principal(pid, key, f"{who}@{domain}", f"{who}@sink.example"))
    # the DKIM keys sync made on node A, on node B too (as the Ansible role copies them)
    cluster.copy_dkim_keys(node, cluster.nodes["b"].settings)
    return principals, selectors


def census(cluster: Cluster, run: str, selectors: dict[str, str]) -> tuple[Counter[int], int]:
    """How often each message of ``run`` is at either sink, and how many are not signed
    with keyrelay's two signatures by their domain's selectors."""
    seen: Counter[int] = Counter()
    unsigned = 0
    for relay in cluster.nodes.values():
        for path in relay.settings.outbox.iterdir():
            raw = path.read_bytes()
            found = ID_RE.search(raw[:32768])
            if found is None or found.group(1).decode() != run:
                continue
            seen[int(found.group(2))] += 1
            domain = found.group(3).decode()
            sigs = signatures(raw)
            if (sorted(a for a, _, _ in sigs) != ["ed25519-sha256", "rsa-sha256"]
                    or any(d != domain or s not in selectors.get(domain, "").split()
                           for _, s, d in sigs)):
                unsigned += 1
    return seen, unsigned


def queue_empty(relay: Relay) -> bool:
    listed = subprocess.run(["postqueue", "-c", str(relay.settings.postfix_etc), "-j"],
                            capture_output=True, text=True, check=False)
    return listed.returncode == 0 and listed.stdout.strip() == ""


def round_through_both(cluster: Cluster, principals: list[Principal], body: bytes, run: str,
                       todo: list[int], concurrency: int, turn: int) -> LoadResult:
    """Half of ``todo`` through each node at once (which half goes where turns each round);
    the two outcomes merged."""
    relays = list(cluster.nodes.values())
    halves = [todo[(i + turn) % 2::2] for i in range(2)]
    results: list[LoadResult] = []

    def one(relay: Relay, numbers: list[int]) -> None:
        s = relay.settings
        results.append(send(Load(host=s.host, port=s.submission_port, implicit_tls=False,
                                 principals=principals, body=body, tag=run,
                                 count=len(numbers), per_session=20, concurrency=concurrency,
                                 numbers=numbers)))

    threads = [threading.Thread(target=one, args=(relay, numbers))
               for relay, numbers in zip(relays, halves, strict=True) if numbers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = LoadResult()
    for result in results:
        merged.accepted.update(result.accepted)
        merged.errors.update(result.errors)
        merged.reply_of.update(result.reply_of)
        merged.refused_by.update(result.refused_by)
        merged.in_doubt |= result.in_doubt
        merged.sent_by.update(result.sent_by)
    return merged


def soak(cluster: Cluster, root: Path, args: argparse.Namespace, rng: random.Random) -> bool:
    principals, selectors = make_principals(cluster, root)
    driver = Driver(cluster, rng, args.faults_every)
    if args.fault_seconds:
        driver.until = time.monotonic() + args.fault_seconds
    run, body = f"soakc{rng.randrange(10**6)}", make_body(args.size)
    todo = list(range(args.messages))
    book = Book()
    rounds = 0
    start = time.monotonic()
    driver.start()
    try:
        # a driver that failed ends the run at once (its error is raised below)
        while (todo and time.monotonic() - start < args.max_seconds
               and driver.error is None):
            rounds += 1
            outcome = round_through_both(cluster, principals, body, run, todo,
                                         args.concurrency, rounds)
            todo = book.sort(outcome)
            print(f"  round {rounds}: {len(outcome.sent_by)} accepted, {len(todo)} to send "
                  f"again, {len(book.permanent)} refused permanently so far", flush=True)
            if todo:
                time.sleep(0.5)
        if driver.until:
            deadline = time.monotonic() + 180
            while (driver.is_alive() and not driver.every_kind.wait(0.5)
                   and time.monotonic() < deadline):
                pass
    finally:
        driver.halt.set()
        driver.join()
    if driver.error is not None:
        raise driver.error
    redis = cluster.redis
    assert redis is not None
    redis.start()  # a fault may have been the last thing done (the driver mends its own)
    for relay in cluster.nodes.values():
        if not relay.children["policyd"].running():
            relay.children["policyd"].start()
    for relay in cluster.nodes.values():
        wait_until(lambda relay=relay: queue_empty(relay), 600,  # type: ignore[misc]
                   f"{relay.settings.run_dir.name}'s queue to empty")
    time.sleep(1)
    seen, unsigned = census(cluster, run, selectors)

    redis_away = sum(count for label, count in book.replies.items() if "4.3.0" in label)
    print(f"\n{args.messages} messages through two nodes, {rounds} rounds, "
          f"{time.monotonic() - start:.0f} s; faults injected:")
    for what, count in sorted(driver.journal.items()):
        print(f"  {count:5} {what}")
    print("answers that made the client send again or give up:")
    for what, count in sorted(book.replies.items()):
        print(f"  {count:5} {what}")
    per_node = Counter(relay.settings.run_dir.name for relay in cluster.nodes.values()
                       for path in relay.settings.outbox.iterdir())
    lines, broken = book.ledger(seen, unsigned, "at the sinks")
    print("accounting:\n" + "\n".join(lines) + "\n"
          f"  files per node {dict(sorted(per_node.items()))}\n"
          f"  temporary answers naming 4.3.0 (Redis away) {redis_away}")
    # a message still refused when the run gave up is a failure here: with the faults over,
    # every message must get through one of the nodes
    failed = broken or bool(book.todo)
    print("\nRESULT: " + ("FAILED" if failed else "every promise kept"))
    return not failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return soakbook.parse_args(argv, __doc__ or "", "python -m bench.soak_cluster", messages=5000,
                               concurrency=4)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = bench_folder(PROG, "krsoakc-", None)
    if root is None:
        return 1
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}")
    ports = iter(free_ports(10))
    a, b = (Settings(root / "cluster" / node, smtp_port=next(ports),
                     submission_port=next(ports), alt_submission_port=next(ports),
                     submissions_port=next(ports), sink_port=next(ports),
                     policyd_metrics_port=0, milter_metrics_port=0,
                     pool_address="127.0.0.23") for node in ("node-a", "node-b"))
    cluster = Cluster(root, a, b, say=lambda text: print(text, flush=True),
                      refresh_interval=1.0)
    status, kept = 0, False
    try:
        cluster.start()
        kept = soak(cluster, root, args, random.Random(seed))
    except (BenchError, DemoError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        status = 130
    finally:
        print("stopping both nodes, redis-server and slapd ...", flush=True)
        cluster.stop()
    if status == 0 and not kept:
        status = 1
    return leave_folder(root, status, args.keep)


if __name__ == "__main__":
    sys.exit(main())
