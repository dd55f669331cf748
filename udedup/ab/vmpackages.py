"""Debian packages for the VM lab, fetched without installing them, and the cache they go to.

- the guest kernel: the versioned package ``linux-image-amd64`` depends on (e.g.
  ``linux-image-6.1.0-57-amd64``), ``apt-get download``-ed and unpacked into the cache
  (``dpkg-deb --fsys-tarfile``, only ``/boot/vmlinuz-*`` kept); when the bzImage's payload is a
  compression the standard library reads and the kernel carries the PVH note, its uncompressed
  ``vmlinux`` is kept too: QEMU boots that directly, saving the seconds TCG spends decompressing;
- a static busybox: the installed ``busybox-static`` one, else fetched the same way.

apt answers are remembered in the cache until apt's lists change (``apt-cache`` takes seconds per
call); ``apt-get update`` runs once when apt does not know a package; offline, a kernel fetched
earlier is used.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib

from ..errors import WorkloadError

KERNEL_META = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"


def cache_dir() -> str:
    """``$UDEDUP_VM_CACHE``, else ``$XDG_CACHE_HOME/udedup/vm``, else ``/var/cache/udedup/vm`` for
    root, else ``~/.cache/udedup/vm``."""
    if os.environ.get("UDEDUP_VM_CACHE"):
        return os.environ["UDEDUP_VM_CACHE"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "udedup", "vm")
    if os.geteuid() == 0:
        return "/var/cache/udedup/vm"
    return os.path.join(os.path.expanduser("~"), ".cache", "udedup", "vm")


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- Debian packages, fetched without installing them ----------------------------------------------
def _apt(argv: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise WorkloadError(f"{argv[0]} not found: the VM lab fetches Debian packages with apt; on "
                            "another system pass --vm-kernel PATH and --vm-initrd PATH")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"})


def _apt_show_version(package: str) -> str | None:
    res = _apt(["apt-cache", "show", "--no-all-versions", package])
    for line in res.stdout.splitlines() if res.returncode == 0 else ():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def parse_depends(text: str, prefix: str) -> str | None:
    """The first package named ``prefix...`` in ``apt-cache depends`` output."""
    for line in text.splitlines():
        key, _, value = line.strip().lstrip("|").partition(":")
        if key.strip() in ("Depends", "PreDepends") and value.strip().startswith(prefix):
            return value.strip().split()[0]
    return None


def resolve_package(package: str, depends_prefix: str | None = None,
                    updated: list | None = None) -> tuple[str, str]:
    """``(name, version)`` of ``package`` (or of the ``depends_prefix`` package it depends on), with
    one ``apt-get update`` if apt does not know it yet."""
    updated = [] if updated is None else updated
    for attempt in (0, 1):
        name = package
        if depends_prefix:
            res = _apt(["apt-cache", "depends", package])
            name = parse_depends(res.stdout, depends_prefix) if res.returncode == 0 else None
        version = _apt_show_version(name) if name else None
        if version:
            return name, version
        if attempt == 0 and not updated:
            updated.append(True)
            _apt(["apt-get", "update", "-q"])
    raise WorkloadError(f"apt has no package {package!r} (even after apt-get update): add a Debian "
                        "repository, or pass --vm-kernel PATH / --vm-initrd PATH of your own")


def fetch_member(package: str, version: str, pattern: str, dest: str) -> str:
    """Download ``package`` (``apt-get download``, not installed) and copy the one file of its
    contents matching ``pattern`` (e.g. ``./boot/vmlinuz-*``) to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="udedup-vm-") as tmp:
        os.chmod(tmp, 0o755)
        res = _apt(["apt-get", "download", "-q", f"{package}={version}"], cwd=tmp)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        if res.returncode != 0 or not debs:
            tail = (res.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise WorkloadError(f"apt-get download {package}={version} failed: {tail}")
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", os.path.join(tmp, debs[0])],
                               stdout=subprocess.PIPE)
        found = None
        try:
            with tarfile.open(fileobj=tar.stdout, mode="r|") as archive:
                for member in archive:
                    if member.isfile() and fnmatch.fnmatch(member.name, pattern):
                        write_atomic(dest, archive.extractfile(member).read(), 0o755)
                        found = member.name
                        break
        finally:
            tar.stdout.close()
            tar.kill()
            tar.wait()
        if found is None:
            raise WorkloadError(f"package {package}={version} has no file matching {pattern}")
    return found


