"""``python -m keyrelay.directory.ldap``: write ``ldap/keyrelay.schema``,
``ldap/keyrelay.ldif`` and ``ldap/keyrelay-upgrade.ldif`` of the repository from the schema
table (``schema.py``)."""

from __future__ import annotations

from pathlib import Path

from .schema import write_files


def main() -> None:
    written = write_files(Path(__file__).resolve().parents[3] / "ldap")
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
