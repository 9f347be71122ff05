"""Backups of a keyrelay node: the directory and the private DKIM keys in one archive.

``keyrelay export`` writes the directory only (its records name the key files, which it does
not hold). A backup holds everything a new node needs to sign and answer as the old one did
(docs/directory.md, "Backups and upgrades"):

- a gzip'd tar archive (PAX), written to a temporary file created with mode 0600 in the
  output's folder, fsync'd, then linked (or, with ``force``, renamed) into place: no reader
  ever sees half an archive, and there is no moment when the archive is readable by others;
- ``manifest.json`` first: the archive format and its version, the keyrelay version, the
  backend read, the original ``dkim.key_dir``, and for every folder and key file its path
  below ``dkim.key_dir``, mode, owner and group (numbers and names) and, for files, size and
  SHA-256 (never the key itself);
- ``directory.yaml``: the directory as a YAML directory file (``yamlfile.render``), read
  through the backend (YAML or LDAP, as ``keyrelay export`` does);
- ``dkim/...``: every folder and regular file below ``dkim.key_dir``.

``read_backup`` trusts nothing in an archive: only the three kinds of member above, regular
files and folders only (no links, no devices), relative names without ``..``
(the rules here, and ``tarfile.data_filter`` too where Python has it: 3.11.4 and later;
Debian 12's 3.11.2 has not), every file's SHA-256 as the manifest
says, and a format version this code knows. ``restored_keys`` writes the key files below the
new node's ``dkim.key_dir`` (each through a temporary file created 0600, then renamed) with
their modes, and, as root, their owner and group by name.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import io
import json
import os
import pwd
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from . import __version__
from .directory.model import DirectoryData
from .directory.yamlfile import fsync_folder, parse_text, render
from .errors import ConfigError, KeyrelayError

FORMAT = "keyrelay-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DIRECTORY = "directory.yaml"
KEYS = "dkim"  # the folder of the archive that holds dkim.key_dir
ARCHIVE_MODE = 0o600


class BackupError(KeyrelayError):
    """A backup that cannot be made, or an archive that cannot be restored; nothing was
    written."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A folder or key file below dkim.key_dir ('/'-separated ``path``, '' for key_dir)."""

    path: str
    mode: int
    uid: int
    gid: int
    user: str
    group: str
    mtime: int
    size: int = 0
    sha256: str = ""  # '' for a folder

    @property
    def is_folder(self) -> bool:
        return not self.sha256

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "path": self.path, "mode": f"{self.mode:04o}", "uid": self.uid, "gid": self.gid,
            "user": self.user, "group": self.group, "mtime": self.mtime,
        }
        if not self.is_folder:
            doc.update(size=self.size, sha256=self.sha256)
        return doc


@dataclass
class Backup:
    """A backup as read back and checked: what ``restore`` writes."""

    archive: str
    version: int
    created: str
    keyrelay: str
    backend: str
    key_dir: str
    data: DirectoryData
    folders: list[Entry] = field(default_factory=list)
    files: list[tuple[Entry, bytes]] = field(default_factory=list)

    def __repr__(self) -> str:  # never the keys
        return f"<Backup {self.archive!r}: {len(self.files)} key files (not shown)>"


def counts(data: DirectoryData) -> str:
    """'2 accounts, 2 subusers, ... and 1 pools', as export says it."""
    return (f"{len(data.accounts)} accounts, {len(data.subusers)} subusers, "
            f"{len(data.keys)} keys, {len(data.domains)} domains, {len(data.senders)} senders "
            f"and {len(data.pools)} pools")


# -- writing ---------------------------------------------------------------------------------
def _names(st: os.stat_result) -> tuple[str, str]:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = ""
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = ""
    return user, group


def _entry(path: str, st: os.stat_result, content: bytes | None = None) -> Entry:
    user, group = _names(st)
    extra: dict[str, Any] = {}
    if content is not None:
        extra = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    return Entry(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, user, group,
                 int(st.st_mtime), **extra)


