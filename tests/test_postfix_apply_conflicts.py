"""``keyrelay postfix apply`` beside a site's own SASL set-up (issue 24, section 3).

A site that logs its mailbox users in through its own Dovecot on the services keyrelay takes
over, binds logins to senders with ``smtpd_sender_login_maps`` and refuses the rest with a
``reject_*sender_login_mismatch`` restriction: each of these is refused with its own line
and main.cf and master.cf stay byte for byte as they were; ``--replace-site-sasl`` replaces
them on those services only, says which, and ``postfix check`` passes; keyrelay's own values
are not conflicts, so a second run changes nothing. All against the real ``postconf`` and
``postfix check`` on the Debian-shaped site of tests/test_postfixconf.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_postfixconf import keyrelay, needs_postfix, postconf
from test_postfixconf import site as site  # the fixture: a Debian Postfix plus a site's own

from keyrelay.config import parse_config
from keyrelay.postfixconf import Current, build_plan
from keyrelay.postfixsasl import Conflict, find

pytestmark = needs_postfix
FILES = ("main.cf", "master.cf")


def _edit(etc: Path, main: dict[str, str], submission: dict[str, str]) -> None:
    """The site's own settings: main.cf parameters and -o settings of its submission."""
    for name, value in main.items():
        subprocess.run(["postconf", "-c", str(etc), "-e", f"{name} = {value}"], check=True)
    for name, value in submission.items():
        subprocess.run(["postconf", "-c", str(etc), "-P", f"submission/inet/{name}={value}"],
                       check=True)


def _files(etc: Path) -> list[bytes]:
    return [(etc / name).read_bytes() for name in FILES]


def _params(etc: Path) -> dict[str, str]:
    """``postconf -P``, empty values included (``name =``)."""
    out = subprocess.run(["postconf", "-c", str(etc), "-P"], capture_output=True, text=True,
                         check=True).stdout
    return {name.strip(): value.strip() for name, _, value in
            (line.partition(" =") for line in out.splitlines())}


