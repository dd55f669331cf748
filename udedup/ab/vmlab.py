"""The VM lab's guest image, built on first use from Debian packages and cached.

A guest is Debian's kernel and a busybox initramfs:

- the kernel: from ``linux-image-amd64``'s versioned package, fetched (never installed) into the
  cache by :mod:`.vmpackages`;
- the initramfs is a newc cpio written here: ``/bin/busybox`` from ``busybox-static`` (the installed
  one, else fetched by :mod:`.vmpackages`), an ``/init`` script (:data:`INIT_SCRIPT`), and ``/shared``:
  files of pseudo-random bytes drawn from a seed every guest shares, so every guest holds the same
  files (page cache in its rootfs) without spending guest CPU to make them.

What ``/init`` does, from ``udedup.*`` words of the kernel command line (:func:`guest_cmdline`):
unique data (``udedup.unique`` MiB: the shared bytes read at a byte offset drawn from the guest's own
``udedup.seed``, so no page equals another guest's or a shared page), zero memory (``udedup.zero``
MiB written and freed; ``init_on_free=1`` zeroes every page the guest frees, the initrd too), a
little memory rewritten every second (``udedup.volatile`` KiB), then :data:`READY_MARKER` on the
serial console, and it idles.

The cache (:func:`.vmpackages.cache_dir`) is keyed by versions: the kernel by its package and version, the
busybox by its package version, an initramfs by a hash of busybox, the init script and the shared
layout; a second build is a cache hit.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import time

import numpy as np

from ..errors import WorkloadError
from .vmpackages import cache_dir, ensure_busybox, ensure_kernel, write_atomic

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