def collect_keys(key_dir: str, data: DirectoryData,
                 warn: Callable[[str], None]) -> tuple[list[Entry], list[tuple[Entry, bytes]]]:
    """The folders and files below ``key_dir``. Refused: anything but a regular file or a
    folder there (a link could point anywhere), and a key file the directory names outside
    ``key_dir`` (restore puts keys below the new node's dkim.key_dir only). A named key file
    that is missing is a warning: the domain cannot sign here either."""
    root = os.path.abspath(key_dir)
    for domain in data.domains.values():
        for sel in domain.selectors:
            named = os.path.abspath(sel.key_file)
            if os.path.commonpath([root, named]) != root:
                raise BackupError(
                    f"domain {domain.name} selector {sel.name}: its key file {sel.key_file} is "
                    f"not below dkim.key_dir {key_dir}: a backup holds the keys below "
                    "dkim.key_dir only; set dkim.key_dir to the folder that holds them")
            if not os.path.isfile(named):
                warn(f"domain {domain.name} selector {sel.name}: key file {sel.key_file} is "
                     "missing: the backup holds no key for it")
    folders: list[Entry] = []
    files: list[tuple[Entry, bytes]] = []
    if not os.path.lexists(root):
        return folders, files
    if not os.path.isdir(root) or os.path.islink(root):
        raise BackupError(f"dkim.key_dir {key_dir} is not a folder")
    for top, dirs, names in os.walk(root, onerror=_raise):
        rel_top = os.path.relpath(top, root)
        rel_top = "" if rel_top == "." else rel_top
        folders.append(_entry(rel_top.replace(os.sep, "/"), os.lstat(top)))
        for name in sorted(names) + [d for d in sorted(dirs)
                                     if os.path.islink(os.path.join(top, d))]:
            full = os.path.join(top, name)
            rel = os.path.join(rel_top, name).replace(os.sep, "/")
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                raise BackupError(f"{full} is not a regular file (a link or a special file): "
                                  "a backup holds the regular files and folders of "
                                  "dkim.key_dir only; move it away")
            with open(full, "rb") as handle:
                content = handle.read()
            files.append((_entry(rel, st, content), content))
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(top, d)))
    return folders, files


def _raise(exc: OSError) -> None:
    raise exc