def _apply(config: Path, etc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return keyrelay(config, "postfix", "apply", "--config-dir", str(etc), *args, check=False)


def _dovecot_site(etc: Path) -> None:
    """The site of the issue: Dovecot SASL on submission, its own sender-login map and
    reject_sender_login_mismatch."""
    senders = etc / "senders"
    senders.write_text("alice@site.example alice\n")
    _edit(etc, {"smtpd_sasl_type": "dovecot", "smtpd_sasl_path": "private/auth",
                "smtpd_sender_login_maps": f"texthash:{senders}",
                "mua_sender_restrictions": "reject_sender_login_mismatch, permit"},
          {"smtpd_sasl_auth_enable": "yes",
           "smtpd_sender_restrictions": "$mua_sender_restrictions"})


MISMATCH_LINE = (
    "holds {found}: it checks keyrelay's logins against the site's sender-login map and "
    "refuses every keyrelay message (553 5.7.1 Sender address rejected: not owned by user); "
    "leave submission out of postfix.submission_services in the keyrelay configuration and "
    "keep the site's logins there, or rerun with --replace-site-sasl to let keyrelay take "
    "submission over and replace {found} in {parameter} there (or set "
    "auth.site_auth_socket to keep the site's Dovecot logins and sender rules beside "
    "keyrelay's, docs/coexistence.md)")


@pytest.mark.parametrize("main, submission, line", [
    ({"smtpd_sasl_type": "dovecot", "smtpd_sasl_path": "private/auth"},
     {"smtpd_sasl_auth_enable": "yes"},
     "submission/inet: smtpd_sasl_path = private/auth (main.cf) is the site's own SASL "
     "(smtpd_sasl_type = dovecot): keyrelay would point this service's logins at its own "
     "auth service and the site's users could no longer log in on it; leave submission out "
     "of postfix.submission_services in the keyrelay configuration"),
    ({}, {"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
          "smtpd_sasl_path": "inet:127.0.0.1:12345"},
     "submission/inet: smtpd_sasl_path = inet:127.0.0.1:12345 (master.cf -o) is the site's "
     "own SASL (smtpd_sasl_type = dovecot)"),
    ({}, {"smtpd_sasl_auth_enable": "yes"},  # Cyrus, as Debian's commented example has it
     "submission/inet: smtpd_sasl_path = smtpd (built-in default) is the site's own SASL "
     "(smtpd_sasl_type = cyrus)"),
    ({}, {"smtpd_sender_login_maps": "texthash:/etc/postfix/senders"},
     "submission/inet: smtpd_sender_login_maps = texthash:/etc/postfix/senders (master.cf -o) "
     "is the site's own sender-login map (texthash:/etc/postfix/senders): it knows none of "
     "keyrelay's logins, so a *_sender_login_mismatch check refuses every keyrelay sender "
     "(553 5.7.1 Sender address rejected: not owned by user); leave submission out of "
     "postfix.submission_services in the keyrelay configuration and keep the site's logins "
     "there, or rerun with --replace-site-sasl to let keyrelay take submission over and "
     "replace its sender-login map there (or set auth.site_auth_socket to keep the "
     "site's Dovecot logins and sender rules beside keyrelay's, docs/coexistence.md)"),
    ({"mua_sender_restrictions": "reject_sender_login_mismatch, permit"},
     {"smtpd_sender_restrictions": "$mua_sender_restrictions"},
     "submission/inet: smtpd_sender_restrictions = $mua_sender_restrictions (master.cf -o) "
     + MISMATCH_LINE.format(found="reject_sender_login_mismatch",
                            parameter="smtpd_sender_restrictions")),
    ({}, {"smtpd_recipient_restrictions":
          "reject_authenticated_sender_login_mismatch,permit_sasl_authenticated,reject"},
     "submission/inet: smtpd_recipient_restrictions = reject_authenticated_sender_login_"
     "mismatch,permit_sasl_authenticated,reject (master.cf -o) "
     + MISMATCH_LINE.format(found="reject_authenticated_sender_login_mismatch",
                            parameter="smtpd_recipient_restrictions")),
    ({"mua_relay_restrictions": "reject_known_sender_login_mismatch, "
                                "permit_sasl_authenticated, reject"}, {},
     "submission/inet: smtpd_relay_restrictions = $mua_relay_restrictions (master.cf -o) "
     + MISMATCH_LINE.format(found="reject_known_sender_login_mismatch",
                            parameter="smtpd_relay_restrictions")),
    ({"smtpd_restriction_classes": "mua_senders",
      "mua_senders": "reject_unauthenticated_sender_login_mismatch"},
     {"smtpd_sender_restrictions": "mua_senders"},
     "submission/inet: smtpd_sender_restrictions = mua_senders (master.cf -o) holds "
     "restriction class mua_senders: reject_unauthenticated_sender_login_mismatch: it checks "
     "keyrelay's logins against the site's sender-login map and refuses every keyrelay "
     "message (553 5.7.1 Sender address rejected: not owned by user); leave submission out "
     "of postfix.submission_services in the keyrelay configuration and keep the site's "
     "logins there, or take reject_unauthenticated_sender_login_mismatch out of restriction "
     "class mua_senders yourself (--replace-site-sasl does not edit restriction classes, "
     "which other services may use; or set auth.site_auth_socket to keep the site's "
     "Dovecot logins and sender rules beside keyrelay's, docs/coexistence.md)"),
], ids=["dovecot-main-cf", "dovecot-o", "cyrus-default", "login-map", "sender-mismatch",
        "recipient-authenticated", "relay-known", "restriction-class"])
def test_each_conflict_is_refused_with_its_line_and_nothing_changes(
    site: tuple[Path, Path], main: dict[str, str], submission: dict[str, str], line: str,
) -> None:
    etc, config = site
    _edit(etc, main, submission)
    before = _files(etc)
    for args in ((), ("--dry-run",)):
        result = _apply(config, etc, *args)
        assert result.returncode == 1, result.stdout
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert any(line in text for text in lines), result.stderr
        assert lines[-1] == (f"keyrelay: error: {etc}: {len(lines) - 1} setting(s) of the "
                             "site's own SASL set-up on services keyrelay takes over (above); "
                             "nothing was changed")
        assert all(text.startswith("keyrelay: error: ") for text in lines)
        assert result.stdout == ""
        assert _files(etc) == before


def test_a_main_cf_login_map_is_named_on_every_service_keyrelay_takes_over(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    _edit(etc, {"smtpd_sender_login_maps": "texthash:/etc/postfix/senders"}, {})
    result = _apply(config, etc)
    services = [line.split(": ")[2] for line in result.stderr.splitlines()[:-1]]
    assert services == ["submission/inet", "2525/inet", "submissions/inet", "smtp/inet"]
    assert "leave smtp out of postfix.smtp_service" in result.stderr
    assert "leave submissions out of postfix.submissions_services" in result.stderr


def test_replace_site_sasl_takes_the_services_over_and_says_what_it_replaced(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    _dovecot_site(etc)
    dry = _apply(config, etc, "--replace-site-sasl", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "--replace-site-sasl: would replace the site's own SASL settings" in dry.stdout
    result = _apply(config, etc, "--replace-site-sasl")
    assert result.returncode == 0, result.stderr
    assert "postfix check passed before and after them" in result.stdout
    out = result.stdout
    assert "--replace-site-sasl: replaced the site's own SASL settings" in out
    assert ("submission/inet: smtpd_sasl_path = private/auth (main.cf, smtpd_sasl_type = "
            "dovecot) replaced by $keyrelay_sasl_path (keyrelay's auth service)") in out
    assert (f"submission/inet: smtpd_sender_login_maps = texthash:{etc}/senders (main.cf) "
            "replaced by -o smtpd_sender_login_maps=") in out
    assert ("submission/inet: reject_sender_login_mismatch taken out of "
            "smtpd_sender_restrictions (-o smtpd_sender_restrictions=permit)") in out
    params, main = _params(etc), postconf(etc, "-n")
    assert params["submission/inet/smtpd_sasl_path"] == "$keyrelay_sasl_path"
    assert params["submission/inet/smtpd_sender_login_maps"] == ""
    assert params["submission/inet/smtpd_sender_restrictions"] == "permit"
    for other in ("2525", "submissions", "smtp"):  # the main.cf map reached them too
        assert params[f"{other}/inet/smtpd_sender_login_maps"] == ""
    # main.cf keeps the site's own: services keyrelay does not take over still use them
    assert main["smtpd_sasl_path"] == "private/auth"
    assert main["smtpd_sender_login_maps"] == f"texthash:{etc}/senders"
    check = subprocess.run(["postfix", "-c", str(etc), "check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # keyrelay's values are its own now: a second run, with or without the flag, is a no-op
    files = _files(etc)
    for args in ((), ("--replace-site-sasl",)):
        again = _apply(config, etc, *args)
        assert again.returncode == 0, again.stderr
        assert "already in place; nothing changed" in again.stdout
        assert _files(etc) == files


def test_replace_site_sasl_takes_a_mismatch_out_of_keyrelays_merged_relay_list(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    _edit(etc, {"mua_relay_restrictions": "reject_known_sender_login_mismatch, "
                                          "permit_sasl_authenticated, reject"}, {})
    result = _apply(config, etc, "--replace-site-sasl")
    assert result.returncode == 0, result.stderr
    assert ("submission/inet: reject_known_sender_login_mismatch taken out of "
            "smtpd_relay_restrictions (keyrelay_submission_relay_restrictions)") in result.stdout
    main = postconf(etc, "-n")
    assert main["keyrelay_submission_relay_restrictions"] == (
        "$keyrelay_submission_policy, permit_sasl_authenticated, reject")
    # the site's own parameter stays in main.cf (unused now, so postconf -n hides it)
    assert ("mua_relay_restrictions = reject_known_sender_login_mismatch, "
            "permit_sasl_authenticated, reject") in (etc / "main.cf").read_text()
    assert _apply(config, etc).returncode == 0


def test_replace_site_sasl_leaves_a_restriction_class_to_the_admin(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    _edit(etc, {"smtpd_restriction_classes": "mua_senders",
                "mua_senders": "reject_sender_login_mismatch"},
          {"smtpd_sender_restrictions": "mua_senders"})
    before = _files(etc)
    result = _apply(config, etc, "--replace-site-sasl")
    assert result.returncode == 1
    assert result.stderr == (
        "keyrelay: error: submission/inet: smtpd_sender_restrictions: mua_senders is a "
        "restriction class (smtpd_restriction_classes) holding reject_sender_login_mismatch; "
        "--replace-site-sasl does not edit it, since other services may use it: take it out "
        "of mua_senders or of smtpd_sender_restrictions yourself and rerun\n")
    assert _files(etc) == before


def test_keyrelays_own_socketmap_is_not_a_conflict_and_is_kept(site: tuple[Path, Path]) -> None:
    etc, config = site
    own = "socketmap:unix:private/keyrelay-socketmap:sender_login"
    _edit(etc, {"smtpd_sender_login_maps": own}, {})
    assert _apply(config, etc).returncode == 0
    _edit(etc, {}, {"smtpd_sender_login_maps": f"{own},texthash:/etc/postfix/senders"})
    refused = _apply(config, etc)
    assert refused.returncode == 1
    assert "is the site's own sender-login map (texthash:/etc/postfix/senders)" in (
        refused.stderr)
    assert _apply(config, etc, "--replace-site-sasl").returncode == 0
    assert _params(etc)["submission/inet/smtpd_sender_login_maps"] == own


def test_the_sites_sasl_on_a_service_keyrelay_leaves_alone_is_no_conflict(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    _edit(etc, {"smtpd_sasl_type": "dovecot", "smtpd_sasl_path": "private/auth"}, {})
    subprocess.run(["postconf", "-c", str(etc), "-M",
                    "10587/inet=10587 inet n - n - - smtpd"], check=True)
    for name, value in (("smtpd_sasl_auth_enable", "yes"),
                        ("smtpd_sender_restrictions", "reject_sender_login_mismatch")):
        subprocess.run(["postconf", "-c", str(etc), "-P", f"10587/inet/{name}={value}"],
                       check=True)
    result = _apply(config, etc)
    assert result.returncode == 0, result.stderr
    assert "replace" not in result.stdout
    params = _params(etc)
    assert {k: v for k, v in params.items() if k.startswith("10587/")} == {
        "10587/inet/smtpd_sasl_auth_enable": "yes",
        "10587/inet/smtpd_sender_restrictions": "reject_sender_login_mismatch"}


def test_show_lists_the_conflicts_too(site: tuple[Path, Path]) -> None:
    etc, config = site
    _dovecot_site(etc)
    before = _files(etc)
    shown = keyrelay(config, "postfix", "show", "--config-dir", str(etc))
    assert ("keyrelay: conflict: submission/inet: smtpd_sasl_path = private/auth (main.cf) "
            "is the site's own SASL") in shown.stderr
    data = json.loads(keyrelay(config, "postfix", "show", "--json", "--config-dir",
                               str(etc)).stdout)
    # submission's SASL and mismatch, and main.cf's map on each of the four services
    assert len(data["conflicts"]) == 6
    assert sum("smtpd_sender_login_maps" in line.split(" (")[0]
               for line in data["conflicts"]) == 4
    assert _files(etc) == before


def test_find_reads_the_service_before_main_cf() -> None:
    # unit: an -o setting wins over main.cf, and an empty one switches main.cf's map off
    config = parse_config({}, "keyrelay.yaml")
    current = Current(
        main={"smtpd_sender_login_maps": "hash:/etc/postfix/senders",
              "smtpd_tls_cert_file": "/x.pem"},
        effective={"queue_directory": "/var/spool/postfix", "smtpd_sasl_auth_enable": "no"},
        settings={key: {"smtpd_sender_login_maps": ""} for key in
                  ("submission/inet", "2525/inet", "submissions/inet")})
    plan = build_plan(config, [], current)
    found = find(config, plan.main, current)
    assert [(c.service, c.parameter) for c in found] == [("smtp/inet",
                                                          "smtpd_sender_login_maps")]
    assert isinstance(found[0], Conflict) and found[0].source == "main.cf"


def test_a_site_check_left_after_an_earlier_apply_is_no_longer_already_in_place(
    site: tuple[Path, Path],
) -> None:
    # the issue's report: keyrelay had taken the service's logins over, then said "already in
    # place; nothing changed" while the site's sender-login check refused every keyrelay
    # message; keyrelay's own SASL path is no conflict, the site's check still is
    etc, config = site
    assert _apply(config, etc).returncode == 0
    _edit(etc, {"smtpd_sender_restrictions": "reject_sender_login_mismatch"}, {})
    before = _files(etc)
    result = _apply(config, etc)
    assert result.returncode == 1
    assert "already in place" not in result.stdout
    assert "smtpd_sasl_path" not in result.stderr
    services = [line.split(": ")[2] for line in result.stderr.splitlines()[:-1]]
    assert services == ["submission/inet", "2525/inet", "submissions/inet", "smtp/inet"]
    assert ("smtp/inet: smtpd_sender_restrictions = reject_sender_login_mismatch (main.cf) "
            "holds reject_sender_login_mismatch") in result.stderr
    assert _files(etc) == before
    replaced = _apply(config, etc, "--replace-site-sasl")
    assert replaced.returncode == 0, replaced.stderr
    params = _params(etc)
    assert {params[f"{name}/inet/smtpd_sender_restrictions"]
            for name in ("submission", "2525", "submissions", "smtp")} == {""}
    assert postconf(etc, "-n")["smtpd_sender_restrictions"] == "reject_sender_login_mismatch"


# -- coexistence (auth.site_auth_socket, docs/coexistence.md) --------------------------------
def _coexisting(config: Path, socket: str = "/run/dovecot/auth-keyrelay") -> None:
    config.write_text(config.read_text() + f"auth: {{site_auth_socket: {socket}}}\n")


def test_coexistence_keeps_the_sites_dovecot_and_mismatch_and_joins_the_login_maps(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    _dovecot_site(etc)
    _coexisting(config)
    result = _apply(config, etc)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "conflict" not in result.stderr
    out = result.stdout
    assert ("auth.site_auth_socket: the site's own logins and sender rules stay beside "
            "keyrelay's on the services keyrelay takes over (docs/coexistence.md):") in out
    assert ("submission/inet: the site's Dovecot logins (smtpd_sasl_path = private/auth, "
            "main.cf) now reach keyrelay's auth service, which passes them on to "
            "auth.site_auth_socket = /run/dovecot/auth-keyrelay") in out
    own = "socketmap:unix:private/keyrelay-socketmap:sender_login"
    union = f"unionmap:{{{own},texthash:{etc}/senders}}"
    assert (f"submission/inet: smtpd_sender_login_maps = texthash:{etc}/senders (main.cf) "
            f"joined with keyrelay's: -o smtpd_sender_login_maps={union}") in out
    params, main = _params(etc), postconf(etc, "-n")
    assert params["submission/inet/smtpd_sasl_path"] == "$keyrelay_sasl_path"
    assert params["submission/inet/smtpd_sender_login_maps"] == union
    # the site's own restriction is kept as it was, and main.cf keeps the site's settings
    assert params["submission/inet/smtpd_sender_restrictions"] == "$mua_sender_restrictions"
    assert main["mua_sender_restrictions"] == "reject_sender_login_mismatch, permit"
    assert main["smtpd_sasl_path"] == "private/auth"
    check = subprocess.run(["postfix", "-c", str(etc), "check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # idempotent: the union is recognised as keyrelay's own on the next run
    files = _files(etc)
    again = _apply(config, etc)
    assert again.returncode == 0, again.stderr
    assert "already in place; nothing changed" in again.stdout
    assert _files(etc) == files


def test_coexistence_cannot_pass_logins_on_to_cyrus(site: tuple[Path, Path]) -> None:
    etc, config = site
    _edit(etc, {"smtpd_sasl_type": "cyrus", "smtpd_sasl_path": "smtpd"},
          {"smtpd_sasl_auth_enable": "yes"})
    _coexisting(config)
    before = _files(etc)
    result = _apply(config, etc)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("submission/inet: smtpd_sasl_path = smtpd (main.cf) is the site's own SASL "
            "(smtpd_sasl_type = cyrus): auth.site_auth_socket passes the site's logins on "
            "only to a Dovecot auth service, so its users could no longer log in on it; "
            "leave submission out of postfix.submission_services") in result.stderr
    assert _files(etc) == before


def test_coexistence_needs_keyrelays_socketmap_to_join_a_site_login_map(
    site: tuple[Path, Path],
) -> None:
    etc, config = site
    _dovecot_site(etc)
    config.write_text(config.read_text().replace(
        f"  socketmap_listen: unix:{etc.parent}/queue/private/keyrelay-socketmap\n",
        "  socketmap_listen: ''\n"))
    _coexisting(config)
    before = _files(etc)
    result = _apply(config, etc)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("auth.site_auth_socket joins it with keyrelay's sender_login socketmap, but "
            "policyd.socketmap_listen is empty") in result.stderr
    assert _files(etc) == before
