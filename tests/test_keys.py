"""API key text (keyrelay.keys) and hash-only storage through the real ``keyrelay`` CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyrelay import keys
from keyrelay.directory.model import ApiKey

KEYRELAY = Path(sys.executable).with_name("keyrelay")
KEY_FORMAT = re.compile(r"kr\.[a-z2-7]{16}\.[A-Za-z0-9_-]{43}")
GOOD_ID = "abcdefghijkmnop2"
GOOD_SECRET = "A" * 20 + "z9_-" + "b" * 19  # 43 characters of the URL-safe alphabet
GOOD = f"kr.{GOOD_ID}.{GOOD_SECRET}"


def secret_of(text: str) -> str:
    return text.rsplit(".", 1)[1]


# --- generation -----------------------------------------------------------------------------


def test_generated_key_reads_kr_id_secret() -> None:
    new = keys.generate()
    assert KEY_FORMAT.fullmatch(new.text), new.key_id
    assert new.text.split(".")[1] == new.key_id


def test_secret_carries_at_least_256_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[int | None] = []
    real = secrets.token_urlsafe

    def spy(nbytes: int | None = None) -> str:
        requested.append(nbytes)
        text: str = real(nbytes)
        return text

    monkeypatch.setattr(secrets, "token_urlsafe", spy)
    new = keys.generate()
    assert requested and all(n is not None and n >= 32 for n in requested)
    raw = base64.urlsafe_b64decode(secret_of(new.text) + "=")
    assert len(raw) * 8 >= 256


def test_secrets_use_the_whole_alphabet_and_never_repeat() -> None:
    generated = [keys.generate() for _ in range(2000)]
    secrets_seen = [secret_of(k.text) for k in generated]
    assert len(set(secrets_seen)) == len(secrets_seen)
    # 2000 x 43 characters: every one of the 64 URL-safe base64 characters shows up unless
    # the source is not uniformly random
    assert set("".join(secrets_seen)) == set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )


def test_key_ids_are_unique_across_many_generations() -> None:
    ids = [keys.generate().key_id for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(keys.KEY_ID_RE.match(i) for i in ids)
    assert set("".join(ids)) == set("abcdefghijklmnopqrstuvwxyz234567")


def test_generate_keeps_a_given_key_id() -> None:
    new = keys.generate(GOOD_ID)
    assert new.key_id == GOOD_ID
    assert new.text.startswith(f"kr.{GOOD_ID}.")


# --- parsing --------------------------------------------------------------------------------


def test_parse_accepts_a_generated_key() -> None:
    new = keys.generate()
    presented = keys.parse(new.text)
    assert presented == keys.PresentedKey(key_id=new.key_id, secret=secret_of(new.text))


def test_parse_accepts_a_hand_written_well_formed_key() -> None:
    assert keys.parse(GOOD) == keys.PresentedKey(key_id=GOOD_ID, secret=GOOD_SECRET)


MALFORMED = {
    "empty": "",
    "prefix-only": "kr",
    "dots-only": "kr..",
    "no-secret": f"kr.{GOOD_ID}",
    "empty-secret": f"kr.{GOOD_ID}.",
    "no-prefix": f"{GOOD_ID}.{GOOD_SECRET}",
    "empty-prefix": f".{GOOD_ID}.{GOOD_SECRET}",
    "uppercase-prefix": f"KR.{GOOD_ID}.{GOOD_SECRET}",
    "other-prefix": f"sk.{GOOD_ID}.{GOOD_SECRET}",
    "longer-prefix": f"krx.{GOOD_ID}.{GOOD_SECRET}",
    "underscore-separator": f"kr_{GOOD_ID}_{GOOD_SECRET}",
    "id-15": f"kr.{GOOD_ID[:-1]}.{GOOD_SECRET}",
    "id-17": f"kr.{GOOD_ID}a.{GOOD_SECRET}",
    "id-uppercase": f"kr.{GOOD_ID.upper()}.{GOOD_SECRET}",
    "id-digit-0": f"kr.{GOOD_ID[:-1]}0.{GOOD_SECRET}",
    "id-digit-1": f"kr.{GOOD_ID[:-1]}1.{GOOD_SECRET}",
    "id-digit-8": f"kr.{GOOD_ID[:-1]}8.{GOOD_SECRET}",
    "id-dash": f"kr.{GOOD_ID[:-1]}-.{GOOD_SECRET}",
    "secret-42": f"kr.{GOOD_ID}.{GOOD_SECRET[:-1]}",
    "secret-44": f"kr.{GOOD_ID}.{GOOD_SECRET}A",
    "secret-plus": f"kr.{GOOD_ID}.{GOOD_SECRET[:-1]}+",
    "secret-slash": f"kr.{GOOD_ID}.{GOOD_SECRET[:-1]}/",
    "secret-padding": f"kr.{GOOD_ID}.{GOOD_SECRET[:-1]}=",
    "extra-dot-at-end": f"{GOOD}.",
    "extra-part": f"{GOOD}.more",
    "dot-inside-secret": f"kr.{GOOD_ID}.{GOOD_SECRET[:20]}.{GOOD_SECRET[21:]}",
    "double-dot": f"kr..{GOOD_ID}.{GOOD_SECRET}",
    "leading-space": f" {GOOD}",
    "trailing-space": f"{GOOD} ",
    "trailing-newline": f"{GOOD}\n",
    "trailing-crlf": f"{GOOD}\r\n",
    "newline-after-id": f"kr.{GOOD_ID}\n.{GOOD_SECRET}",
    "tab-inside": f"kr.{GOOD_ID}.{GOOD_SECRET[:10]}\t{GOOD_SECRET[11:]}",
    "nul-at-end": f"{GOOD}\x00",
    "non-ascii-id": f"kr.{GOOD_ID[:-1]}é.{GOOD_SECRET}",
    "fullwidth-id": f"kr.{GOOD_ID[:-1]}ａ.{GOOD_SECRET}",
    "arabic-digit-secret": f"kr.{GOOD_ID}.{GOOD_SECRET[:-1]}٣",
    "non-ascii-secret": f"kr.{GOOD_ID}.{GOOD_SECRET[:-1]}ß",
    "lone-surrogate": f"kr.{GOOD_ID}.{GOOD_SECRET[:-1]}\ud800",
    "cyrillic-prefix": f"кr.{GOOD_ID}.{GOOD_SECRET}",
    "a-password": "hunter2",
}


@pytest.mark.parametrize("text", list(MALFORMED.values()), ids=list(MALFORMED))
def test_parse_returns_none_for_a_malformed_key(text: str) -> None:
    assert keys.parse(text) is None


def test_parse_handles_a_very_long_password() -> None:
    assert keys.parse("kr." + "a" * 1_000_000) is None
    assert keys.parse(GOOD + "x" * 100_000) is None


def test_key_id_pattern_refuses_a_trailing_newline() -> None:
    # other modules check key ids with KEY_ID_RE.match (e.g. the SASL identity "acme:<id>")
    assert keys.KEY_ID_RE.match(GOOD_ID)
    assert not keys.KEY_ID_RE.match(GOOD_ID + "\n")


# --- hashing and comparison ----------------------------------------------------------------


def test_hash_is_sha256_hex_of_the_secret() -> None:
    new = keys.generate()
    secret = secret_of(new.text)
    expected = hashlib.sha256(secret.encode("ascii")).hexdigest()
    assert keys.hash_secret(secret) == expected
    assert new.secret_hash == expected
    assert re.fullmatch(r"[0-9a-f]{64}", new.secret_hash)
    # the hash covers the secret only, not the public id and prefix
    assert new.secret_hash != hashlib.sha256(new.text.encode("ascii")).hexdigest()


def test_secret_matches_only_the_right_secret() -> None:
    new = keys.generate()
    presented = keys.parse(new.text)
    assert presented is not None
    assert keys.secret_matches(presented, new.secret_hash)
    other = keys.parse(keys.generate(new.key_id).text)  # same id, different secret
    assert other is not None
    assert not keys.secret_matches(other, new.secret_hash)
    assert not keys.secret_matches(presented, new.secret_hash.upper())
    assert not keys.secret_matches(presented, "")


def test_secret_matches_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, object]] = []

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return False  # the answer must come from here, not from a shortcut beside it

    monkeypatch.setattr(hmac, "compare_digest", spy)
    new = keys.generate()
    presented = keys.parse(new.text)
    assert presented is not None

    assert keys.secret_matches(presented, new.secret_hash) is False
    assert calls == [(new.secret_hash, new.secret_hash)]


# --- nothing shows the secret ---------------------------------------------------------------


def renderings(obj: object) -> list[str]:
    return [repr(obj), str(obj), f"{obj}", f"{obj!r}", "%s" % (obj,), "%r" % (obj,),  # noqa: UP031
            repr([obj]), str({"k": obj})]


def test_new_key_never_shows_its_text() -> None:
    new = keys.generate()
    for text in renderings(new):
        assert secret_of(new.text) not in text
        assert new.secret_hash not in text
        assert new.key_id in text


def test_presented_key_never_shows_its_secret() -> None:
    presented = keys.parse(GOOD)
    assert presented is not None
    for text in renderings(presented):
        assert GOOD_SECRET not in text
        assert GOOD_ID in text


def test_stored_key_never_shows_its_hash() -> None:
    digest = keys.hash_secret(GOOD_SECRET)
    stored = ApiKey(
        key_id=GOOD_ID, principal="acme", name="crm", secret_hash=digest,
        scopes=("mail.send",), created=datetime(2026, 1, 31, tzinfo=UTC),
    )
    for text in renderings(stored):
        assert digest not in text
        assert GOOD_ID in text


def test_logging_a_key_object_does_not_log_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    new = keys.generate()
    presented = keys.parse(new.text)
    logger = logging.getLogger("keyrelay.test")
    with caplog.at_level(logging.INFO, logger="keyrelay.test"):
        logger.info("created %s, presented %r", new, presented)
    assert new.key_id in caplog.text
    assert secret_of(new.text) not in caplog.text


# --- hash-only storage, end to end ----------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(
        f"directory:\n  path: {json.dumps(str(tmp_path / 'directory.yaml'))}\n"
        f"dkim:\n  key_dir: {json.dumps(str(tmp_path / 'dkim'))}\n"
        f"logging:\n  audit_log: {json.dumps(str(tmp_path / 'audit.log'))}\n",
        encoding="utf-8",
    )
    return config


def run_cli(config: Path, *args: str) -> str:
    result = subprocess.run(
        [str(KEYRELAY), "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_cli_stores_only_the_hash_of_a_new_key(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    run_cli(config, "account", "add", "acme")
    run_cli(config, "domain", "add", "acme", "example.com")  # fills the DKIM key folder
    output = run_cli(config, "key", "create", "acme", "--name", "crm-prod")

    printed = [line for line in output.splitlines() if KEY_FORMAT.fullmatch(line)]
    assert len(printed) == 1, output
    text = printed[0]
    secret = secret_of(text)
    raw = base64.urlsafe_b64decode(secret + "=")
    digest = hashlib.sha256(secret.encode("ascii")).hexdigest()
    # listings after the fact show the key, never its secret
    later = run_cli(config, "key", "list") + run_cli(config, "key", "list", "--json")
    later += run_cli(config, "key", "show", text.split(".")[1], "--json")
    assert text.split(".")[1] in later and secret not in later

    scanned = {p.relative_to(tmp_path).as_posix(): p.read_bytes()
               for p in tmp_path.rglob("*") if p.is_file()}
    assert {"keyrelay.yaml", "directory.yaml", "directory.yaml.lock", "audit.log"} <= set(scanned)
    assert any(name.startswith("dkim/example.com/") for name in scanned)
    for name, content in scanned.items():
        for needle in (secret.encode("ascii"), raw, raw.hex().encode("ascii")):
            assert needle not in content, f"the secret is stored in {name}"
    assert digest.encode("ascii") in scanned["directory.yaml"]
