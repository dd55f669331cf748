"""The VM lab's guest image, built on first use from Debian packages and cached.

A guest is Debian's kernel and a busybox initramfs:

- the kernel comes from the versioned package ``linux-image-amd64`` depends on (e.g.
  ``linux-image-6.1.0-57-amd64``), fetched with ``apt-get download`` and unpacked into the cache
  (never installed on the host); only ``/boot/vmlinuz-*`` is kept;
- the initramfs is a newc cpio written here: ``/bin/busybox`` from ``busybox-static`` (the installed
  one, else fetched the same way), an ``/init`` script (:data:`INIT_SCRIPT`), and ``/shared``:
  files of pseudo-random bytes drawn from a seed every guest shares, so every guest holds the same
  files (page cache in its rootfs) without spending guest CPU to make them.

What ``/init`` does, from ``udedup.*`` words of the kernel command line (:func:`guest_cmdline`):
unique data (``udedup.unique`` MiB: the shared bytes read at a byte offset drawn from the guest's own
``udedup.seed``, so no page equals another guest's or a shared page), zero memory (``udedup.zero``
MiB written and freed; ``init_on_free=1`` zeroes every page the guest frees, the initrd too), a
little memory rewritten every second (``udedup.volatile`` KiB), then :data:`READY_MARKER` on the
serial console, and it idles.

The cache (:func:`cache_dir`) is keyed by versions: the kernel by its package and version, the
busybox by its package version, an initramfs by a hash of busybox, the init script and the shared
layout; a second build is a cache hit.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import zlib

import numpy as np

from ..errors import WorkloadError

KERNEL_META = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
READY_MARKER = "UDEDUP-VM-READY"
BOOT_MARKER = "UDEDUP-VM-BOOT"
#: Guest seeds are 0..MAX_GUEST_SEED: with at most UNIQUE_PASSES passes over the shared bytes per
#: guest, the byte offsets ``1 + seed * UNIQUE_PASSES + pass`` never repeat and are never 0 (mod 4096).
UNIQUE_PASSES = 64
MAX_GUEST_SEED = 62
#: Bumped when the layout of the image changes (so an old cache entry is not taken for a new one).
IMAGE_FORMAT = 1
_KEEP_INITRDS = 4

INIT_SCRIPT = r"""#!/bin/busybox sh
# udedup VM lab guest (image format %(format)d): fill memory with a known mix, say ready, idle.
/bin/busybox mkdir -p /proc /sys /dev /data /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "%(boot)s"
seed=0; unique=0; zero=0; volatile=0; probe=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        udedup.seed=*) seed=${arg#*=} ;;
        udedup.unique=*) unique=${arg#*=} ;;
        udedup.zero=*) zero=${arg#*=} ;;
        udedup.volatile=*) volatile=${arg#*=} ;;
        udedup.probe=*) probe=1 ;;
    esac
