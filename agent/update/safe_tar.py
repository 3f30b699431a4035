"""Extract an update's tar by our own rules, the same on every Python the agent runs on.

Why not ``tarfile``'s own ``extractall(filter="data")``: the ``filter`` argument
first shipped in the security releases of 2023 (3.8.17, 3.9.17, 3.10.12, 3.11.4),
and the stock Python of Debian 12 / Raspberry Pi OS is 3.11.2, where passing it is
a ``TypeError`` — every update failed there. Rather than depend on which patch
release a device carries, the agent checks every member itself, before writing
anything, and writes the files itself:

- a member name must be a relative path of plain components: no leading ``/``, no
  ``..``, no backslash, no control character (NUL included), no component longer
  than a file name may be; ``.`` components are dropped;
- only regular files and directories: symbolic and hard links, character and block
  devices, FIFOs, sparse members (GNU type ``S`` and PAX ``GNU.sparse.*``) and every
  other type are refused — a model bundle never needs them, and each one is a known
  way to write outside the destination or to expand past what was signed;
- a name appears once, and never both as a file and as a directory;
- at most ``max_members`` members, and at most ``bound`` bytes in all: declared sizes
  are summed before anything is written, and the bytes are counted again as they are
  written, so a header whose size lies cannot get past the bound;
- files are created new (``O_EXCL``, ``O_NOFOLLOW``) with mode 0644 and directories
  with 0755 — never setuid/setgid, never the archive's owner or mode — and every
  directory on the way is opened without following a symbolic link, so even a
  destination someone planted a link in is never written through.

Every refusal is an ``UnsafeArchive`` subclass (``agent.errors``) naming the member.
This module imports only the standard library and ``agent.errors`` so that it runs,
and is tested, under a bare ``/usr/bin/python3``.
"""

from __future__ import annotations

import errno
import os
import tarfile
from pathlib import Path

from agent.errors import ArchiveTooLarge, UnsafeArchive, UnsafeMemberPath, UnsafeMemberType

__all__ = ["DEFAULT_MAX_MEMBERS", "extract", "extract_path"]

DEFAULT_MAX_MEMBERS = 10_000  # a bundle holds a handful; a cap keeps a header flood from costing memory and inodes
_CHUNK = 1024 * 1024
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_NAME_MAX = 255  # bytes per component (ext4, f2fs, vfat's long names): longer would fail half-way as an OSError
_O_BINARY = getattr(os, "O_BINARY", 0)


def extract_path(archive: str | Path, dest: str | Path, bound: int, *, max_members: int = DEFAULT_MAX_MEMBERS) -> list[str]:
    """Open ``archive`` as an *uncompressed* tar and ``extract`` it into ``dest``.

    Uncompressed only (``r:``), on purpose: the signed artifacts are plain tars, and
    a plain tar cannot hold more file bytes than its own length, so the signed length
    is a sound ``bound``. Raises ``tarfile.TarError`` for a file that is not a tar.
    """
    with tarfile.open(archive, mode="r:") as tar:
        return extract(tar, dest, bound, max_members=max_members)


def extract(tar: tarfile.TarFile, dest: str | Path, bound: int, *, max_members: int = DEFAULT_MAX_MEMBERS) -> list[str]:
    """Check every member of ``tar``, then write them under the existing directory ``dest``.

    ``bound`` caps the total bytes of all files. Returns the relative paths of the
    files written, in archive order. Nothing is written when a member's name, type or
    declared size is refused; a refusal while writing (a header that lied, a link already
    in ``dest``) leaves partial files under ``dest`` only, which the caller removes with the rest of it.
    """
    if bound < 0:
        raise ValueError(f"bound must be >= 0, not {bound}")
    plan = _plan(tar, bound, max_members)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _write(tar, root, plan, bound)
    finally:
        os.close(root)


MAX_DEPTH = 32  # path components of one member: bundles are a few levels deep


def _parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's name as plain path components, or ``UnsafeMemberPath`` saying why not."""
    name = member.name
    if not name:
        raise UnsafeMemberPath("a member has an empty name")
    if name.startswith("/"):
        raise UnsafeMemberPath(f"{name!r}: an absolute path")
    if "\\" in name:
        raise UnsafeMemberPath(f"{name!r}: a backslash (a path separator elsewhere)")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafeMemberPath(f"{name!r}: a control character in the name")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeMemberPath(f"{name!r}: a '..' component")
    if len(parts) > MAX_DEPTH:  # a 10 KB tar 1,200 deep made shutil.rmtree raise RecursionError in the cleanup
        raise UnsafeMemberPath(f"{name[:64]!r}...: nested {len(parts)} deep (at most {MAX_DEPTH})")
    for p in parts:
        if len(os.fsencode(p)) > _NAME_MAX:
            raise UnsafeMemberPath(f"{name[:64]!r}...: a component longer than {_NAME_MAX} bytes")
    return parts


