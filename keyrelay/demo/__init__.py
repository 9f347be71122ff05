"""``make run``: a working keyrelay relay on loopback, in the foreground, under ``run/``.

It starts a private Postfix instance (``postfix -c run/postfix/etc``; /etc/postfix is never
touched) with its smtpd services on loopback ports, keyrelay-policyd and keyrelay-milter on
unix sockets in that instance's ``private/`` folder, and ``smtp-sink`` as the outside world:
every message Postfix delivers lands in ``run/outbox/``. Postfix's settings come from
``keyrelay postfix apply``, the same command a production install uses.

The demo state (created once, kept across runs; ``make clean`` starts afresh): account
``demo`` with subuser ``demo/app``, IP pool ``demo`` on 127.0.0.2 assigned to it, domain
``demo.example`` with its DKIM keys, marked verified (the demo has no DNS), and on every start
a freshly created API key (the previous demo key is revoked). ``run/demo.env`` holds the key
and the ports as shell ``KEY=value`` lines (mode 0600). The environment variables it reads
are in ``python -m keyrelay.demo --help``.

Modules: ``settings`` (``Settings``: paths and ports, from the environment), ``state`` (the
configuration, the demo tenant, its key, ``demo.env``), ``postfix`` (the private instance's
main.cf/master.cf and certificate), ``processes`` (``Child`` and readiness probes), ``relay``
(``Relay``: everything started in order and stopped), ``cli`` (``main``).

The public API, for the tests and benchmarks that run this relay (testkit/, bench/); nothing
else of the package is meant to be imported from outside it:

- ``Settings``, ``Relay``: the relay on the ports and in the folder ``Settings`` says;
  ``Relay.start()``/``stop()``, or ``prepare()``, the ``sink()``/``policyd()``/``milter()``
  processes and ``start_postfix()`` for a caller that starts the parts itself.
- ``Child``: one process with its log and readiness check; ``DemoError``: what the demo
  raises when it cannot go on (the message says why).
- ``keyrelay_cli(settings, *args)``: the real ``keyrelay`` command on the relay's
  configuration; ``read_env(path)``: the values of a ``demo.env``; ``tail(path)``: the end of
  a log.
- ``ensure_daemon_user(settings, say)``, ``give_to_daemons(settings, path, mode, owner)``:
  the daemons' system user, and a file or folder given to it (the two-node demo's shared
  secrets, testkit/cluster.py).
- The demo tenant: ``DEMO_ACCOUNT``, ``DEMO_SUBUSER``, ``DEMO_POOL``, ``DEMO_DOMAIN``,
  ``DEMO_FROM``, ``DEMO_TO``.
- Building another private Postfix the same way: ``BASE_MASTER_CF``, ``make_certificate``,
  ``SMTP_SINK``; readiness probes ``greets(host, port)`` (an SMTP banner) and
  ``unix_accepts(path)``.
- ``main(argv)``: ``python -m keyrelay.demo``; ``run_in_foreground(...)``: its life cycle
  (started as root, stopped on Ctrl-C, SIGTERM or a part that stopped), which ``make
  run-cluster`` shares (testkit/cluster.py).
"""

from .cli import main, run_in_foreground
from .postfix import BASE_MASTER_CF, make_certificate
from .processes import SMTP_SINK, Child, greets, tail, unix_accepts
from .relay import Relay
from .settings import (
    DEMO_ACCOUNT,
    DEMO_DOMAIN,
    DEMO_FROM,
    DEMO_POOL,
    DEMO_SUBUSER,
    DEMO_TO,
    DemoError,
    Settings,
)
from .state import ensure_daemon_user, give_to_daemons, keyrelay_cli, read_env

__all__ = [
    "BASE_MASTER_CF",
    "DEMO_ACCOUNT",
    "DEMO_DOMAIN",
    "DEMO_FROM",
    "DEMO_POOL",
    "DEMO_SUBUSER",
    "DEMO_TO",
    "SMTP_SINK",
    "Child",
    "DemoError",
    "Relay",
    "Settings",
    "ensure_daemon_user",
    "give_to_daemons",
    "greets",
    "keyrelay_cli",
    "main",
    "make_certificate",
    "read_env",
    "run_in_foreground",
    "tail",
    "unix_accepts",
]
