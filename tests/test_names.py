"""Normal forms of names: principals, domains (IDNA), addresses and IP networks."""

from __future__ import annotations

import ipaddress

import pytest

from keyrelay import names
from keyrelay.errors import UserError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("::ffff:198.51.100.7", "198.51.100.7/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.1", "192.0.2.1/32"),
    ],
)
def test_network_normal_form_maps_ipv4_mapped_ipv6_to_ipv4(text: str, expected: str) -> None:
    assert names.network(text) == ipaddress.ip_network(expected)


def test_ipv4_mapped_rule_matches_the_client_address_as_postfix_reports_it() -> None:
    rule = names.network("::ffff:192.0.2.0/120")
    assert names.ip_address("::ffff:192.0.2.44") in rule
    assert names.ip_address("192.0.2.44") in rule


def test_network_with_host_bits_suggests_the_network() -> None:
    with pytest.raises(UserError, match=r"host bits are set; did you mean 192\.0\.2\.0/24\?"):
        names.network("192.0.2.7/24")


@pytest.mark.parametrize("text", ["", "300.1.1.1", "10.0.0.0/33", "example.com", "::g"])
def test_bad_networks_are_user_errors(text: str) -> None:
    with pytest.raises(UserError, match="invalid CIDR"):
        names.network(text)


def test_domain_is_lowercased_idna_a_label_without_trailing_dot() -> None:
    assert names.domain("Bücher.Example.") == "xn--bcher-kva.example"


def test_address_lowercases_and_normalises_the_domain() -> None:
    assert names.address("App@Bücher.Example") == "app@xn--bcher-kva.example"


@pytest.mark.parametrize("text", ["no-at-sign", "@example.com", "a b@example.com", "x@localhost"])
def test_bad_addresses_are_user_errors(text: str) -> None:
    with pytest.raises(UserError, match="invalid"):
        names.address(text)
