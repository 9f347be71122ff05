"""A site's own milter, the one a host ran before keyrelay came (tests/test_ansible.py): it
adds ``X-Site-Milter: passed`` to every message, so a test sees that Postfix still calls it,
and calls it before keyrelay-milter signs (the header is then covered by the signature).

Usage: python tests/site_milter.py inet:PORT@127.0.0.1
"""

from __future__ import annotations

import sys

import Milter


class SiteMilter(Milter.Base):  # type: ignore[misc]
    def eom(self) -> int:
        self.addheader("X-Site-Milter", "passed")
        return int(Milter.ACCEPT)


def main() -> None:
    Milter.factory = SiteMilter
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("site-milter", sys.argv[1], 30)


if __name__ == "__main__":
    main()
