"""``keyrelay postfix show|apply``: keyrelay's settings merged into a real Postfix configuration.

The unit tests cover list splitting and merging and endpoint rendering. The rest run the real
``keyrelay`` command and the real ``postconf``/``postfix check`` on a copy of the main.cf and
master.cf a Debian Postfix installs, with a site's own milter, restrictions and submission
service in it: merged not overwritten, unrelated settings untouched, a second run changes
nothing, a failing ``postfix check`` leaves both files as they were.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest
from test_postfix_tls import write_key_pair

from keyrelay import postfixconf
from keyrelay.config import default_config, parse_config
from keyrelay.directory.model import Pool
from keyrelay.postfixconf import (
    Current,
    PostfixConfError,
    build_plan,
    merge_header_checks,
    merge_milters,
    merge_restrictions,
    postfix_endpoint,
    sasl_path,
    split_list,
)
from testkit.policyd import KEYRELAY

DEBIAN = Path("/usr/share/postfix")
ROOT = Path(__file__).resolve().parent.parent
needs_postfix = pytest.mark.skipif(
    not (DEBIAN / "master.cf.dist").exists() or not Path("/usr/sbin/postconf").exists(),
    reason="Postfix is not installed (make test installs it)",
)


# -- lists and endpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("text, items", [
    ("", []),
    ("a, b c,d", ["a", "b", "c", "d"]),
    ("  permit_mynetworks,\n    reject ", ["permit_mynetworks", "reject"]),
    # as Postfix reads it: a restriction and its { } argument are two list items
    ("check_policy_service { inet:h:1,  timeout=10s }, reject",
     ["check_policy_service", "{ inet:h:1, timeout=10s }", "reject"]),
    ("x { a, { b = c d }, e } y", ["x", "{ a, { b = c d }, e }", "y"]),
    ("${{$compatibility_level} <level {1} ? {} : {permit_mynetworks, reject}}, z",
     ["${{$compatibility_level} <level {1} ? {} : {permit_mynetworks, reject}}", "z"]),
    ("$mua_relay_restrictions", ["$mua_relay_restrictions"]),
])
def test_split_list_keeps_brace_groups_whole(text: str, items: list[str]) -> None:
    assert split_list(text) == items


def test_merge_restrictions_puts_the_policy_first_and_keeps_the_rest_in_order() -> None:
    base = ["permit_mynetworks", "$keyrelay_x_policy", "reject_unauth_destination"]
    merged = merge_restrictions(base, "$keyrelay_x_policy")
    assert merged == ["$keyrelay_x_policy", "permit_sasl_authenticated", "permit_mynetworks",
                      "reject_unauth_destination"]
    assert merge_restrictions(merged, "$keyrelay_x_policy") == merged  # idempotent
    assert merge_restrictions(["permit_sasl_authenticated", "reject"], "$p") == [
        "$p", "permit_sasl_authenticated", "reject"]
    assert merge_restrictions([], "$p", add_permit=False) == ["$p"]


def test_merge_header_checks_adds_keyrelays_table_last_once_and_keeps_the_sites_text() -> None:
    ref = "$keyrelay_dkim_header_checks"
    assert merge_header_checks("") == ref
    site = "regexp:{{/^X-A:  two/ INFO a}, {/^X-B:/ WARN b}}, pcre:/etc/postfix/mhc"
    assert merge_header_checks(site) == f"{site}, {ref}"
    assert merge_header_checks(f"{site}, {ref}") == f"{site}, {ref}"
    assert merge_header_checks(f"pcre:/a {ref} hash:/b") == f"pcre:/a {ref} hash:/b"


def test_merge_milters_appends_keyrelays_milter_last_once() -> None:
    assert merge_milters(["inet:127.0.0.1:11332"], "$keyrelay_milter") == [
        "inet:127.0.0.1:11332", "$keyrelay_milter"]
    assert merge_milters(["$keyrelay_milter", "inet:a:1"], "$keyrelay_milter") == [
        "inet:a:1", "$keyrelay_milter"]


@pytest.mark.parametrize("listen, postfix", [
    ("unix:/var/spool/postfix/private/keyrelay-policy", "unix:private/keyrelay-policy"),
    ("unix:/var/spool/postfix/../postfix/private/x", "unix:private/x"),
    ("unix:/run/keyrelay/policy.sock", "unix:/run/keyrelay/policy.sock"),
    ("unix:/var/spool/postfixother/x", "unix:/var/spool/postfixother/x"),
    ("inet:127.0.0.1:10040", "inet:127.0.0.1:10040"),
    ("inet:[::1]:10040", "inet:[::1]:10040"),
    ("inet:8891@127.0.0.1", "inet:127.0.0.1:8891"),
    ("inet6:8891@::1", "inet:[::1]:8891"),
])
def test_endpoints_in_postfix_notation(listen: str, postfix: str) -> None:
    assert postfix_endpoint(listen, "/var/spool/postfix") == postfix


def test_sasl_path_is_a_bare_path_for_unix_sockets() -> None:
    assert sasl_path("unix:/var/spool/postfix/private/keyrelay-auth",
                     "/var/spool/postfix") == "private/keyrelay-auth"
    assert sasl_path("inet:127.0.0.1:12345", "/var/spool/postfix") == "inet:127.0.0.1:12345"


# -- the plan --------------------------------------------------------------------------------
def _pool(name: str, *addresses: str, helo: str = "o1.example.net") -> Pool:
    return Pool(name=name, bind=tuple(ipaddress.ip_address(a) for a in addresses), helo=helo)


def test_plan_has_one_transport_per_pool_with_bind_addresses_and_helo() -> None:
    current = postfixconf.fresh_postfix()
    plan = build_plan(default_config(), [_pool("b", "2001:db8::5"),
                                         _pool("a", "192.0.2.10", "192.0.2.11", "2001:db8::1")],
                      current)
    pools = {s.key: s for s in plan.services if s.command == "smtp"}
    assert list(pools) == ["kr-pool-a/unix", "kr-pool-b/unix"]
    assert pools["kr-pool-a/unix"].settings == {
        "syslog_name": "postfix/kr-pool-a", "smtp_helo_name": "o1.example.net",
        "smtp_bind_address_enforce": "yes", "smtp_bind_address": "192.0.2.10",
        "smtp_bind_address6": "2001:db8::1"}
    assert pools["kr-pool-b/unix"].remove == ("smtp_bind_address",)
    assert any("pool a" in note and "192.0.2.11" in note for note in plan.notes)


def test_plan_drops_transports_of_pools_that_are_gone_and_nothing_else() -> None:
    current = postfixconf.fresh_postfix()
    current.services = {"kr-pool-old/unix": {}, "kr-pool-a/unix": {}, "smtp/unix": {},
                        "kr-pool-inet/inet": {}}
    plan = build_plan(default_config(), [_pool("a", "192.0.2.10")], current)
    assert plan.drop_services == ["kr-pool-old/unix"]


def test_role_lists_keep_every_argument_of_the_sites_restrictions() -> None:
    site = "check_client_access hash:/a, check_sender_access hash:/a, reject"
    current = postfixconf.fresh_postfix()
    current.services = {"submission/inet": {}, "2525/inet": {}}
    current.settings = {key: {"smtpd_relay_restrictions": site} for key in current.services}
    plan = build_plan(default_config(), [], current)
    merged = split_list(plan.main["keyrelay_submission_relay_restrictions"])
    assert merged == ["$keyrelay_submission_policy", "permit_sasl_authenticated",
                      *split_list(site)]


def test_the_dkim_table_needs_inline_tables_postfix_3_7() -> None:
    current = postfixconf.fresh_postfix()
    current.effective["mail_version"] = "3.7.11"
    plan = build_plan(default_config(), [], current)
    assert plan.main["milter_header_checks"] == "$keyrelay_dkim_header_checks"
    current.effective["mail_version"] = "3.5.18"  # Debian 11
    plan = build_plan(default_config(), [], current)
    assert "milter_header_checks" not in plan.main
    assert "keyrelay_dkim_header_checks" not in plan.main
    assert any("Postfix 3.5.18 has no inline tables" in note for note in plan.notes)


def test_plan_refuses_without_a_tls_certificate() -> None:
    with pytest.raises(PostfixConfError, match="no TLS certificate"):
        build_plan(default_config(), [], Current(effective={"queue_directory": "/q"}))


def test_plan_refuses_sockets_a_chrooted_service_cannot_reach() -> None:
    current = postfixconf.fresh_postfix()
    current.services = {"submission/inet": {"chroot": "y"}}
    config = parse_config({"policyd": {"policy_listen": "unix:/run/keyrelay/policy"}}, "k.yaml")
    with pytest.raises(PostfixConfError, match=r"submission/inet is chrooted.*unix:/run/keyrelay"):
        build_plan(config, [], current)


def test_policyd_md_shows_lines_postfix_show_prints() -> None:
    # docs/policyd.md, "Wiring it into Postfix", shows part of what apply writes: verbatim
    section = (ROOT / "docs" / "policyd.md").read_text().split(
        "## Wiring it into Postfix\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    plan = build_plan(default_config(), [], postfixconf.fresh_postfix())
    shown = (postfixconf.render_main(plan) + postfixconf.render_master(plan)).splitlines()
    lines = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(lines) >= 8
    for line in lines:
        assert line in shown, f"docs/policyd.md shows {line!r}, which postfix show does not print"


def test_postfix_conf_fragments_are_generated_from_the_module() -> None:
    for name, content in postfixconf.example_files().items():
        assert (ROOT / "postfix-conf" / name).read_text() == content, (
            f"postfix-conf/{name} is stale: run `python -m keyrelay.postfixconf`")


# -- against a real Postfix configuration ----------------------------------------------------
SITE_MAIN = {
    "smtpd_milters": "inet:127.0.0.1:11332",
    "mua_relay_restrictions": "permit_sasl_authenticated, reject",
    "myhostname": "mx.site.example",
    # a site's own table, inline, with two spaces in a pattern: kept byte for byte
    "milter_header_checks": "regexp:{{/^X-Spam-Flag:  YES/ FILTER smtp:[spam.site.example]}}",
}
SITE_SUBMISSION = [
    "submission inet n - y - - smtpd",
    "  -o syslog_name=postfix/site-submission",
    "  -o smtpd_relay_restrictions=$mua_relay_restrictions",
    "  -o smtpd_client_connection_count_limit=20",
]


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    """(Postfix config dir, keyrelay config) for a site as Debian installs it, plus its own
    milter, restrictions and submission service; keyrelay's sockets under its queue."""
    etc, queue, data = tmp_path / "etc", tmp_path / "queue", tmp_path / "data"
    for folder in (etc, queue, data):
        folder.mkdir()
    main = (DEBIAN / "main.cf.debian").read_text() + (DEBIAN / "main.cf.tls").read_text()
    main += f"queue_directory = {queue}\ndata_directory = {data}\n"
    # Debian's main.cf.tls names the snakeoil files, which a host may not have: a real pair
    key, cert = write_key_pair(tmp_path / "tls", "mx.site.example")
    main += f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
    main += "".join(f"{k} = {v}\n" for k, v in SITE_MAIN.items())
    (etc / "main.cf").write_text(main)
    (etc / "master.cf").write_text((DEBIAN / "master.cf.dist").read_text()
                                   + "\n".join(SITE_SUBMISSION) + "\n")
    config = tmp_path / "keyrelay.yaml"
    config.write_text(
        f"directory: {{path: {tmp_path}/directory.yaml}}\n"
        f"dkim: {{key_dir: {tmp_path}/dkim}}\n"
        f"logging: {{audit_log: {tmp_path}/audit.log}}\n"
        "policyd:\n"
        f"  auth_listen: unix:{queue}/private/keyrelay-auth\n"
        f"  policy_listen: unix:{queue}/private/keyrelay-policy\n"
        f"  socketmap_listen: unix:{queue}/private/keyrelay-socketmap\n"
        f"milter: {{listen: 'unix:{queue}/private/keyrelay-milter'}}\n"
    )
    return etc, config


