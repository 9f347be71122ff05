"""monitoring/ is sound and matches docs/metrics.md: the alert rules pass ``promtool check
rules``, every unit test passes ``promtool test rules`` and each alert has one that fires and
one that must not, the example scrape configuration with the rule file passes ``promtool check
config``, and every metric name and label value the rules and the Grafana dashboard use is
the one docs/metrics.md defines.

promtool comes from Debian's ``prometheus`` package (the Makefile's DEBIAN_PACKAGES). This is a
system test (not in conftest.py's IN_PROCESS): it runs promtool.

``promtool check metrics`` on live scrapes is in tests/test_metrics_daemons.py (policyd, milter)
and tests/test_metrics_events.py (keyrelay-events).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyrelay.decisions import Reason

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "monitoring" / "prometheus"
RULES = PROM / "keyrelay.rules.yml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.test.yml"))
SCRAPE = PROM / "scrape.example.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "keyrelay.json"
DOC = ROOT / "docs" / "metrics.md"

# The closed label value sets docs/metrics.md gives (each value is also checked to be on that
# page); `reason` is the engine's catalogue, checked against keyrelay.decisions.Reason.
LABEL_VALUES = {
    # auth attempts; reloads: the first two; keyrelay-events' webhook events and log lines
    "result": {"success", "failure", "tempfail", "delivered", "given_up", "no_webhook", "used",
               "ignored", "malformed"},
    "kind": {"address", "key"},
    "stage": {"CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY",
              "ETRN", "other"},
    "action": {"allow", "refuse", "tempfail"},
    "outcome": {"signed", "refused", "tempfail", "monitor_allowed"},
    "algorithm": {"rsa-sha256", "ed25519-sha256"},
    "service": {"auth", "policy", "socketmap", "milter"},
    "state": {"pending", "verified", "failing"},
    "window": {"minute", "hour", "day", "month"},
    # keyrelay-events (keyrelay/events/metrics.py)
    "event": {"processed", "delivered", "deferred", "bounce", "dropped", "paused",
              "would_pause"},
    "mode": {"pause", "monitor"},
    "cause": {"forgotten", "evicted", "unattributed", "rotation_lost", "partial_line",
              "journal_entry"},
}
# labels that are not keyrelay's closed sets: Prometheus's own, and the scrape's
FREE_LABELS = {"job", "instance", "node", "le", "account", "version", "python_version"}

MATCHER = re.compile(r'\b([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
METRIC = re.compile(r"\b((?:keyrelay|process|python)_[a-z0-9_]+)")


@pytest.fixture(scope="module")
def promtool() -> Iterator[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing (make test installs Debian's prometheus package)")
    yield found


def run(promtool: str, *args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [target["expr"] for panel in data["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in data["templating"]["list"] if "definition" in var]
    return exprs


def documented_metrics() -> set[str]:
    """The names in the first column of docs/metrics.md's "## Metrics" table."""
    section = DOC.read_text(encoding="utf-8").split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))


def histogram_base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in documented_metrics():
            return name.removesuffix(suffix)
    return name


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^a-z0-9_ -]", "", heading.strip().lower()).replace(" ", "-")


# -- promtool ----------------------------------------------------------------------------------
def test_rules_pass_promtool_check_rules(promtool: str) -> None:
    done = run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=lambda p: p.name)
