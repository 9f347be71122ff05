"""Run a private OpenLDAP slapd on loopback for the LDAP directory backend's tests.

- ``Slapd`` builds everything in a temporary folder and touches nothing in ``/etc/ldap``: a
  copy of the throw-away CA and server certificate for 127.0.0.1 and localhost that
  ``shared_tls()`` makes once per process (a test session: openssl), a cn=config
  loaded with ``slapadd -n0 -F DIR/slapd.d`` from an LDIF that includes Debian's core, cosine,
  inetorgperson and nis schemas plus the extra schema LDIF files it is given (keyrelay's own:
  ``ldap/keyrelay.ldif``), one mdb database for ``dc=keyrelay,dc=test`` with the caller's
  equality indexes and ACLs, and the initial entries (``slapadd -b SUFFIX``): the suffix,
  ``ou=services`` with the service account ``cn=keyrelay`` and a second account
  ``cn=reader``, and ``ou=keyrelay``, the base of keyrelay's records.
- ``start()`` runs ``slapd -d 0`` in the foreground on ``ldap://127.0.0.1:PORT/`` (StartTLS)
  and ``ldaps://127.0.0.1:PORT2/``, with its stderr in ``DIR/slapd.log``, and waits for
  readiness by a real bind over StartTLS (never a fixed sleep). ``-d 0`` keeps slapd silent,
  even about why it could not start (a port taken); ``Slapd(debug="none")`` logs slapd's
  uncategorised messages, which include those, and nothing per operation. ``stop()`` sends
  SIGTERM; ``stop()`` then ``start()`` is a restart on the same ports and data; ``pause()``
  and ``resume()`` (SIGSTOP/SIGCONT) make a server that accepts connections but never answers;
  ``kill()`` (SIGKILL) is a crash.
- As root the server runs as Debian's ``openldap`` user (``-u openldap -g openldap``, the
  folder is given to that user), as any other user it runs as that user.

Every password is random per instance and in an attribute; the service account's is also in
``service_password_file`` (mode 0600), which is what keyrelay's ``bind_password_file`` reads.
A test that stops or pauses the server makes its own ``Slapd`` instead of the shared session
fixture (``slapd`` in conftest.py).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException

from testkit.net import free_port

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
SYSTEM_SCHEMA_DIR = Path("/etc/ldap/schema")
# the order matters: each schema uses names the earlier ones define
SYSTEM_SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
MODULE_DIR = Path("/usr/lib/ldap")  # Debian builds back_mdb as a loadable module
REPO = Path(__file__).resolve().parent.parent
KEYRELAY_SCHEMA = REPO / "ldap" / "keyrelay.ldif"

SUFFIX = "dc=keyrelay,dc=test"
ADMIN_DN = f"cn=admin,{SUFFIX}"
CONFIG_ADMIN_DN = "cn=admin,cn=config"
SERVICES = f"ou=services,{SUFFIX}"
SERVICE_DN = f"cn=keyrelay,{SERVICES}"
READER_DN = f"cn=reader,{SERVICES}"
BASE_DN = f"ou=keyrelay,{SUFFIX}"

DEFAULT_INDEXES = ("objectClass eq",)
# docs/ldap.md, "Indexes": what the backend searches by, for a server with keyrelay's schema
KEYRELAY_INDEXES = ("objectClass eq", "krKeyId eq", "krPrincipal eq", "krName eq,sub",
                    "krDomain eq,sub", "krAddress eq")
# The daemons load the whole directory with paged searches; slapd's default size limit of
# 500 would cut that short (docs/ldap.md, "The service DN, ACLs and limits").
DEFAULT_LIMITS = (f'dn.exact="{SERVICE_DN}" size=unlimited time=unlimited',)


def keyrelay_schemas() -> list[Path]:
    """``[ldap/keyrelay.ldif]`` when the repository has it, else ``[]``."""
    return [KEYRELAY_SCHEMA] if KEYRELAY_SCHEMA.exists() else []


def defines_attribute(schema: Path, name: str) -> bool:
    """Whether a schema LDIF defines the attribute type ``name`` (what an ACL may name)."""
    return f"NAME '{name}'".lower() in schema.read_text(encoding="utf-8").lower()


def default_acls(secret_attribute: bool) -> list[str]:
    """The ACLs of docs/ldap.md, plus what binding and clients' discovery need.

    The service DN writes the ``ou=keyrelay`` subtree; every other bound user reads it, except
    ``krSecretHash`` (only when the schema defines it: slapd refuses an ACL naming an unknown
    attribute), which nobody but the service DN reads. Anonymous reads nothing but the root DSE
    and the schema. The rootDN is never subject to ACLs.
    """
    acls = [
        "to attrs=userPassword by self =xw by anonymous auth by * none",
        'to dn.base="" by * read',
        'to dn.base="cn=Subschema" by * read',
    ]
    if secret_attribute:
        acls.append(f'to dn.subtree="{BASE_DN}" attrs=krSecretHash'
                    f' by dn.exact="{SERVICE_DN}" write by * none')
    acls += [
        f'to dn.subtree="{BASE_DN}" by dn.exact="{SERVICE_DN}" write by users read by * none',
        "to * by users read by * none",
    ]
    return acls


def records_hidden_acls() -> list[str]:
    """ACLs that let every user bind and read the base entry, and nobody see what is under
    it: a directory the service DN cannot read, though the server answers."""
    return ["to attrs=userPassword by anonymous auth by * none",
            f'to dn.base="{BASE_DN}" by users read by * none',
            "to * by * none"]


def ssha(password: str) -> str:
    """RFC 2307 ``{SSHA}`` (SHA-1 over password and salt, then the salt), as slappasswd makes."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 - what {SSHA} is
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (P-256, one day): (certificate, key) in ``folder``."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost signed by ``ca``: (cert, key)."""
    cert, key, request = folder / "server.pem", folder / "server.key", folder / "server.csr"
    extensions = folder / "server.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", request, "-subj", "/CN=localhost")
    _openssl("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1],
             "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", extensions)
    return cert, key