done
[ "$probe" = 1 ] && poweroff -f
mount -t tmpfs -o size=100%% tmpfs /data
# unique: the shared bytes read from an offset no other guest (and no page boundary) uses
want=$((unique * 1048576)); have=0; pass=0
while [ "$have" -lt "$want" ] && [ "$pass" -lt %(passes)d ]; do
    off=$((1 + seed * %(passes)d + pass))
    for f in /shared/*; do
        [ "$have" -lt "$want" ] || break
        dd if="$f" of=/data/unique bs=65536 iflag=skip_bytes,count_bytes oflag=append \
            conv=notrunc skip="$off" count=$((want - have)) 2>/dev/null
        have=$(stat -c %%s /data/unique)
    done
    pass=$((pass + 1))
done
# zero: written, then freed (init_on_free=1 keeps freed pages zero)
if [ "$zero" -gt 0 ]; then
    dd if=/dev/zero of=/data/zero bs=1048576 count="$zero" 2>/dev/null; rm -f /data/zero
fi
# volatile: rewritten in place every second
if [ "$volatile" -gt 0 ]; then
    dd if=/dev/urandom of=/data/volatile bs=1024 count="$volatile" 2>/dev/null
    ( while :; do
        dd if=/dev/urandom of=/data/volatile bs=1024 count="$volatile" conv=notrunc 2>/dev/null
        sleep 1
      done ) &
fi
sync
echo "%(ready)s seed=$seed unique_bytes=$have $(grep MemFree /proc/meminfo | tr -s ' ')"
while :; do sleep 3600; done
""" % {"format": IMAGE_FORMAT, "boot": BOOT_MARKER, "ready": READY_MARKER, "passes": UNIQUE_PASSES}


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs on disk, and where they came from."""

    kernel: str
    initrd: str
    info: dict

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "initrd": self.initrd, **self.info}


# --- the cache ------------------------------------------------------------------------------------
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


# --- the initramfs -------------------------------------------------------------------------------
def cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)
               ) -> bytes:
    """One entry of a newc ("070701") cpio archive, padded to 4 bytes."""
    nlink = 2 if mode & 0o170000 == 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    out = b"070701" + "".join(f"{v:08x}" for v in fields).encode() + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    return out + data + b"\0" * (-len(data) % 4)


def cpio_archive(entries) -> bytes:
    """``entries``: ``(name, mode, data[, rdev])``; directories first as given; the trailer added."""
    parts = [cpio_entry(e[0], e[1], e[2], ino=i + 1, rdev=e[3] if len(e) > 3 else (0, 0))
             for i, e in enumerate(entries)]
    parts.append(cpio_entry("TRAILER!!!", 0))
    return b"".join(parts)


def shared_files(total: int, seed: int, page_size: int = 4096) -> list[tuple[str, int]]:
    """Names and sizes of the shared files, ``total`` bytes in all: sizes from 64 KiB to 4 MiB drawn
    from ``seed``, each a whole number of pages (the last takes the rest)."""
    rng = np.random.default_rng([seed, 1])
    files, left, i = [], total - total % page_size, 0
    while left > 0:
        size = min(left, int(rng.integers(16, 1025)) * page_size)
        files.append((f"shared/f{i:04d}", size))
        left -= size
        i += 1
    return files


def initramfs_bytes(busybox: bytes, shared_bytes: int, shared_seed: int) -> tuple[bytes, bytes]:
    """``(base, shared)``: a gzip'd cpio with busybox and /init, and an uncompressed cpio with the
    shared files (random bytes do not compress; the kernel unpacks a plain cpio at memory speed).
    Concatenated, base first, they are the initramfs."""
    base = cpio_archive([("bin", 0o040755, b""), ("dev", 0o040755, b""),
                         ("dev/console", 0o020600, b"", (5, 1)), ("proc", 0o040755, b""),
                         ("sys", 0o040755, b""), ("data", 0o040755, b""), ("tmp", 0o040755, b""),
                         ("bin/busybox", 0o100755, busybox),
                         ("init", 0o100755, INIT_SCRIPT.encode())])
    base = gzip.compress(base, 6, mtime=0)
    base += b"\0" * (-len(base) % 4)     # the next archive must start 4-byte aligned
    rng = np.random.default_rng([shared_seed, 2])
    entries = [("shared", 0o040755, b"")]
    entries += [(name, 0o100644, rng.bytes(size)) for name, size in shared_files(shared_bytes,
                                                                                shared_seed)]
    return base, cpio_archive(entries)


def initrd_key(busybox: bytes, shared_bytes: int, shared_seed: int) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(busybox).digest())
    h.update(INIT_SCRIPT.encode())
    h.update(json.dumps([IMAGE_FORMAT, shared_bytes, shared_seed]).encode())
    return h.hexdigest()[:16]


def ensure_initrd(shared_bytes: int, shared_seed: int = 0, cache: str | None = None) -> tuple[str, dict]:
    """The cached initramfs for this shared layout (built on first use)."""
    cache = cache or cache_dir()
    busybox_path, info = ensure_busybox(cache)
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    key = initrd_key(busybox, shared_bytes, shared_seed)
    path = os.path.join(cache, "initrd", f"initrd-{key}.img")
    hit = os.path.isfile(path)
    if hit:
        os.utime(path)        # most recently used: kept by the pruning below
    else:
        base, shared = initramfs_bytes(busybox, shared_bytes, shared_seed)
        write_atomic(path, base + shared)
        _prune(os.path.dirname(path), keep=_KEEP_INITRDS)
    return path, {**info, "initrd_key": key, "initrd_cached": hit, "shared_bytes": shared_bytes,
                  "shared_seed": shared_seed}


def _prune(folder: str, keep: int) -> None:
    try:
        images = sorted((os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".img")),
                        key=os.path.getmtime, reverse=True)
    except OSError:
        return
    for old in images[keep:]:
        try:
            os.unlink(old)
        except OSError:
            pass


def ensure_image(shared_bytes: int, shared_seed: int = 0, kernel: str | None = None,
                 initrd: str | None = None, cache: str | None = None) -> GuestImage:
    """The guest image: the user's ``kernel``/``initrd`` where given, else built (or found in the
    cache). ``info`` says where each part came from and how long the build took."""
    t0 = time.monotonic()
    info: dict = {}
    if kernel:
        if not os.path.isfile(kernel):
            raise WorkloadError(f"--vm-kernel {kernel!r}: no such file (a bzImage such as "
                                "/boot/vmlinuz-*)")
        info["kernel_source"] = "user"
    else:
        kernel, more = ensure_kernel(cache)
        info.update(more, kernel_source="debian")
    if initrd:
        if not os.path.isfile(initrd):
            raise WorkloadError(f"--vm-initrd {initrd!r}: no such file (an initramfs whose init "
                                f"prints {READY_MARKER} on the serial console when ready)")
        info["initrd_source"] = "user"
    else:
        initrd, more = ensure_initrd(shared_bytes, shared_seed, cache)
        info.update(more, initrd_source="built")
    info["build_seconds"] = round(time.monotonic() - t0, 3)
    return GuestImage(kernel=kernel, initrd=initrd, info=info)


def guest_cmdline(seed: int, unique_mib: int, zero_mib: int, volatile_kib: int,
                  probe: bool = False) -> str:
    """The kernel command line of one guest: serial console, no reboot on panic, freed pages
    zeroed, and the ``udedup.*`` words its /init reads."""
    if not 0 <= seed <= MAX_GUEST_SEED:
        raise ValueError(f"guest seed {seed} outside 0..{MAX_GUEST_SEED}")
    words = ["console=ttyS0", "panic=-1", "init_on_free=1"]
    if probe:
        return " ".join(words + ["udedup.probe=1"])
    return " ".join(words + ["quiet", f"udedup.seed={seed}", f"udedup.unique={unique_mib}",
                             f"udedup.zero={zero_mib}", f"udedup.volatile={volatile_kib}"])
