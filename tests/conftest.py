"""Fixtures shared by several test modules."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrelay.demo import Relay
from testkit.relay import private_relay
from testkit.slapd import DEFAULT_INDEXES, KEYRELAY_INDEXES, SLAPD, Slapd, keyrelay_schemas


@pytest.fixture(scope="session")
def demo_relay() -> Iterator[Relay]:
    """The relay ``make run`` starts (keyrelay.demo), on free loopback ports, for the session.

    A private Postfix configured by ``keyrelay postfix apply``, keyrelay-policyd and
    keyrelay-milter on unix sockets in its queue, smtp-sink writing to ``outbox/``. Every
    start step waits for readiness (banners, sockets); ``stop`` stops all of it.
    """
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("Postfix is not installed (make test installs it)")
    with private_relay("127.0.0.2") as relay:
        yield relay


@pytest.fixture(scope="session")
def slapd() -> Iterator[Slapd]:
    """A private OpenLDAP slapd on free loopback ports for the session (testkit/slapd.py).

    Debian's core schemas plus ``ldap/keyrelay.ldif`` when the repository has it (then with
    the indexes of docs/ldap.md), suffix ``dc=keyrelay,dc=test``, keyrelay's records under
    ``slapd.base_dn``, the default ACLs. Clients use ``slapd.url`` (StartTLS) or
    ``slapd.ldaps_url`` with ``slapd.ca_file``, bind as ``slapd.service_dn`` with the password
    in ``slapd.service_password_file`` (``slapd.directory_config()`` is keyrelay's
    ``directory:`` section for it). Shared by the session: a test that stops or pauses the
    server, or needs other ACLs, starts its own ``Slapd``.
    """
    if not SLAPD.exists():
        pytest.skip("slapd is not installed (make test installs it)")
    schemas = keyrelay_schemas()
    with Slapd(schemas=schemas, indexes=KEYRELAY_INDEXES if schemas else DEFAULT_INDEXES) as server:
        yield server


# -- make check and make test ------------------------------------------------------------------
# The modules that run everything in process: no Postfix, slapd, DNS server, Ansible or daemon
# process. `make check` (the edit loop) runs only these (`pytest -m "not system"`); `make test`
# runs them first, then the rest. Every other module is marked ``system`` here, so a new module
# is a system test until it is added to this list.
IN_PROCESS = frozenset({
    "test_config", "test_decisions", "test_dkimsign", "test_docs_commands", "test_export_import",
    "test_fuzz_parsers", "test_headers", "test_import_rules", "test_ldap_mapping", "test_logs",
    "test_lockout",
    "test_metrics", "test_migrate_sendgrid", "test_milter", "test_names", "test_policyd_codecs",
    "test_policyd_counters",
    "test_policyd_services", "test_quotas", "test_reasons", "test_sync",
    "test_counters_memory", "test_legacy_credential", "test_legacy_login",
    "test_events_maillog", "test_events_follow", "test_webhooks", "test_events_outbox",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem not in IN_PROCESS:
            item.add_marker(pytest.mark.system)


@pytest.fixture(autouse=True)
def keyrelay_logging_restored() -> Iterator[None]:
    """A daemon's main() run in process (``--check-config`` tests) points the ``keyrelay``
    logger at that moment's stderr and stops it propagating (keyrelay/logs.py ``configure``);
    left so, later tests in the same worker would log to a closed capture and caplog would
    see nothing. Put the logger back as it was after every test."""
    logger = logging.getLogger("keyrelay")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
