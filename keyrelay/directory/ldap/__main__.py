"""``python -m keyrelay.directory.ldap``: write ``ldap/keyrelay.schema`` and
``ldap/keyrelay.ldif`` of the repository from the schema table (``schema.py``)."""

from __future__ import annotations

from pathlib import Path

from .schema import write_files


def main() -> None:
    schema, ldif = write_files(Path(__file__).resolve().parents[3] / "ldap")
    print(f"wrote {schema} and {ldif}")


if __name__ == "__main__":
    main()