def test_rule_unit_test_passes(promtool: str, unit_test: Path) -> None:
    done = run(promtool, "test", "rules", unit_test.name, cwd=unit_test.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "FAILED" not in done.stdout


def test_scrape_example_with_the_rules_passes_promtool_check_config(
        promtool: str, tmp_path: Path) -> None:
    """The example as shipped, next to the rule file, as an admin would lay them out."""
    text = SCRAPE.read_text(encoding="utf-8")
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "shipped.yml").write_text(text, encoding="utf-8")
    loaded = yaml.safe_load(text)
    assert loaded["rule_files"] == [RULES.name]
    done = run(promtool, "check", "config", "shipped.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, done.stdout
    jobs = [job["job_name"] for job in loaded["scrape_configs"]]
    assert jobs == ["keyrelay-policyd", "keyrelay-milter", "keyrelay-events"]


# -- every alert tested, documented ------------------------------------------------------------
def unit_test_expectations() -> dict[str, tuple[bool, bool]]:
    """alertname -> (some evaluation expects it firing, some expects it not firing)."""
    seen: dict[str, tuple[bool, bool]] = {}
    for path in UNIT_TESTS:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert data["rule_files"] == ["../keyrelay.rules.yml"], path
        for case in data["tests"]:
            for check in case.get("alert_rule_test", []):
                fires, quiet = seen.get(check["alertname"], (False, False))
                if check.get("exp_alerts"):
                    fires = True
                else:
                    quiet = True
                seen[check["alertname"]] = (fires, quiet)
    return seen


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    seen = unit_test_expectations()
    names = [rule["alert"] for rule in rules()]
    assert names == ["KeyrelayBruteForceWave", "KeyrelayAuthFailureRatioHigh",
                     "KeyrelayTemporaryAnswers", "KeyrelayDirectoryStale",
                     "KeyrelayDomainFailing", "KeyrelayMilterLatencyHigh",
                     "KeyrelaySubuserPaused", "KeyrelayWebhookEventsGivenUp",
                     "KeyrelayEventsFallingBehind", "KeyrelayDaemonDown"]
    for name in names:
        assert seen.get(name) == (True, True), f"{name}: needs an evaluation that fires and " \
            "one that must not"
    assert set(seen) <= set(names), "a unit test names an alert the rules do not have"


@pytest.mark.parametrize("rule", rules(), ids=lambda r: str(r["alert"]))
def test_alert_is_documented_and_its_runbook_is_its_section(rule: dict[str, Any]) -> None:
    alerts = DOC.read_text(encoding="utf-8").split("\n## Alerts\n", 1)[1]
    headings = re.findall(r"^### (.+)$", alerts, re.M)
    assert rule["alert"] in headings
    assert rule["annotations"]["runbook_url"] == f"docs/metrics.md#{slug(rule['alert'])}"
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["for"] and {"summary", "description"} <= set(rule["annotations"])


def test_every_anchor_the_doc_links_to_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    anchors = {slug(h.replace("`", "")) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, anchor


# -- names and labels --------------------------------------------------------------------------
def test_the_doc_table_has_the_issues_metrics() -> None:
    assert documented_metrics() >= {
        "keyrelay_auth_attempts_total", "keyrelay_lockouts_total", "keyrelay_lockouts_active",
        "keyrelay_policy_decisions_total", "keyrelay_messages_total",
        "keyrelay_dkim_signatures_total", "keyrelay_request_duration_seconds",
        "keyrelay_directory_age_seconds", "keyrelay_directory_reloads_total",
        "keyrelay_directory_keys", "keyrelay_domains", "keyrelay_rate_limited_total",
        "keyrelay_quota_refusals_total", "keyrelay_build_info",
        # keyrelay-events (issue 25: a pause is told through a metric, among others)
        "keyrelay_events_total", "keyrelay_webhook_events_total",
        "keyrelay_reputation_pauses_total", "keyrelay_webhook_events_pending",
        "keyrelay_events_maillog_lag_bytes"}


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_used_is_documented(source: str) -> None:
    exprs = [r["expr"] for r in rules()] if source == "rules" else dashboard_exprs()
    used = {histogram_base(m) for e in exprs for m in METRIC.findall(e)}
    assert {m for m in used if m.startswith("keyrelay_")}, "no keyrelay metric found"
    table, text = documented_metrics(), DOC.read_text(encoding="utf-8")
    for name in used:
        if name.startswith("keyrelay_"):
            assert name in table, f"{name} is not in docs/metrics.md's table"
        else:
            assert f"`{name}`" in text, f"{name} is not named in docs/metrics.md"


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_label_value_used_is_documented(source: str) -> None:
    exprs = [r["expr"] for r in rules()] if source == "rules" else dashboard_exprs()
    text = DOC.read_text(encoding="utf-8")
    reasons = {str(r) for r in Reason}
    checked = 0
    for expr in exprs:
        for label, op, value in MATCHER.findall(expr):
            if label in FREE_LABELS or label == "__name__" or value in {".*", "$node"}:
                continue
            values = value.split("|") if op in {"=~", "!~"} else [value]
            allowed = reasons if label == "reason" else LABEL_VALUES.get(label)
            assert allowed is not None, f"label {label} is not one docs/metrics.md defines"
            for one in values:
                assert one in allowed, f"{label}={one!r} ({expr})"
                assert f"`{one}`" in text, f"{label} value {one!r} not in docs/metrics.md"
                checked += 1
    assert checked > 5


def test_documented_label_values_are_the_domain_model_and_engine_ones() -> None:
    """The states, algorithms and actions the doc promises are the code's own values."""
    from keyrelay.decisions.quotas import SPANS
    from keyrelay.decisions.verdict import Action
    from keyrelay.directory.model import Algorithm, DomainState

    assert LABEL_VALUES["state"] == {str(s) for s in DomainState}
    assert LABEL_VALUES["algorithm"] == {str(a) for a in Algorithm}
    # "pass" is the auth service's hand-over to the site's Dovecot (coexistence), never a
    # policy decision's action: the site's answer is counted as auth success or failure
    assert LABEL_VALUES["action"] == {str(a) for a in Action} - {str(Action.PASS)}
    assert LABEL_VALUES["window"] == set(SPANS.values())
    # keyrelay-events' closed sets, as keyrelay/events/metrics.py exports them
    from keyrelay.events import metrics as events

    assert LABEL_VALUES["event"] == set(events.EVENTS)
    assert LABEL_VALUES["mode"] == set(events.PAUSE_MODES.values())
    assert LABEL_VALUES["cause"] == set(events.STATE_CAUSES) | set(events.GAP_CAUSES.values())
    assert set(events.WEBHOOK_RESULTS) | set(events.LINE_RESULTS) <= LABEL_VALUES["result"]


# -- the dashboard -----------------------------------------------------------------------------
def test_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    rows = [p["title"] for p in data["panels"] if p["type"] == "row"]
    for service in ("Auth", "Policy", "Milter", "Directory", "Counters", "Events"):
        assert any(title.startswith(service) for title in rows), service
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in data["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    heatmaps = {t["expr"] for p in data["panels"] if p["type"] == "heatmap"
                for t in p["targets"]}
    for service in LABEL_VALUES["service"]:
        assert any(f'service="{service}"' in e for e in heatmaps), f"no heatmap of {service}"
    assert any("topk" in e and "account" in e for e in dashboard_exprs()), "no top accounts"
