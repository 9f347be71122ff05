"""The reputation guard inside the real ``keyrelay-events`` (docs/reputation.md, "The
guard"): a synthetic maillog in which acme/news bounces many of its recipients and
acme/billing bounces every one of a few; news is paused (a ``paused`` event in the state file,
the warning line in the log, the pause in the reputation store), billing is not (below
min_volume). In monitor mode the same log gives ``would_pause`` and no pause that refuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keyrelay import admin
from keyrelay.config.loader import parse_config
from keyrelay.directory.yamlfile import YamlDirectory
from keyrelay.events.store import EventStore
from keyrelay.reputation import open_reputation
from testkit.net import wait_until
from testkit.policyd import now

BIN = Path(sys.executable).parent


def _lines(principal: str, key_id: str, sent: int, bounced: int, first: int) -> list[str]:
    """Postfix's lines for ``sent + bounced`` one-recipient messages of ``principal``."""
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
    out: list[str] = []
    for n in range(sent + bounced):
        qid = f"C{first + n:010d}"
        pid = 5000 + first + n
        rcpt = f"r{n}@example.net"
        out += [
            f"{stamp} relay postfix/smtpd[{pid}]: connect from app[192.0.2.10]\n",
            f"{stamp} relay postfix/smtpd[{pid}]: {qid}: client=app[192.0.2.10], "
            f"sasl_method=PLAIN, sasl_username={principal}:{key_id}\n",
            f"{stamp} relay postfix/cleanup[4250]: {qid}: message-id=<{qid}@acme.example>\n",
            f"{stamp} relay postfix/qmgr[4100]: {qid}: from=<x@acme.example>, size=400, "
            "nrcpt=1 (queue active)\n",
        ]
        if n < sent:
            out.append(f"{stamp} relay postfix/smtp[4300]: {qid}: to=<{rcpt}>, "
                       "relay=mx.example.net[198.51.100.5]:25, delay=1, delays=0.1/0/0.4/0.5, "
                       "dsn=2.0.0, status=sent (250 2.0.0 Ok)\n")
        else:
            out.append(f"{stamp} relay postfix/smtp[4300]: {qid}: to=<{rcpt}>, "
                       "relay=mx.example.net[198.51.100.5]:25, delay=1, delays=0.1/0/0.4/0.5, "
                       f"dsn=5.1.1, status=bounced (host mx.example.net said: 550 5.1.1 "
                       f"<{rcpt}>: User unknown (in reply to RCPT TO command))\n")
        out += [f"{stamp} relay postfix/qmgr[4100]: {qid}: removed\n",
                f"{stamp} relay postfix/smtpd[{pid}]: disconnect from app[192.0.2.10]\n"]
    return out


def _run(tmp_path: Path, monitor: bool) -> tuple[list[dict[str, Any]], str, Any]:
    maillog, state = tmp_path / "maillog", tmp_path / "events.db"
    settings: dict[str, Any] = {
        "directory": {"path": str(tmp_path / "directory.yaml")},
        "events": {"maillog": str(maillog), "state": str(state), "start_at_end": False,
                   "poll": "0.05s"},
        "suppressions": {"path": str(tmp_path / "supp.db")},
        "reputation": {"path": str(tmp_path / "reputation.db"), "min_volume": 20,
                       "monitor": monitor},
    }
    config_path = tmp_path / "keyrelay.yaml"
    config_path.write_text(json.dumps(settings))
    with YamlDirectory(str(tmp_path / "directory.yaml")).transaction() as data:
        admin.add_account(data, "acme", now())
    # news: 30 delivered, 15 bounced (33 %); billing: 10 bounced of 10, below min_volume
    maillog.write_text("".join(_lines("acme/news", "aaaaaaaaaaaaaaaa", 30, 15, 0)
                               + _lines("acme/billing", "bbbbbbbbbbbbbbbb", 0, 10, 100)))
    log = tmp_path / "events.log"
    with log.open("ab") as out:
        daemon = subprocess.Popen([BIN / "keyrelay-events", "--config", config_path],
                                  stdout=out, stderr=out)

    def stored() -> list[dict[str, Any]]:
        store = EventStore(state)
        try:
            return [event for _, event in store.events()]
        finally:
            store.close()

    wanted = "would_pause" if monitor else "paused"
    config = parse_config(settings, str(config_path))
    store = open_reputation(config)
    try:
        # the daemon follows, then its outbox thread counts and checks: 60 s is generous
        wait_until(lambda: state.exists() and any(e["event"] == wanted for e in stored()),
                   60, f"a {wanted} event in the state file")
        wait_until(lambda: store.counts(["acme/billing"], 0) == {"acme/billing": (0, 10)},
                   60, "acme/billing's bounces counted")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, log.read_text()[-2000:]
    try:
        return stored(), log.read_text(), store.paused()
    finally:
        store.close()


def test_the_bouncing_subuser_is_paused_and_the_small_one_is_not(tmp_path: Path) -> None:
    events, log, paused = _run(tmp_path, monitor=False)
    marks = [e for e in events if e["event"] in ("paused", "would_pause")]
    assert [(e["event"], e["account"], e["subuser"], e["delivered"], e["bounced"])
            for e in marks] == [("paused", "acme", "news", 30, 15)]
    assert marks[0]["window"] == 86400 and marks[0]["bounce_rate"] == pytest.approx(0.3333)
    assert ("reputation: paused acme/news: bounce rate 33.3 % (15 of 45) over 24h is above "
            "5 %; resume with keyrelay subuser resume acme/news") in log
    assert "pause acme/billing" not in log and "paused acme/billing" not in log
    assert set(paused) == {"acme/news"} and not paused["acme/news"].monitor
    assert "Traceback" not in log


def test_monitor_mode_logs_would_pause_and_pauses_nothing(tmp_path: Path) -> None:
    events, log, paused = _run(tmp_path, monitor=True)
    assert [(e["event"], e["subuser"]) for e in events
            if e["event"] in ("paused", "would_pause")] == [("would_pause", "news")]
    assert "reputation: would pause acme/news: bounce rate 33.3 % (15 of 45)" in log
    assert "reputation: paused" not in log
    # recorded, so it is said once, but keyrelay-policyd lets its mail pass
    assert [p.monitor for p in paused.values()] == [True]