def _check_type(member: tarfile.TarInfo) -> None:
    """Only plain files and directories; sparse is tested first because ``isreg()`` is true for it."""
    name = member.name
    if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in member.pax_headers):
        raise UnsafeMemberType(f"{name!r}: a sparse member (expands past its stored bytes)")
    if member.issym():
        raise UnsafeMemberType(f"{name!r}: a symbolic link (to {member.linkname!r})")
    if member.islnk():
        raise UnsafeMemberType(f"{name!r}: a hard link (to {member.linkname!r})")
    if member.ischr() or member.isblk():
        raise UnsafeMemberType(f"{name!r}: a device node")
    if member.isfifo():
        raise UnsafeMemberType(f"{name!r}: a FIFO")
    if not (member.isreg() or member.isdir()):
        raise UnsafeMemberType(f"{name!r}: tar type {member.type!r} is neither a file nor a directory")


def _plan(tar: tarfile.TarFile, bound: int, max_members: int) -> list[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    """First pass, headers only: every refusal that can be made before a byte is written."""
    plan: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
    kinds: dict[tuple[str, ...], str] = {}  # path -> "file" | "dir" (explicit or implied by a deeper member)
    declared = 0
    for count, member in enumerate(tar, start=1):
        if count > max_members:
            raise ArchiveTooLarge(f"more than {max_members} members")
        parts = _parts(member)
        _check_type(member)
        for depth in range(1, len(parts)):
            if kinds.setdefault(parts[:depth], "dir") != "dir":
                raise UnsafeMemberPath(f"{member.name!r}: {'/'.join(parts[:depth])!r} is a file earlier in the archive")
        if member.isdir():
            if parts and kinds.setdefault(parts, "dir") != "dir":
                raise UnsafeMemberPath(f"{member.name!r}: a directory and a file of the same name")
        else:
            if not parts:
                raise UnsafeMemberPath(f"{member.name!r}: a file with no name")
            if parts in kinds:
                raise UnsafeMemberPath(f"{member.name!r}: appears twice (a later copy would replace the first)")
            kinds[parts] = "file"
            if member.size < 0:
                raise UnsafeArchive(f"{member.name!r}: a negative size")
            declared += member.size
            if declared > bound:
                raise ArchiveTooLarge(f"{member.name!r}: the files declare more than the bound of {bound} bytes")
        plan.append((member, parts))
    return plan


def _open_dir(parent: int, name: str) -> int:
    """A directory fd for ``name`` under ``parent``, created if missing; never through a symbolic link, whoever made it."""
    try:
        os.mkdir(name, _DIR_MODE, dir_fd=parent)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise UnsafeMemberPath(f"{name!r} exists in the destination and is not a plain directory") from exc
    os.fchmod(fd, _DIR_MODE)  # neither the umask nor a mode found there decides it
    return fd


def _dir_fd(root: int, parts: tuple[str, ...]) -> int:
    """An fd for the directory ``parts`` under ``root``, creating what is missing (the caller closes it)."""
    fd = os.dup(root)
    try:
        for p in parts:
            nxt = _open_dir(fd, p)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(tar: tarfile.TarFile, root: int, plan: list[tuple[tarfile.TarInfo, tuple[str, ...]]], bound: int) -> list[str]:
    """Second pass: create directories and stream file bytes, counting every byte written against ``bound``."""
    written: list[str] = []
    total = 0
    for member, parts in plan:
        if member.isdir():
            os.close(_dir_fd(root, parts))
            continue
        source = tar.extractfile(member)
        if source is None:  # only for types _plan already refused; never write a half-understood member
            raise UnsafeMemberType(f"{member.name!r}: no file data")
        parent = _dir_fd(root, parts[:-1])
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | _O_BINARY
            try:
                out = os.open(parts[-1], flags, _FILE_MODE, dir_fd=parent)
            except FileExistsError as exc:
                raise UnsafeMemberPath(f"{member.name!r} exists in the destination already") from exc
        finally:
            os.close(parent)
        size = 0
        with source, os.fdopen(out, "wb") as f:
            os.fchmod(out, _FILE_MODE)
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                total += len(chunk)
                if total > bound:
                    raise ArchiveTooLarge(f"{member.name!r}: more than the bound of {bound} bytes written")
                f.write(chunk)
        if size != member.size:
            raise UnsafeArchive(f"{member.name!r}: {size} bytes where the header says {member.size}")
        written.append("/".join(parts))
    return written
