"""The LDAP directory backend (ldap3): the same records as the YAML file, one entry each.

- ``backend``: ``LdapDirectory``, the daemons' copy, its refresher thread and the
  read-through for a key id the copy lacks (how reads stay fresh: its docstring);
- ``searches`` / ``writes`` / ``changelog``: the reads, the writes under the ``krSerial``
  lock, and the change log that lets readers fetch only what a write changed;
- ``mapping``: records to LDAP entries and back, the layout of the entries;
- ``schema``: the attribute and object class table behind ``ldap/keyrelay.schema`` and
  ``ldap/keyrelay.ldif`` (``python -m keyrelay.directory.ldap`` writes both);
- ``connection``: connecting, and the typed part of ``ldap3.Connection`` keyrelay uses.
"""

from .backend import LdapDirectory

__all__ = ["LdapDirectory"]