def keyrelay(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(KEYRELAY), "--config", str(config), *args],
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def postconf(etc: Path, *args: str) -> dict[str, str]:
    out = subprocess.run(["postconf", "-c", str(etc), *args], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)


@needs_postfix
def test_apply_merges_into_the_sites_configuration(site: tuple[Path, Path]) -> None:
    etc, config = site
    keyrelay(config, "pool", "add", "p1", "--bind", "192.0.2.10", "--helo", "o1.example.net")
    main_before, fields_before = postconf(etc, "-n"), postconf(etc, "-F")
    params_before = postconf(etc, "-P")
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc))
    assert "postfix check passed before and after them" in result.stdout
    main, fields, params = postconf(etc, "-n"), postconf(etc, "-F"), postconf(etc, "-P")

    # main.cf: every setting the site had is still there
    added = set(main) - set(main_before)
    assert added == {n for n in added if n.startswith("keyrelay_")} | {
        "disable_mime_output_conversion"}
    # milter_header_checks: the site's table, then keyrelay's (the DKIM domain in the log)
    for name, value in main_before.items():
        if name != "milter_header_checks":
            assert main[name] == value, name
    # (read from the file: postconf prints values with their inner spaces collapsed)
    assert ("milter_header_checks = " + SITE_MAIN["milter_header_checks"]
            + ", $keyrelay_dkim_header_checks\n") in (etc / "main.cf").read_text()
    assert main["keyrelay_dkim_header_checks"] == postfixconf.DKIM_HEADER_CHECKS
    # the site's milter stays, keyrelay's comes last; its own submission restrictions too
    assert main["keyrelay_submission_milters"] == "inet:127.0.0.1:11332, $keyrelay_milter"
    assert main["keyrelay_submission_relay_restrictions"] == (
        "$keyrelay_submission_policy, permit_sasl_authenticated, $mua_relay_restrictions")
    assert main["keyrelay_submission_policy"].startswith(
        "check_policy_service { unix:private/keyrelay-policy, timeout=10s, "
        "{ default_action = 451 4.3.0 ")
    # master.cf: other services untouched; the site's submission keeps its own -o settings
    for name, value in fields_before.items():
        if not name.startswith(("submission/", "smtp/inet/")) or not name.endswith("/command"):
            assert fields[name] == value, name
    assert params["submission/inet/syslog_name"] == "postfix/site-submission"
    assert params["submission/inet/smtpd_client_connection_count_limit"] == "20"
    assert params["submission/inet/smtpd_relay_restrictions"] == (
        "$keyrelay_submission_relay_restrictions")
    assert params["submissions/inet/smtpd_tls_wrappermode"] == "yes"
    assert params["2525/inet/smtpd_tls_security_level"] == "encrypt"
    assert params["smtp/inet/smtpd_tls_security_level"] == "may"
    assert params["kr-pool-p1/unix/smtp_bind_address"] == "192.0.2.10"
    assert params["kr-pool-p1/unix/smtp_bind_address_enforce"] == "yes"
    for name, value in params_before.items():
        assert params[name] == value or name == "submission/inet/smtpd_relay_restrictions"
    # port 25 keeps Debian's permit_mynetworks, and apply says what that means
    assert "permit_mynetworks" in main["keyrelay_smtp_relay_restrictions"]
    assert "relay without an API key" in result.stderr


