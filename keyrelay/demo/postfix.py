"""The demo's private Postfix instance: its main.cf and master.cf before ``keyrelay postfix
apply``, the TLS certificate, and the permissions Postfix's daemons need to reach it."""

from __future__ import annotations

import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from .settings import BOUNCE_DOMAIN, DEFER_DOMAIN, Settings

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

# The Postfix daemons every instance needs; smtpd listeners come from `keyrelay postfix apply`.
BASE_MASTER_CF = """\
# Written by keyrelay's demo (make run); keyrelay postfix apply adds the smtpd services
# and the IP pool transports.
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def make_certificate(folder: Path, name: str) -> None:
    """A self-signed certificate for STARTTLS and port 465 (kept across runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    if key.exists() and cert.exists():
        return
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    key.chmod(0o600)


def make_reachable(path: Path, say: Callable[[str], None]) -> None:
    """Give others search (x) permission on ``path`` and its parents where missing.

    Postfix's daemons and smtp-sink run as user postfix and open files under ``run/`` by
    absolute path; search permission lets them through a folder without listing it.
    """
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            say(f"note: added search permission (o+x) to {folder} so Postfix (user postfix) "
                "can reach the demo's queue and outbox")


def write_postfix_base(settings: Settings) -> None:
    """main.cf and master.cf of the private instance, before keyrelay postfix apply."""
    etc, queue, data = settings.postfix_etc, settings.queue, settings.run_dir / "postfix" / "data"
    for folder in (etc, queue, data):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.chown(data, "postfix")
    sink = f"[{settings.host}]:{settings.sink_port}"
    main = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue),
        "data_directory": str(data),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "inet_interfaces": settings.host,
        "inet_protocols": "ipv4",
        "myhostname": "relay.demo.example",
        "mydomain": "demo.example",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 this relay delivers no local mail",
        # The outside world of the demo is smtp-sink: all mail goes there, also mail
        # routed through an IP pool transport (FILTER kr-pool-demo: has no next hop).
        "relayhost": sink,
        "default_filter_nexthop": sink,
        # Port 25: only authenticated clients relay, not the whole of mynetworks.
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
        "maillog_file": str(settings.maillog),
        "maillog_file_prefixes": str(settings.run_dir),
        "smtputf8_enable": "no",
        "biff": "no",
        "delay_warning_time": "0",
        "smtpd_banner": "$myhostname ESMTP keyrelay demo",
    }
    # receivers that refuse (make run): mail of a login without an IP pool reaches them
    # through transport_maps; a pool's mail leaves through its FILTER transport to
    # default_filter_nexthop whatever the recipient (docs/postfix-hooks.md)
    routes = [f"{domain} smtp:[{settings.host}]:{port}\n" for domain, port in
              ((BOUNCE_DOMAIN, settings.bounce_sink_port), (DEFER_DOMAIN, settings.defer_sink_port))
              if port]
    if routes:
        (etc / "transport").write_text("".join(routes))
        main["transport_maps"] = f"texthash:{etc / 'transport'}"
    (etc / "main.cf").write_text(
        "# Written by keyrelay's demo (make run); keyrelay postfix apply adds its settings.\n"
        + "".join(f"{name} = {value}\n" for name, value in main.items()))
    (etc / "master.cf").write_text(BASE_MASTER_CF)