def write_backup(output: str, data: DirectoryData, key_dir: str, backend: str, now: datetime,
                 warn: Callable[[str], None], force: bool = False) -> Backup:
    """Write the archive to ``output`` atomically, mode 0600 from its creation; an existing
    ``output`` is replaced only with ``force``."""
    if os.path.lexists(output) and not force:
        raise BackupError(f"{output} exists: name a new file, or run with --force to replace "
                          "it")
    folders, files = collect_keys(key_dir, data, warn)
    text = render(data).encode("utf-8")
    stamp = int(now.timestamp())
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "keyrelay": __version__,
        "backend": backend,
        "key_dir": os.path.abspath(key_dir),
        "directory": {"size": len(text), "sha256": hashlib.sha256(text).hexdigest()},
        "folders": [f.doc() for f in folders],
        "files": [f.doc() for f, _ in files],
    }
    folder = os.path.dirname(os.path.abspath(output))
    # mkstemp creates the file with mode 0600: the keys are never readable by others
    try:
        fd, tmp = tempfile.mkstemp(prefix=".keyrelay-backup.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BackupError(f"cannot write {output}: cannot create a file in {folder}: "
                          f"{exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                _add(tar, MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), stamp)
                _add(tar, DIRECTORY, text, stamp)
                for entry in folders:
                    info = tarfile.TarInfo(_member(entry.path))
                    info.type = tarfile.DIRTYPE
                    _own(info, entry)
                    tar.addfile(info)
                for entry, content in files:
                    info = tarfile.TarInfo(_member(entry.path))
                    info.size = len(content)
                    _own(info, entry)
                    tar.addfile(info, io.BytesIO(content))
            raw.flush()
            os.fsync(raw.fileno())
        if force:
            os.replace(tmp, output)
        else:
            _put_in_place(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)
    return Backup(output, FORMAT_VERSION, str(manifest["created"]), __version__, backend,
                  os.path.abspath(key_dir), data, folders, files)


def _put_in_place(tmp: str, output: str) -> None:
    """Link ``tmp`` as ``output``, which must not exist: a file made there meanwhile is never
    replaced. A file system without hard links (vfat) gets a rename after a last look."""
    exists = BackupError(f"{output} exists: name a new file, or run with --force to replace it")
    try:
        os.link(tmp, output)
    except FileExistsError:
        raise exists from None
    except OSError:
        if os.path.lexists(output):
            raise exists from None
        os.rename(tmp, output)
        return
    os.unlink(tmp)


def _member(rel: str) -> str:
    return f"{KEYS}/{rel}" if rel else KEYS


def _add(tar: tarfile.TarFile, name: str, content: bytes, stamp: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(content), 0o600, stamp
    tar.addfile(info, io.BytesIO(content))


def _own(info: tarfile.TarInfo, entry: Entry) -> None:
    info.mode, info.mtime = entry.mode, entry.mtime
    info.uid, info.gid, info.uname, info.gname = entry.uid, entry.gid, entry.user, entry.group


# -- reading ---------------------------------------------------------------------------------
def read_backup(archive: str, key_dir: str) -> Backup:
    """The archive, checked whole before anything is written; its selectors' key files
    moved from the original dkim.key_dir to ``key_dir``. Raises ``BackupError`` with one
    line naming the archive and what is wrong."""
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except FileNotFoundError:
        raise BackupError(f"{archive}: file not found") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.strerror:
            raise BackupError(f"{archive}: {exc.strerror}") from None
        raise BackupError(f"{archive}: not a keyrelay backup (not a gzip'd tar archive)") from None
    with tar:
        try:
            members = _checked_members(archive, tar)
            contents = {name: _read(tar, info) for name, info in members.items()
                        if info.isfile()}
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise BackupError(f"{archive}: the archive is damaged ({exc})") from None
    manifest = _manifest(archive, contents)
    return _backup(archive, manifest, members, contents, key_dir)


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    assert handle is not None  # a regular file
    return handle.read()


_DATA_FILTER: Callable[[tarfile.TarInfo, str], tarfile.TarInfo] | None = getattr(
    tarfile, "data_filter", None)


def _checked_members(archive: str, tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for info in tar.getmembers():
        name = info.name

        def bad(reason: str, name: str = name) -> BackupError:
            return BackupError(f"{archive}: member {name!r}: {reason}; nothing was restored")

        if _DATA_FILTER is not None:  # Python 3.11.4 and later; Debian 12 has 3.11.2
            try:  # absolute names, names leaving the tree, links out of it, special files
                _DATA_FILTER(info, "/nonexistent/restore")
            except tarfile.TarError as exc:  # FilterError
                raise bad(f"refused ({exc})") from None
        # the same rules, and stricter ones, whatever the Python: nothing is extracted by
        # tarfile itself, each file's bytes are read and written by restored_keys
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise bad("not a plain relative name")
        if not (info.isfile() or info.isdir()):
            raise bad("a link or special file (a backup holds regular files and folders only)")
        if name not in (MANIFEST, DIRECTORY) and parts[0] != KEYS:
            raise bad("not part of a keyrelay backup")
        if name in (MANIFEST, DIRECTORY) and not info.isfile():
            raise bad("expected a file")
        if name in members:
            raise bad("given twice")
        members[name] = info
    return members


def _manifest(archive: str, contents: dict[str, bytes]) -> dict[str, Any]:
    if MANIFEST not in contents:
        raise BackupError(f"{archive}: not a keyrelay backup (it has no {MANIFEST})")
    try:
        manifest = json.loads(contents[MANIFEST])
    except ValueError:
        raise BackupError(f"{archive}: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{archive}: not a keyrelay backup ({MANIFEST} does not say "
                          f"format: {FORMAT})")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BackupError(f"{archive}: {MANIFEST}: version: expected a format version, got "
                          f"{version!r}")
    if version > FORMAT_VERSION:
        raise BackupError(
            f"{archive} is keyrelay backup format version {version} (written by keyrelay "
            f"{manifest.get('keyrelay', '?')}); this keyrelay ({__version__}) reads version "
            f"{FORMAT_VERSION}: restore it with a keyrelay at least as new as the one that "
            "wrote it")
    return manifest


def _backup(archive: str, manifest: dict[str, Any], members: dict[str, tarfile.TarInfo],
            contents: dict[str, bytes], key_dir: str) -> Backup:
    def bad(reason: str) -> BackupError:
        return BackupError(f"{archive}: {reason}; nothing was restored")

    try:
        old_dir = str(manifest["key_dir"])
        expected = manifest["directory"]
        folders = [_entry_of(doc) for doc in manifest["folders"]]
        files = [_entry_of(doc) for doc in manifest["files"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"{MANIFEST} is incomplete or malformed ({exc})") from None
    if DIRECTORY not in contents:
        raise bad(f"it has no {DIRECTORY}")
    text = contents[DIRECTORY]
    if hashlib.sha256(text).hexdigest() != expected.get("sha256"):
        raise bad(f"{DIRECTORY} does not match its SHA-256 in {MANIFEST} (damaged)")
    listed = {_member(e.path) for e in [*folders, *files]}
    for name in members:
        if name not in (MANIFEST, DIRECTORY) and name not in listed:
            raise bad(f"member {name!r} is not in {MANIFEST}")
    read: list[tuple[Entry, bytes]] = []
    for entry in files:
        content = contents.get(_member(entry.path))
        if content is None:
            raise bad(f"{MANIFEST} lists {_member(entry.path)}, which the archive lacks")
        if hashlib.sha256(content).hexdigest() != entry.sha256:
            raise bad(f"{_member(entry.path)} does not match its SHA-256 in {MANIFEST} "
                      "(damaged)")
        read.append((entry, content))
    try:
        data = parse_text(text.decode("utf-8"), f"{archive}:{DIRECTORY}")
    except UnicodeDecodeError:
        raise bad(f"{DIRECTORY} is not UTF-8") from None
    except ConfigError as exc:
        raise BackupError(f"{exc}; nothing was restored") from None
    root = os.path.abspath(old_dir)
    for domain in data.domains.values():
        for sel in domain.selectors:  # a key file elsewhere would be read, and deleted later
            if os.path.commonpath([root, os.path.abspath(sel.key_file)]) != root:
                raise bad(f"domain {domain.name} selector {sel.name}: its key file "
                          f"{sel.key_file} is not below the backup's dkim.key_dir {old_dir}")
    return Backup(archive, int(manifest["version"]), str(manifest.get("created", "?")),
                  str(manifest.get("keyrelay", "?")), str(manifest.get("backend", "?")),
                  old_dir, moved_key_files(data, old_dir, key_dir), folders, read)


def _entry_of(doc: Any) -> Entry:
    if not isinstance(doc, dict):
        raise ValueError(f"expected a mapping, got {doc!r}")
    path = str(doc["path"])
    if path and any(p in ("", ".", "..") for p in path.split("/")):
        raise ValueError(f"path {path!r}")
    mode = int(str(doc["mode"]), 8)
    if mode & ~0o7777:
        raise ValueError(f"mode {doc['mode']!r}")
    return Entry(path, mode & 0o777, int(doc["uid"]), int(doc["gid"]), str(doc["user"]),
                 str(doc["group"]), int(doc["mtime"]), int(doc.get("size", 0)),
                 str(doc.get("sha256", "")))


def moved_key_files(data: DirectoryData, old_dir: str, new_dir: str) -> DirectoryData:
    """``data`` with each selector's key file below ``old_dir`` named below ``new_dir``."""
    old_root, new_root = os.path.abspath(old_dir), os.path.abspath(new_dir)
    moved = data.copy()
    for name, domain in data.domains.items():
        selectors = []
        for sel in domain.selectors:
            path = os.path.abspath(sel.key_file)
            if os.path.commonpath([old_root, path]) == old_root:
                path = os.path.join(new_root, os.path.relpath(path, old_root))
                sel = replace(sel, key_file=path)
            selectors.append(sel)
        moved.domains[name] = replace(domain, selectors=tuple(selectors))
    return moved


# -- restoring the key files -----------------------------------------------------------------
def clashes(backup: Backup, key_dir: str) -> list[str]:
    """The backup's key files that already exist below ``key_dir``."""
    return [path for entry, _ in backup.files
            if os.path.lexists(path := _target(key_dir, entry))]


def _target(key_dir: str, entry: Entry) -> str:
    return os.path.join(os.path.abspath(key_dir), *entry.path.split("/")) if entry.path else (
        os.path.abspath(key_dir))


@contextlib.contextmanager
def restored_keys(backup: Backup, key_dir: str, warn: Callable[[str], None],
                  named: Callable[[], set[str]]) -> Iterator[list[str]]:
    """Write the backup's folders and key files below ``key_dir`` (replacing files there),
    yield the files made that did not exist before. When the block fails they are deleted
    again, except those the directory names by then (``named``: a Ctrl-C can land after its
    write) or when it cannot be read (kept, with a warning); a file it replaced stays
    replaced: ``--force`` said so."""
    made: list[str] = []
    warn = _once(warn)  # an owner missing here is told once, not for every file
    try:
        owner = _owner_for(key_dir)
        for entry in backup.folders:
            path = _target(key_dir, entry)
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, entry.mode)
            _chown(path, entry, owner, warn)
        for entry, content in backup.files:
            path = _target(key_dir, entry)
            existed = os.path.lexists(path)
            _write_file(path, entry, content, owner, warn)
            if not existed:
                made.append(path)
        yield made
    except BaseException:
        try:
            kept = named()
        except (KeyrelayError, OSError) as exc:
            for path in made:
                warn(f"kept {path}: cannot tell whether the directory names it ({exc})")
            raise
        for path in made:
            if os.path.abspath(path) not in kept:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        raise


def _once(warn: Callable[[str], None]) -> Callable[[str], None]:
    told: set[str] = set()

    def once(text: str) -> None:
        if text not in told:
            told.add(text)
            warn(text)
    return once


def _owner_for(key_dir: str) -> tuple[int, int]:
    """Who owns a file whose recorded owner has no account here: the nearest existing folder
    of ``key_dir`` (the deployment gives dkim.key_dir to the daemons' user)."""
    probe = os.path.abspath(key_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    st = os.stat(probe)
    return st.st_uid, st.st_gid


def _chown(path: str, entry: Entry, fallback: tuple[int, int],
           warn: Callable[[str], None], fd: int | None = None) -> None:
    """As root: the recorded owner and group by name (numbers differ between hosts), else
    ``fallback``'s, with a warning. Not as root: the files are this user's."""
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam(entry.user).pw_uid if entry.user else -1
    except KeyError:
        uid = -1
    try:
        gid = grp.getgrnam(entry.group).gr_gid if entry.group else -1
    except KeyError:
        gid = -1
    if uid == -1 or gid == -1:
        warn(f"the backup's owner {entry.user or entry.uid}:{entry.group or entry.gid} has no "
             f"account here: its key files and folders go to the owner of dkim.key_dir "
             f"({fallback[0]}:{fallback[1]})")
        uid, gid = fallback
    if fd is not None:
        os.fchown(fd, uid, gid)
    else:
        os.chown(path, uid, gid)


def _write_file(path: str, entry: Entry, content: bytes, owner: tuple[int, int],
                warn: Callable[[str], None]) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".restore.", suffix=".tmp", dir=folder)  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), entry.mode)
            _chown(path, entry, owner, warn, fd=handle.fileno())
            os.fsync(handle.fileno())
        os.utime(tmp, (entry.mtime, entry.mtime))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)