@functools.cache
def shared_tls() -> Path:
    """A folder with a throw-away CA (``ca.pem``) and a server certificate for 127.0.0.1 and
    localhost signed by it (``server.pem``, ``server.key``), made on the first call and
    shared by every ``Slapd`` of this process (one openssl run per test session instead of
    three per server); removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="kr-slapd-tls-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    make_server_cert(folder, make_ca(folder, "ca"))
    return folder


def _openssl(*args: object) -> None:
    _run(["openssl", *map(str, args)], "openssl")


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {' '.join(command)}\n"
                           f"{done.stdout}{done.stderr}")


def _ldif_value(name: str, value: str) -> str:
    # values with LDIF-special starts or non-ASCII go base64 (RFC 2849 "::")
    if value.isascii() and not value.startswith((" ", ":", "<")) and "\n" not in value:
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode()).decode('ascii')}"


def ldif(*entries: dict[str, str | Sequence[str]]) -> str:
    """LDIF text of entries given as ``{"dn": ..., attribute: value or [values]}``."""
    blocks = []
    for entry in entries:
        lines = []
        for name, values in entry.items():
            for value in [values] if isinstance(values, str) else values:
                lines.append(_ldif_value(name, value))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


class Slapd:
    """A private slapd with TLS, keyrelay's ACLs and initial entries (see the module doc).

    ``schemas``: extra cn=config schema LDIF files, loaded after Debian's four (default: the
    repository's ``ldap/keyrelay.ldif`` when it exists). ``indexes``: ``olcDbIndex`` values
    (default ``objectClass eq``). ``acls``: ``olcAccess`` values without the ``{n}`` prefix
    (default ``default_acls``). ``limits``: ``olcLimits`` values (default: the service DN
    unlimited). ``debug``: slapd's ``-d`` level. Nothing happens until ``start()`` (or
    ``with``).
    """

    def __init__(self, *, schemas: Sequence[Path] | None = None,
                 indexes: Sequence[str] = DEFAULT_INDEXES, acls: Sequence[str] | None = None,
                 limits: Sequence[str] = DEFAULT_LIMITS, debug: str = "0",
                 start_timeout: float = 30.0) -> None:
        self.schemas = [Path(s) for s in (keyrelay_schemas() if schemas is None else schemas)]
        missing = [str(s) for s in self.schemas if not s.exists()]
        if missing:
            raise FileNotFoundError(f"schema LDIF not found: {', '.join(missing)}")
        self.has_secret_attribute = any(defines_attribute(s, "krSecretHash")
                                        for s in self.schemas)
        self.indexes = list(indexes)
        self.acls = list(default_acls(self.has_secret_attribute) if acls is None else acls)
        self.limits = list(limits)
        self.debug = debug
        self.start_timeout = start_timeout

        self.suffix = SUFFIX
        self.base_dn = BASE_DN
        self.admin_dn = ADMIN_DN
        self.config_admin_dn = CONFIG_ADMIN_DN
        self.service_dn = SERVICE_DN
        self.reader_dn = READER_DN
        self.admin_password = secrets.token_urlsafe(16)
        self.service_password = secrets.token_urlsafe(16)
        self.reader_password = secrets.token_urlsafe(16)

        self.port = free_port()
        self.ldaps_port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}"

        # As root, slapd drops to Debian's openldap user after binding its ports.
        self.user: str | None = None
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                self.user = pwd.getpwnam("openldap").pw_name

        self.dir = Path(tempfile.mkdtemp(prefix="kr-slapd-"))
        self.config_dir = self.dir / "slapd.d"
        self.data_dir = self.dir / "data"
        self.tls_dir = self.dir / "tls"
        self.log_path = self.dir / "slapd.log"
        self.service_password_file = self.dir / "service.secret"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.ca_file = self.tls_dir / "ca.pem"  # what clients verify the server with
        self.server_cert = self.tls_dir / "server.pem"
        self.server_key = self.tls_dir / "server.key"
        self._built = False

    def __repr__(self) -> str:  # no password in pytest's output
        return f"Slapd({self.url}, {self.ldaps_url}, dir={self.dir})"

    def __enter__(self) -> Slapd:
        try:
            self.start()
        except BaseException:
            self.close()  # the error says why; nothing is left in /tmp
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building the folder -----------------------------------------------------------
    def build(self) -> None:
        """Certificates, cn=config and the initial entries (once; ``start`` calls it)."""
        if self._built:
            return
        for tool in (SLAPD, SLAPADD):
            if not tool.exists():
                raise FileNotFoundError(f"{tool} is missing (make deps installs slapd)")
        self.tls_dir.mkdir()
        self.data_dir.mkdir()
        self.config_dir.mkdir()
        shared = shared_tls()
        for path in (self.ca_file, self.server_cert, self.server_key):
            shutil.copy2(shared / path.name, path)  # a copy: chowned below, removed by close()
        self.service_password_file.write_text(self.service_password + "\n")
        self.service_password_file.chmod(0o600)

        config = self.dir / "config.ldif"
        config.write_text(self.config_ldif())
        _run([str(SLAPADD), "-n0", "-F", str(self.config_dir), "-l", str(config)],
             "slapadd -n0 (cn=config)")
        entries = self.dir / "entries.ldif"
        entries.write_text(self.entries_ldif())
        _run([str(SLAPADD), "-F", str(self.config_dir), "-b", self.suffix, "-l", str(entries)],
             f"slapadd -b {self.suffix} (initial entries)")
        if self.user is not None:
            # the server reads its configuration, key and database as that user; the test
            # process (root) keeps reading the CA and the password file
            for path in [self.dir, *self.dir.rglob("*")]:
                if path != self.service_password_file:
                    shutil.chown(path, self.user, self.user)
        self._built = True

    def config_ldif(self) -> str:
        """The cn=config LDIF (schemas by ``include:``, as Debian's own postinst does)."""
        header = ldif(
            {"dn": "cn=config", "objectClass": "olcGlobal", "cn": "config",
             "olcPidFile": str(self.dir / "slapd.pid"),
             "olcArgsFile": str(self.dir / "slapd.args"),
             "olcTLSCACertificateFile": str(self.ca_file),
             "olcTLSCertificateFile": str(self.server_cert),
             "olcTLSCertificateKeyFile": str(self.server_key),
             "olcLogLevel": "none"},
            {"dn": "cn=module{0},cn=config", "objectClass": "olcModuleList",
             "cn": "module{0}", "olcModulePath": str(MODULE_DIR), "olcModuleLoad": "back_mdb"},
            {"dn": "cn=schema,cn=config", "objectClass": "olcSchemaConfig", "cn": "schema"},
        )
        schemas = [SYSTEM_SCHEMA_DIR / f"{name}.ldif" for name in SYSTEM_SCHEMAS] + self.schemas
        includes = "".join(f"include: file://{path.resolve()}\n\n" for path in schemas)
        databases = ldif(
            {"dn": "olcDatabase={-1}frontend,cn=config",
             "objectClass": ["olcDatabaseConfig", "olcFrontendConfig"],
             "olcDatabase": "{-1}frontend"},
            {"dn": "olcDatabase={0}config,cn=config", "objectClass": "olcDatabaseConfig",
             "olcDatabase": "{0}config", "olcRootDN": self.config_admin_dn,
             "olcRootPW": ssha(self.admin_password)},
            {"dn": "olcDatabase={1}mdb,cn=config",
             "objectClass": ["olcDatabaseConfig", "olcMdbConfig"],
             "olcDatabase": "{1}mdb", "olcDbDirectory": str(self.data_dir),
             "olcSuffix": self.suffix, "olcRootDN": self.admin_dn,
             "olcRootPW": ssha(self.admin_password),
             "olcDbMaxSize": str(1 << 30),  # the map is sparse; the default 10 MiB is small
             "olcDbIndex": self.indexes,
             "olcAccess": [f"{{{i}}}{acl}" for i, acl in enumerate(self.acls)],
             "olcLimits": [f"{{{i}}}{limit}" for i, limit in enumerate(self.limits)]},
        )
        return header + "\n" + includes + databases

    def entries_ldif(self) -> str:
        account = ["organizationalRole", "simpleSecurityObject"]
        return ldif(
            {"dn": self.suffix, "objectClass": ["dcObject", "organization"],
             "dc": "keyrelay", "o": "keyrelay tests"},
            {"dn": SERVICES, "objectClass": "organizationalUnit", "ou": "services"},
            {"dn": self.service_dn, "objectClass": account, "cn": "keyrelay",
             "description": "the keyrelay daemons and CLI",
             "userPassword": ssha(self.service_password)},
            {"dn": self.reader_dn, "objectClass": account, "cn": "reader",
             "description": "another bound user, for ACL tests",
             "userPassword": ssha(self.reader_password)},
            {"dn": self.base_dn, "objectClass": "organizationalUnit", "ou": "keyrelay"},
        )

    # -- the process -------------------------------------------------------------------
    def command(self) -> list[str]:
        command = [str(SLAPD), "-d", self.debug,
                   "-h", f"{self.url}/ {self.ldaps_url}/", "-F", str(self.config_dir)]
        if self.user is not None:
            command += ["-u", self.user, "-g", self.user]
        return command

    def start(self) -> None:
        """Start slapd (building the folder the first time) and wait until a bind works."""
        if self.proc is not None:
            raise RuntimeError("slapd is already running")
        self.build()
        with open(self.log_path, "ab") as log:
            # its own session: a Ctrl-C meant for make run-cluster reaches the demo, which
            # stops slapd after the nodes (testkit/cluster.py)
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.paused = False
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Bind as the rootDN over StartTLS until it works; between tries wait on the process,
        so an exit (a bad configuration, a port taken) is reported at once with the log."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.connect(self.admin_dn, self.admin_password).unbind()
                return
            except (LDAPException, OSError) as exc:
                last = exc
            try:
                status = self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"slapd not ready after {self.start_timeout:g}s: "
                                       f"{last}\n{self.log()}") from None
                continue
            self.proc = None
            log = self.log() or (f'(nothing: slapd -d {self.debug} is silent; Slapd(debug="none")'
                                 " shows why it stopped)")
            raise RuntimeError(f"slapd exited with status {status} at start: "
                               f"{' '.join(self.command())}\n{log}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        assert self.proc is not None, "slapd is not running"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None, "slapd is not running"
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown (``start()`` starts it again)."""
        proc, self.proc = self.proc, None
        self.paused = False
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (and SIGCONT when paused), wait; SIGKILL after ``timeout``. The status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            if self.paused:
                proc.send_signal(signal.SIGCONT)
        self.paused = False
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def set_acls(self, acls: Sequence[str]) -> None:
        """Replace the database's ``olcAccess`` (values without ``{n}``) while it runs."""
        conn = self.connect(self.config_admin_dn, self.admin_password)
        try:
            conn.modify("olcDatabase={1}mdb,cn=config", {"olcAccess": [
                (ldap3.MODIFY_REPLACE, [f"{{{i}}}{acl}" for i, acl in enumerate(acls)])]})
        finally:
            conn.unbind()

    # -- clients -----------------------------------------------------------------------
    def tls(self, ca_file: Path | None = None) -> ldap3.Tls:
        """Verification against this server's CA (or ``ca_file``), as the backend does."""
        return ldap3.Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                         ca_certs_file=str(ca_file or self.ca_file))

    def connect(self, user: str | None = None, password: str | None = None, *,
                ldaps: bool = False, ca_file: Path | None = None,
                timeout: int = 5) -> ldap3.Connection:
        """A bound ldap3 connection: StartTLS on the ldap:// port, or the ldaps:// port;
        anonymous when ``user`` is None. Raises ldap3's exceptions.

        ``timeout`` is whole seconds: ldap3 2.9.1 packs ``receive_timeout`` into a struct
        timeval with ``pack('LL', ...)``, so a float fails with ``struct.error`` before
        anything is sent (cannatag/ldap3 issue 1068).
        """
        server = ldap3.Server(self.ldaps_url if ldaps else self.url, use_ssl=ldaps,
                              tls=self.tls(ca_file), get_info=ldap3.NONE,
                              connect_timeout=timeout)
        conn = ldap3.Connection(server, user=user, password=password,
                                receive_timeout=timeout, raise_exceptions=True,
                                auto_bind=ldap3.AUTO_BIND_NONE)
        try:
            conn.open()
            if not ldaps:
                conn.start_tls()
            conn.bind()
        except BaseException:
            # the socket may be broken already (a failed handshake): keep the first error
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()
            raise
        return conn

    def admin(self) -> ldap3.Connection:
        return self.connect(self.admin_dn, self.admin_password)

    def service(self) -> ldap3.Connection:
        return self.connect(self.service_dn, self.service_password)

    def reader(self) -> ldap3.Connection:
        return self.connect(self.reader_dn, self.reader_password)

    def directory_config(self, **overrides: Any) -> dict[str, Any]:
        """keyrelay's ``directory:`` section for this server (``overrides`` go into ``ldap``)."""
        ldap: dict[str, Any] = {
            "urls": [self.url],
            "start_tls": True,
            "ca_file": str(self.ca_file),
            "base_dn": self.base_dn,
            "bind_dn": self.service_dn,
            "bind_password_file": str(self.service_password_file),
        }
        ldap.update(overrides)
        return {"backend": "ldap", "ldap": ldap}
