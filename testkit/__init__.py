"""The harness of keyrelay's tests (tests/) and benchmarks (bench/): real processes on
loopback and the clients that talk to them. Not shipped in the wheel (setup.cfg); importable
from the repository root: pytest puts it on the path (setup.cfg, ``pythonpath = .``) and the
benchmarks run as ``python -m bench.NAME`` from there.

- ``net``: ``free_port``/``free_ports``/``free_udp_port``, ``wait_until`` (a condition with a
  deadline), ``client_tls`` (a client trusting a test relay's self-signed certificate),
  ``port_open``, ``greets``, ``unix_accepts``, ``reply_text``.
- ``relay``: the relay ``make run`` starts (keyrelay.demo's public API) in a temporary folder
  (``private_relay``), SMTP clients for it, ``new_tenant``, delivery checks at the sink.
- ``slapd``: a private OpenLDAP slapd with TLS (one CA per process), keyrelay's schema and
  ACLs (``Slapd``).
- ``dnsserver``: dnsmasq serving given TXT records (``DnsServer``) and Mail::DKIM's
  ``dkimproxy_verify``.
- ``policyd``: a keyrelay-policyd process (``Policyd``) and directory helpers;
  ``protocols``: the Dovecot auth, policy and socketmap clients, as Postfix speaks them.
- ``factories``: directory snapshots built through ``keyrelay.admin`` (``World``).
- ``privaterelay``: the private Postfix of the Postfix benchmarks (``PrivateRelay``) and a
  benchmark's life cycle; ``loadrelay``: that relay with many principals, one setup of a
  comparison at a time (``LoadRelay``); ``loadgen``: the SMTP load generator (``Load``,
  ``LoadResult``); ``othermilters``: OpenDKIM and dkimpy-milter (``MilterUnderTest``);
  ``policydload``: a load on keyrelay-policyd's services; ``stats``: process CPU and memory,
  the host.
"""