def _apt_lists_stamp() -> str:
    """Changes when ``apt-get update`` ran (what apt knows may then have changed)."""
    stamps = []
    for path in ("/var/lib/apt/lists", "/etc/apt/sources.list", "/etc/apt/sources.list.d"):
        try:
            stamps.append(str(os.stat(path).st_mtime_ns))
        except OSError:
            stamps.append("-")
    return ":".join(stamps)


def resolve_cached(cache: str, package: str, depends_prefix: str | None = None) -> tuple[str, str]:
    """:func:`resolve_package`, remembered in the cache until apt's lists change (apt-cache takes
    seconds per call)."""
    memo = os.path.join(cache, "apt-resolved.json")
    key = json.dumps([package, depends_prefix, _apt_lists_stamp()])
    try:
        with open(memo) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    if key in saved:
        return tuple(saved[key])
    found = resolve_package(package, depends_prefix)
    saved = {k: v for k, v in saved.items() if json.loads(k)[:2] != [package, depends_prefix]}
    saved[key] = list(found)
    try:
        write_atomic(memo, json.dumps(saved).encode())
    except OSError:
        pass
    return found


def bzimage_payload(image: bytes) -> bytes | None:
    """The uncompressed kernel (an ELF ``vmlinux``) inside a bzImage, when its compression is one
    the standard library reads (xz, gzip); else None."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start:start + length]
    try:
        if payload[:6] == b"\xfd7zXZ\x00":
            out = lzma.LZMADecompressor().decompress(payload)
        elif payload[:2] == b"\x1f\x8b":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        else:
            return None
    except (lzma.LZMAError, zlib.error):
        return None
    return out if out[:4] == b"\x7fELF" else None


def has_pvh_note(elf: bytes) -> bool:
    """Whether a vmlinux carries the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18), with which
    QEMU boots it directly, skipping the decompression that takes seconds under TCG."""
    return any(struct.pack("<III4s", 4, size, 18, b"Xen\0") in elf for size in (4, 8))


def ensure_kernel(cache: str | None = None) -> tuple[str, dict]:
    """The cached Debian kernel (downloaded on first use): ``(path, info)``. The path is the
    uncompressed ``vmlinux`` when it boots by PVH, else the ``vmlinuz`` bzImage."""
    cache = cache or cache_dir()
    try:
        name, version = resolve_cached(cache, KERNEL_META, depends_prefix="linux-image-")
    except WorkloadError:
        # offline or no apt: a kernel fetched earlier will do
        kept = sorted(glob.glob(os.path.join(cache, "kernel", "*", "vmlinuz")), key=os.path.getmtime)
        if not kept:
            raise
        name, _, version = os.path.basename(os.path.dirname(kept[-1])).partition("_")
    folder = os.path.join(cache, "kernel", f"{name}_{version}")
    bzimage, elf = os.path.join(folder, "vmlinuz"), os.path.join(folder, "vmlinux")
    hit = os.path.isfile(bzimage)
    if not hit:
        fetch_member(name, version, "./boot/vmlinuz-*", bzimage)
    if not os.path.isfile(elf) and not os.path.isfile(elf + ".none"):
        with open(bzimage, "rb") as f:
            vmlinux = bzimage_payload(f.read())
        ok = vmlinux is not None and has_pvh_note(vmlinux)
        write_atomic(elf if ok else elf + ".none", vmlinux if ok else b"")
    path = elf if os.path.isfile(elf) else bzimage
    return path, {"kernel_package": name, "kernel_version": version, "kernel_cached": hit,
                  "kernel_boot": "pvh" if path == elf else "bzimage"}


def is_static_elf(path: str) -> bool:
    """An ELF executable with no program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:      # 64-bit only
                return False
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(int.from_bytes(table[i:i + 4], "little") != 3      # PT_INTERP
               for i in range(0, len(table), phentsize))


def ensure_busybox(cache: str | None = None, installed: str = "/bin/busybox") -> tuple[str, dict]:
    """A static busybox: the installed ``busybox-static`` one, else fetched into the cache."""
    if is_static_elf(installed):
        return installed, {"busybox": installed}
    cache = cache or cache_dir()
    name, version = resolve_cached(cache, BUSYBOX_PACKAGE)
    path = os.path.join(cache, "busybox", version, "busybox")
    if not os.path.isfile(path):
        fetch_member(name, version, "./bin/busybox", path)
    return path, {"busybox": path, "busybox_version": version}