@needs_postfix
def test_a_multi_line_milter_header_checks_is_extended_with_a_note(
        site: tuple[Path, Path]) -> None:
    etc, config = site
    main = (etc / "main.cf").read_text().replace(
        "milter_header_checks = " + SITE_MAIN["milter_header_checks"] + "\n",
        "milter_header_checks = pcre:/etc/postfix/site_a,\n    pcre:/etc/postfix/site_b\n")
    (etc / "main.cf").write_text(main)
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc))
    assert "milter_header_checks spans several lines in main.cf" in result.stderr
    assert postconf(etc, "-n")["milter_header_checks"] == (
        "pcre:/etc/postfix/site_a, pcre:/etc/postfix/site_b, $keyrelay_dkim_header_checks")
    again = keyrelay(config, "postfix", "apply", "--config-dir", str(etc))
    assert "milter_header_checks spans" not in again.stderr  # one line now, as written


@needs_postfix
def test_a_second_apply_changes_nothing(site: tuple[Path, Path]) -> None:
    etc, config = site
    keyrelay(config, "postfix", "apply", "--config-dir", str(etc))
    before = [(etc / n).read_bytes() for n in ("main.cf", "master.cf")]
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc))
    assert "already in place; nothing changed" in result.stdout
    assert [(etc / n).read_bytes() for n in ("main.cf", "master.cf")] == before


