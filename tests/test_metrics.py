"""The metrics' own logic, in process (keyrelay/metrics): the bounded ``account`` label, the
recorder's label values, the settings. The daemons' endpoints are tests/test_metrics_daemons.py.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from keyrelay.config import parse_config
from keyrelay.errors import ConfigError
from keyrelay.metrics.exposition import SELECTION_PERIOD, AccountBound
from keyrelay.metrics.recorder import BY_ACCOUNT, OUTCOMES, Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A registry with the per-account counter, as a process's recorder fills it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counter = Counter(BY_ACCOUNT, "by account", ("account", "outcome"),
                               registry=self.registry)

    def send(self, account: str, outcome: str = "signed", n: int = 1) -> None:
        self.counter.labels(account, outcome).inc(n)

    def collect(self) -> Any:
        return self.registry.collect()


def scrape(bound: AccountBound) -> dict[tuple[str, str], float]:
    (family,) = [f for f in bound.collect() if f.name == "keyrelay_messages"]
    return {(s.labels["account"], s.labels["outcome"]): s.value for s in family.samples}


def per_account(series: dict[tuple[str, str], float]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (account, _), value in series.items():
        totals[account] = totals.get(account, 0.0) + value
    return totals


def test_until_the_set_is_full_an_account_gets_its_series_when_first_seen() -> None:
    source, clock = Source(), Clock()
    bound = AccountBound(source, 2, clock)
    source.send("acme", n=3)
    source.send("beta")
    source.send("gamma", "refused", 5)
    series = scrape(bound)
    assert per_account(series) == {"acme": 3, "beta": 1, "other": 5}
    assert series[("other", "refused")] == 5
    # every outcome of a member and of other is a series, 0 included
    assert {o for (a, o) in series if a == "acme"} == set(OUTCOMES)
    assert len(series) == (2 + 1) * len(OUTCOMES)


def test_the_per_account_counter_is_never_exported_under_its_own_name() -> None:
    source = Source()
    source.send("acme")
    names = {family.name for family in AccountBound(source, 10).collect()}
    assert BY_ACCOUNT not in names
    assert "keyrelay_messages" in names


def test_every_hour_the_busiest_accounts_of_that_hour_take_the_series() -> None:
    source, clock = Source(), Clock()
    bound = AccountBound(source, 1, clock)
    source.send("early", n=100)
    assert per_account(scrape(bound)) == {"early": 100, "other": 0}
    clock.now += SELECTION_PERIOD
    assert per_account(scrape(bound)) == {"early": 100, "other": 0}  # the first hour's
    source.send("busy", n=10)  # busier than "early" in this hour
    source.send("early", n=2)
    assert per_account(scrape(bound)) == {"early": 102, "other": 10}
    clock.now += SELECTION_PERIOD
    series = per_account(scrape(bound))
    # "busy" joins at 0 (its counts so far were in "other"), "early" leaves: "other" keeps
    # what it had and no count moves between series
    assert series == {"busy": 0, "other": 10}
    source.send("early", n=4)
    source.send("busy", n=1)
    assert per_account(scrape(bound)) == {"busy": 1, "other": 14}


def test_no_series_ever_goes_down_and_the_sum_is_every_message_with_random_traffic() -> None:
    rng = random.Random(7)
    source, clock = Source(), Clock()
    bound = AccountBound(source, 5, clock)
    last: dict[tuple[str, str], float] = {}
    sent = 0
    for _ in range(200):
        for _ in range(rng.randrange(20)):
            source.send(f"t{rng.randrange(30)}", rng.choice(OUTCOMES))
            sent += 1
        if rng.random() < 0.2:
            clock.now += SELECTION_PERIOD
        series = scrape(bound)
        assert len({a for a, _ in series}) <= 5 + 1
        for key, value in series.items():
            if key[0] == "other" or key in last:
                # a series that goes on never decreases ("other" always goes on; an account
                # that left and came back starts a new series at 0, which Prometheus reads
                # as a new series, not as a drop)
                assert value >= last.get(key, 0.0) or value == 0.0, key
        last = series
        # what the series show, plus what those that left had shown, is every message
        assert sum(series.values()) + sum(bound.retired.values()) == sent


def test_ten_thousand_accounts_make_at_most_the_bound_of_series() -> None:
    source, clock = Source(), Clock()
    bound = AccountBound(source, 100, clock)
    for number in range(10_000):
        source.send(f"tenant{number}")
    series = scrape(bound)
    assert len(series) == (100 + 1) * len(OUTCOMES)
    assert sum(series.values()) == 10_000
    clock.now += SELECTION_PERIOD
    assert len(scrape(bound)) == (100 + 1) * len(OUTCOMES)


def test_top_accounts_zero_counts_everything_as_other() -> None:
    source = Source()
    source.send("acme", n=2)
    assert scrape(AccountBound(source, 0)) == {("other", o): (2 if o == "signed" else 0)
                                               for o in OUTCOMES}


def test_the_recorder_folds_unknown_stages_and_counts_only_its_daemons_metrics() -> None:
    registry = CollectorRegistry()
    policyd = Recorder("policyd", registry)
    policyd.policy("RCPT", "allow", "ok", 0.001)
    policyd.policy("XFORWARD", "allow", "stage_not_checked", None)
    policyd.policy("END-OF-MESSAGE", "tempfail", "rate_limited", 0.002, "minute")
    policyd.policy("END-OF-MESSAGE", "tempfail", "quota_exceeded", 0.002, "day")
    policyd.message("acme", "signed", 0.001, ("rsa-sha256",))  # the milter's: nothing
    text = _exposition(registry)
    assert 'keyrelay_policy_decisions_total{action="allow",reason="stage_not_checked",' \
        'stage="other"} 1.0' in text
    assert 'keyrelay_rate_limited_total{window="minute"} 1.0' in text
    assert 'keyrelay_quota_refusals_total{window="day"} 1.0' in text
    assert "keyrelay_dkim_signatures_total" not in text
    assert BY_ACCOUNT not in text
    assert 'service="milter"' not in text
    assert "keyrelay_build_info{" in text


def _exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    list(text_string_to_metric_families(text))  # parses as the text format
    return text


@pytest.mark.parametrize(("value", "error"), [
    ("9464", "metrics_listen"),
    ("127.0.0.1:0", "port must be 1 to 65535"),
    ("127.0.0.1:70000", "port must be 1 to 65535"),
    ("http://127.0.0.1:9464", "metrics_listen"),
])
def test_a_bad_metrics_listen_is_one_line_naming_the_key(value: str, error: str) -> None:
    for section in ("policyd", "milter"):
        with pytest.raises(ConfigError) as caught:
            parse_config({section: {"metrics_listen": value}}, "/etc/keyrelay/keyrelay.yaml")
        message = str(caught.value)
        assert "\n" not in message
        assert f"{section}.metrics_listen" in message
        assert error in message


def test_metrics_settings_accept_ipv6_and_a_bound_of_accounts() -> None:
    config = parse_config({"policyd": {"metrics_listen": "[::1]:9464"},
                           "milter": {"metrics_listen": "127.0.0.1:9465"},
                           "metrics": {"top_accounts": 5}}, "x.yaml")
    assert config.policyd.metrics_listen == "[::1]:9464"
    assert config.metrics.top_accounts == 5
    with pytest.raises(ConfigError, match=r"metrics\.top_accounts"):
        parse_config({"metrics": {"top_accounts": -1}}, "x.yaml")
