"""The short soak of bench/soak.py with the directory in a real slapd that is stopped, killed
and hung, and a daemon that must not start while slapd is down or its ACLs hide the records
(test_soak.py has the YAML one and what both check). A module of its own, so that `make test`'s
workers run the two soaks side by side."""

from __future__ import annotations

import pytest
from test_soak import pytestmark as soak_marks
from test_soak import soak

from testkit.slapd import SLAPD

pytestmark = soak_marks  # the same timeout, and the same need for root and Postfix


@pytest.mark.slow
@pytest.mark.skipif(not SLAPD.exists(), reason="slapd is not installed (make test installs it)")
def test_a_short_soak_with_ldap_keeps_every_promise_while_slapd_fails() -> None:
    output = soak("ldap", 1500)
    assert "(ldap directory)" in output
    for fault in ("slapd stopped (SIGTERM) for a while", "slapd killed (SIGKILL) and started",
                  "slapd hung (SIGSTOP) for a while",
                  "killed while slapd was down: refused to start, started once LDAP was mended",
                  "killed while the ACLs hid the records: refused to start"):
        assert fault in output, output