@needs_postfix
def test_dry_run_lists_the_changes_and_makes_none(site: tuple[Path, Path]) -> None:
    etc, config = site
    before = [(etc / n).read_bytes() for n in ("main.cf", "master.cf")]
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc), "--dry-run")
    assert "would make" in result.stdout
    assert "master.cf: new service 2525 inet n - n - - smtpd" in result.stdout
    assert [(etc / n).read_bytes() for n in ("main.cf", "master.cf")] == before


@needs_postfix
def test_a_removed_pool_loses_its_transport(site: tuple[Path, Path]) -> None:
    etc, config = site
    keyrelay(config, "pool", "add", "gone", "--bind", "192.0.2.20", "--helo", "o2.example.net")
    keyrelay(config, "postfix", "apply", "--config-dir", str(etc))
    assert "kr-pool-gone/unix/service" in postconf(etc, "-F")
    keyrelay(config, "pool", "remove", "gone")
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc))
    assert "remove kr-pool-gone/unix (its pool is gone)" in result.stdout
    assert "kr-pool-gone/unix/service" not in postconf(etc, "-F")


@needs_postfix
def test_a_site_that_already_fails_postfix_check_is_told_so_and_nothing_changes(
    site: tuple[Path, Path],
) -> None:
    # issue 20 item 11: the site's own fault, not blamed on keyrelay's edits
    etc, config = site
    subprocess.run(["postconf", "-c", str(etc), "-e", "mail_owner = nosuchuser"], check=True)
    before = [(etc / n).read_bytes() for n in ("main.cf", "master.cf")]
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc), check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert ("the site's Postfix configuration fails postfix check before keyrelay changed "
            "anything (fix that first; nothing was changed)") in result.stderr
    assert "mail_owner: unknown user name value: nosuchuser" in result.stderr
    assert [(etc / n).read_bytes() for n in ("main.cf", "master.cf")] == before


