"""keyrelay-policyd with its directory in LDAP against the same directory in YAML, in one run.

Builds one directory with --keys API keys (bench/policyd_bench.py's, testkit/policydload.py:
100 subusers of one account), writes it to a YAML file and, through keyrelay's LDAP backend,
into a private slapd started for the run (testkit/slapd.py: StartTLS, the shipped schema and
the indexes of docs/ldap.md). Then, in one run:

1. LDAP costs: the first import of every entry, and a full read of the directory (what a
   policyd start, and each reload after a change, costs), --reads times;
2. warm throughput: auth and policy requests/s, p50/p99, 50 persistent connections, a
   policyd on YAML and a policyd on LDAP taking turns (--rounds each, interleaved);
3. how soon a change is served ("cold" lookups: policyd never asks LDAP during a request,
   so a key that the in-memory copy lacks is refused at once; what costs time is the copy
   catching up): --trials times, a key is created through the backend and AUTH is tried
   every 10 ms until policyd accepts it; the delay from the write to the first OK.

    .venv/bin/python -m bench.ldap_bench --keys 10000
    .venv/bin/python -m bench.ldap_bench --keys 10000 --rounds 3 --seconds 8 --trials 30

Needs slapd (`make deps` installs it, disabled: the bench starts its own).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keyrelay import admin, keys
from keyrelay.config import parse_config
from keyrelay.directory.ldap import LdapDirectory
from keyrelay.directory.model import ApiKey
from keyrelay.directory.yamlfile import YamlDirectory
from testkit import policydload
from testkit.slapd import KEYRELAY_INDEXES, SLAPD, Slapd


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def ldap_backend(server: Slapd, **overrides: Any) -> LdapDirectory:
    section = server.directory_config(**overrides)
    return LdapDirectory(parse_config({"directory": section}, "bench").directory.ldap)


def measure_service(service: str, endpoint: str, issued: list[tuple[str, str]],
                    connections: int, seconds: float, pid: int) -> tuple[float, ...]:
    """(requests/s, p50 ms, p99 ms, policyd CPU us per request), closed loop."""
    count, elapsed, lat, cpu = asyncio.run(policydload.drive(
        service, endpoint, issued, connections, seconds, 0.0, pid))
    return (count / elapsed, statistics.median(lat) * 1e3, percentile(lat, 0.99) * 1e3,
            cpu / count * 1e6)


async def auth_once(endpoint: str, text: str) -> bool:
    reader, writer = await asyncio.open_unix_connection(endpoint[5:])
    writer.write(b"VERSION\t1\t0\nCPID\t1\n")
    while (await reader.readline()) != b"DONE\n":
        pass
    resp = base64.b64encode(b"\0apikey\0" + text.encode()).decode()
    writer.write(f"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\t"
                 f"secured\tresp={resp}\n".encode())
    reply = await reader.readline()
    writer.close()
    return reply.startswith(b"OK\t")


def change_delay(backend: LdapDirectory, endpoint: str, principal: str) -> tuple[float, float]:
    """(seconds the write took, as `keyrelay key create` makes it; seconds from the end of
    the write to policyd's first OK for the new key)."""
    started = time.perf_counter()
    with backend.transaction() as data:
        new = keys.generate()
        data.keys[new.key_id] = ApiKey(
            key_id=new.key_id, principal=principal, name=f"new-{new.key_id}",
            secret_hash=new.secret_hash, scopes=("mail.send",), created=datetime.now(UTC))
    written = time.perf_counter()
    while not asyncio.run(auth_once(endpoint, new.text)):
        if time.perf_counter() - written > 60:
            raise SystemExit("a new key was not served within 60 s")
        time.sleep(0.01)
    return written - started, time.perf_counter() - written


def main() -> None:
    policydload.install_uvloop()
    parser = argparse.ArgumentParser(prog="python -m bench.ldap_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="turns of each backend for the throughput figures (interleaved)")
    parser.add_argument("--reads", type=int, default=5, help="full reads of the directory")
    parser.add_argument("--trials", type=int, default=20, help="new keys timed until served")
    parser.add_argument("--refresh-interval", type=float, default=2.0,
                        help="directory.ldap.refresh_interval of the LDAP policyd (default "
                        "2, keyrelay's default)")
    args = parser.parse_args()
    if not SLAPD.exists():
        raise SystemExit(f"{SLAPD} not found: run `make deps` first")

    with tempfile.TemporaryDirectory(prefix="kr-ldap-bench-") as tmp, \
            Slapd(indexes=KEYRELAY_INDEXES) as server:
        folder = Path(tmp)
        issued = policydload.build_directory(folder / "directory.yaml", args.keys)
        data = YamlDirectory(str(folder / "directory.yaml")).load()
        gc.collect()
        print(f"directory: {args.keys} keys, {len(data.subusers)} subusers; slapd "
              f"{server.url} (StartTLS), indexes {', '.join(KEYRELAY_INDEXES)}")

        backend = ldap_backend(server)
        t0 = time.perf_counter()
        with backend.transaction() as written:
            admin.replace_all(written, data)
        print(f"LDAP import (one add per entry): {time.perf_counter() - t0:.1f}s", flush=True)
        reads = []
        for _ in range(args.reads):
            t0 = time.perf_counter()
            loaded = backend.load()
            reads.append(time.perf_counter() - t0)
        assert loaded == data, "LDAP returned other records than were written"
        print(f"LDAP full read (connect, StartTLS, bind, paged search, records): median "
              f"{statistics.median(reads):.2f}s, min {min(reads):.2f}s, max {max(reads):.2f}s "
              f"over {args.reads} reads")

        sections = {
            "yaml": f"{{path: {folder / 'directory.yaml'}}}",
            "ldap": json.dumps(server.directory_config(refresh_interval=args.refresh_interval)),
        }
        results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
        for _ in range(args.rounds):
            for kind, section in sections.items():
                run_dir = folder / kind
                run_dir.mkdir(exist_ok=True)
                listen = policydload.endpoints(run_dir, "unix")
                t0 = time.perf_counter()
                proc = policydload.start_policyd(run_dir, listen, directory=section)
                ready = time.perf_counter() - t0
                try:
                    for service in ("policy", "auth"):
                        figures = measure_service(service, listen[service], issued,
                                                  args.connections, args.seconds, proc.pid)
                        results.setdefault((kind, service), []).append(figures)
                        print(f"{kind:4s} {service:6s} {figures[0]:8.0f} req/s  p50 "
                              f"{figures[1]:.2f} ms  p99 {figures[2]:.2f} ms  policyd CPU "
                              f"{figures[3]:.0f} us/request  (ready in {ready:.1f}s)",
                              flush=True)
                    if kind == "ldap" and _ == args.rounds - 1:
                        delays = [change_delay(backend, listen["auth"], "bench/s0")
                                  for _ in range(args.trials)]
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)

        print("\nmedian over rounds:")
        for service in ("policy", "auth"):
            yaml_rate, yaml_cpu = (statistics.median(r[i] for r in results[("yaml", service)])
                                   for i in (0, 3))
            ldap_rate, ldap_cpu = (statistics.median(r[i] for r in results[("ldap", service)])
                                   for i in (0, 3))
            print(f"  {service:6s} yaml {yaml_rate:8.0f} req/s ({yaml_cpu:.0f} us), ldap "
                  f"{ldap_rate:8.0f} req/s ({ldap_cpu:.0f} us): ldap/yaml "
                  f"{ldap_rate / yaml_rate:.2f}")
        writes, served = [d[0] for d in delays], [d[1] for d in delays]
        print(f"one write (a key created through the backend, as the CLI does): median "
              f"{statistics.median(writes):.2f}s, max {max(writes):.2f}s")
        print(f"new key served after (refresh_interval {args.refresh_interval:g}s, "
              f"{args.trials} keys): p50 {statistics.median(served) * 1e3:.0f} ms, p99 "
              f"{percentile(served, 0.99) * 1e3:.0f} ms, max {max(served) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
