"""A smoke run of the milter-protocol load generator (bench/milter_bench.py) against the real
keyrelay-milter: it speaks the protocol as Postfix does and reads every signature back. The
figures are the benchmark's business (docs/BENCHMARKS.md), never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import milter_bench
from bench.milter_bench import MilterClient, inserted_headers, make_message, make_site

REPO = Path(__file__).resolve().parent.parent


def test_a_small_run_signs_every_message_on_every_connection(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    with milter_bench.milter_process(site, None) as pid:
        milter_bench.verify_once(site)  # dkimpy verifies both signatures, or SystemExit
        result = milter_bench.run_load(site.endpoint, pid, site.login, site.sender,
                                       messages=30, concurrency=3, body_size=2000, expect=2)
    assert (result.messages, result.signatures) == (30, 60)
    assert result.milter_cpu > 0


def test_the_milter_is_driven_as_negotiated_and_a_refusal_stops_the_run(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    with milter_bench.milter_process(site, None) as pid:
        client = MilterClient(site.endpoint)
        try:
            negotiated = client.negotiate()
            # keyrelay-milter asks for its macros and skips what it does not read
            assert negotiated.macros["M"] == ("{auth_authen}", "{client_addr}")
            assert negotiated.macros["E"] == ("i",)
            assert negotiated.skips("C") and negotiated.skips("R")
            assert not negotiated.waits("L") and not negotiated.waits("B")
            message = make_message(site.login, "eve@evil.example", 100, "Q1")
            client.open_session(message.macros)
            replies = client.send(message)
        finally:
            client.close()
        assert replies[-1][0] == b"y"  # SMFIR_REPLYCODE: 550 5.7.1 ...
        assert replies[-1][1].startswith(b"550 5.7.1")
        assert inserted_headers(replies) == []
        with pytest.raises(SystemExit, match="run failed"):
            milter_bench.run_load(site.endpoint, pid, "bench:nokey", site.sender,
                                  messages=4, concurrency=2, body_size=100, expect=2)


@pytest.mark.slow
def test_the_command_line_prints_a_row_per_source(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.milter_bench", "--messages", "20", "--warmup", "2",
         "--repeat", "1", "--concurrency", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPU ms/msg" in result.stdout
    assert "signatures 40" in result.stdout