@needs_postfix
def test_an_edit_that_fails_postfix_check_is_put_back_and_said_to_be_ours(
    site: tuple[Path, Path],
) -> None:
    etc, _ = site
    before = [(etc / n).read_bytes() for n in ("main.cf", "master.cf")]
    breaking = postfixconf.Change("main.cf: mail_owner = nosuchuser",
                                  ("-e", "mail_owner = nosuchuser"))
    with pytest.raises(PostfixConfError) as failed:
        postfixconf.apply(etc, [breaking])
    assert str(failed.value).startswith(
        "postfix check failed after keyrelay's changes; main.cf and master.cf are put back as "
        "they were: ")
    assert "mail_owner: unknown user name value: nosuchuser" in str(failed.value)
    assert [(etc / n).read_bytes() for n in ("main.cf", "master.cf")] == before


@needs_postfix
def test_a_missing_certificate_file_is_refused_naming_the_setting_and_file(
    site: tuple[Path, Path],
) -> None:
    # issue 20 item 10: Debian's main.cf.tls names snakeoil files this host may not have
    etc, config = site
    missing = etc.parent / "tls" / "ssl-cert-snakeoil.pem"
    subprocess.run(["postconf", "-c", str(etc), "-e", f"smtpd_tls_cert_file = {missing}"],
                   check=True)
    before = [(etc / n).read_bytes() for n in ("main.cf", "master.cf")]
    for extra in ([], ["--dry-run"]):
        result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc), *extra,
                          check=False)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"TLS certificate: smtpd_tls_cert_file: {missing}: no such file" in result.stderr
    assert [(etc / n).read_bytes() for n in ("main.cf", "master.cf")] == before


@needs_postfix
def test_a_key_of_another_certificate_is_refused(site: tuple[Path, Path]) -> None:
    etc, config = site
    other_key, _ = write_key_pair(etc.parent / "other", "other.example")
    subprocess.run(["postconf", "-c", str(etc), "-e", f"smtpd_tls_key_file = {other_key}"],
                   check=True)
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc), check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert (f"smtpd_tls_key_file = {other_key} does not belong to smtpd_tls_cert_file = "
            in result.stderr)


