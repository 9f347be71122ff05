"""No secret in any log of a running relay (issue 10, security checks).

Against the relay ``make run`` starts (fixture ``demo_relay``, shared by the session, so its
logs also hold what every earlier test did): a tenant logs in and sends, and wrong keys,
a password and another username are tried. Then every log the relay writes — keyrelay-policyd's
and keyrelay-milter's output, Postfix's maillog, the CLI's audit log — is searched for:
the key and its secret part, the wrong secrets tried, the password, anything shaped like a
whole API key, every key hash the directory holds, and every line of every private DKIM key.
"""

from __future__ import annotations

import functools
import re
import secrets
from pathlib import Path

from keyrelay.demo import Relay
from keyrelay.directory import YamlDirectory
from testkit.relay import connect, message, new_tenant, next_source, reply_of, send, wait_delivered

WHOLE_KEY = re.compile(r"kr\.[a-z0-9]+\.[A-Za-z0-9_-]{43}")


def relay_logs(relay: Relay) -> dict[str, str]:
    s = relay.settings
    paths = [*s.logs.glob("*.log"), s.maillog, s.run_dir / "audit.log"]
    return {str(p): p.read_text(errors="replace") for p in paths if p.exists()}


def private_key_lines(key_dir: Path) -> set[str]:
    lines = set()
    for pem in key_dir.rglob("*"):
        if pem.is_file():
            lines |= {line for line in pem.read_text().splitlines()
                      if line and not line.startswith("-----")}
    return lines


def test_no_log_holds_a_key_a_hash_a_password_or_a_private_key(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    wrong = tenant.key.rsplit(".", 1)[0] + "." + secrets.token_urlsafe(32)
    password = "correct-horse-" + secrets.token_hex(8)
    for user, secret in (("apikey", wrong), ("apikey", password), ("admin", password),
                         ("apikey", tenant.key[:-1])):
        with connect(demo_relay, "submission", source=next_source()) as client:
            code, _ = reply_of(functools.partial(client.login, user, secret))
        assert code == 535
    mid, text = message(tenant.sender, "rcpt@example.net", "secrets stay secret")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    wait_delivered(demo_relay, mid)

    data = YamlDirectory(str(demo_relay.settings.run_dir / "directory.yaml")).load()
    hashes = {key.secret_hash for key in data.keys.values()}
    assert tenant.key_id in data.keys and hashes
    forbidden = {tenant.key, tenant.key.rsplit(".", 1)[1], wrong.rsplit(".", 1)[1], password,
                 tenant.key[:-1], *hashes,
                 *private_key_lines(demo_relay.settings.run_dir / "dkim")}
    logs = relay_logs(demo_relay)
    # the right logs: the tenant's login and message are in them
    assert tenant.principal in logs[str(demo_relay.settings.logs / "policyd.log")]
    assert tenant.principal in logs[str(demo_relay.settings.logs / "milter.log")]
    for name, text in logs.items():
        found = [s for s in forbidden if s in text]
        assert not found, f"{name} holds {len(found)} secret(s)"
        assert not WHOLE_KEY.search(text), f"{name} holds something shaped like an API key"