@needs_postfix
def test_chain_files_from_the_keyrelay_configuration_are_checked(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    key, _ = write_key_pair(etc.parent / "a", "a.example")
    _, cert = write_key_pair(etc.parent / "b", "b.example")
    with config.open("a") as handle:
        handle.write(f"postfix: {{tls_chain_files: '{key}, {cert}'}}\n")
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc), check=False)
    assert result.returncode == 1
    assert (f"TLS certificate: postfix.tls_chain_files (smtpd_tls_chain_files): the private key "
            f"in {key} does not belong to the certificate in {cert}") in result.stderr


@needs_postfix
def test_only_master_cf_missing_is_named_alone(site: tuple[Path, Path]) -> None:
    etc, config = site
    (etc / "master.cf").unlink()
    result = keyrelay(config, "postfix", "apply", "--config-dir", str(etc), check=False)
    assert result.returncode == 1
    assert f"{etc}: no master.cf there" in result.stderr
    assert "main.cf" not in result.stderr.replace("master.cf", "")


@needs_postfix
def test_show_prints_what_apply_would_write_and_changes_nothing(site: tuple[Path, Path]) -> None:
    etc, config = site
    before = [(etc / n).read_bytes() for n in ("main.cf", "master.cf")]
    shown = keyrelay(config, "postfix", "show", "--config-dir", str(etc)).stdout
    assert "keyrelay_submission_milters = inet:127.0.0.1:11332, $keyrelay_milter" in shown
    # the site's submission entry is shown as it is (chroot y), the new ones with chroot n
    assert "submission inet n - y - - smtpd" in shown
    assert "2525 inet n - n - - smtpd" in shown
    assert [(etc / n).read_bytes() for n in ("main.cf", "master.cf")] == before


def test_apply_without_config_dir_uses_postfix_config_dir(tmp_path: Path) -> None:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n"
                      f"postfix: {{config_dir: {tmp_path}/pf}}\n")
    result = keyrelay(config, "postfix", "apply", check=False)
    assert result.returncode == 1
    assert f"{tmp_path}/pf: no main.cf and no master.cf there" in result.stderr
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n"
                      "postfix: {config_dir: ''}\n")
    result = keyrelay(config, "postfix", "apply", check=False)
    assert result.returncode == 1
    assert "give --config-dir DIR: postfix.config_dir is empty" in result.stderr


def test_show_json_is_what_show_prints(tmp_path: Path) -> None:
    # docs/cli.md: every listing, show included, takes --json
    config = tmp_path / "keyrelay.yaml"
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n"
                      f"logging: {{audit_log: ''}}\n")
    keyrelay(config, "pool", "add", "p1", "--bind", "192.0.2.10", "--helo", "o1.example.net")
    shown = json.loads(keyrelay(config, "postfix", "show", "--json").stdout)
    text = keyrelay(config, "postfix", "show").stdout
    assert shown["main"]["keyrelay_sasl_path"] == "private/keyrelay-auth"
    for name, value in shown["main"].items():
        assert f"{name} = {value}\n" in text
    services = {s["service"]: s for s in shown["master"]}
    assert services["kr-pool-p1"]["settings"]["smtp_bind_address"] == "192.0.2.10"
    assert services["kr-pool-p1"]["entry"] == "kr-pool-p1 unix - - n - - smtp"
    assert services["submissions"]["settings"]["smtpd_tls_wrappermode"] == "yes"
    for service in shown["master"]:
        assert service["entry"] + "\n" in text
    assert shown["drop_services"] == []


def test_show_without_a_config_dir_prints_the_fragment(tmp_path: Path) -> None:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n"
                      f"logging: {{audit_log: ''}}\n")
    shown = keyrelay(config, "postfix", "show").stdout
    assert "keyrelay_sasl_path = private/keyrelay-auth" in shown
    assert "submissions inet n - n - - smtpd" in shown
    assert "  -o smtpd_tls_wrappermode=yes" in shown


@pytest.mark.parametrize("args, message", [
    (["apply", "--config-dir", "/nonexistent"],
     "/nonexistent: no main.cf and no master.cf there"),
    (["show", "--json", "--config-dir", "/nonexistent"],
     "/nonexistent: no main.cf and no master.cf there"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_invocations_get_one_clear_line(tmp_path: Path, args: list[str],
                                            message: str) -> None:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n")
    result = keyrelay(config, "postfix", *args, check=False)
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
