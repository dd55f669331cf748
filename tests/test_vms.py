"""The VM lab: the image builder and the QEMU command line (unit tests, no QEMU; the guests'
start and stop with a fake ``qemu`` are in test_vm_guests.py), and, marked ``vm``, real guests:
the image built and cached, two guests booted under TCG, their RAM registered and THP-backed, and
an A/B run on them.

The ``vm`` tests need qemu-system-x86 and apt (or a cached kernel); ``UDEDUP_VM_TESTS=0`` skips them
(CI runs them once, not again in its second, software-CRC run)."""
from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import sys
import time
import zlib

import pytest

from udedup.ab import vmlab, vmpackages
from udedup.ab.vms import QEMU_MISSING, VmSpec, VmWorkload, kvm_creates_vm, qemu_argv
from udedup.errors import UsageError, WorkloadError

MIB = 1 << 20


def parse_cpio(data: bytes) -> dict:
    """newc archive -> {name: (mode, data, (rdevmajor, rdevminor))}, stopping at the trailer."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_at = pos + 110
        name = data[name_at:name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (fields[1], data[data_at:data_at + filesize], (fields[9], fields[10]))
        pos = data_at + filesize + (-filesize % 4)


# --- the image, pure -----------------------------------------------------------------------------
def test_cpio_entries_are_newc_and_aligned():
    blob = vmlab.cpio_archive([("d", 0o040755, b""), ("d/f", 0o100644, b"abc"),
                               ("dev/console", 0o020600, b"", (5, 1))])
    assert len(blob) % 4 == 0
    entries = parse_cpio(blob)
    assert entries["d/f"] == (0o100644, b"abc", (0, 0))
    assert entries["dev/console"][2] == (5, 1)
    assert entries["d"][0] == 0o040755


def test_shared_files_are_whole_pages_and_seeded():
    files = vmlab.shared_files(10 * MIB + 123, seed=7)
    assert sum(size for _, size in files) == 10 * MIB
    assert all(size % 4096 == 0 and 64 << 10 <= size <= 4 * MIB for _, size in files[:-1])
    assert files == vmlab.shared_files(10 * MIB + 123, seed=7)
    assert files != vmlab.shared_files(10 * MIB, seed=8)


def test_initramfs_holds_busybox_init_and_the_shared_files():
    busybox = b"\x7fELF fake busybox"
    base, shared = vmlab.initramfs_bytes(busybox, 2 * MIB, shared_seed=3)
    assert len(base) % 4 == 0              # the plain archive after it starts aligned
    inner = parse_cpio(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(base))
    assert inner["bin/busybox"][1] == busybox
    assert inner["init"][0] == 0o100755 and inner["init"][1].startswith(b"#!/bin/busybox sh")
    assert inner["dev/console"][2] == (5, 1)
    files = {k: v[1] for k, v in parse_cpio(shared).items() if k.startswith("shared/")}
    assert sum(map(len, files.values())) == 2 * MIB
    again = vmlab.initramfs_bytes(busybox, 2 * MIB, shared_seed=3)
    assert again == (base, shared)           # every guest (and every build) the same bytes
    assert vmlab.initramfs_bytes(busybox, 2 * MIB, shared_seed=4)[1] != shared
    assert vmlab.initrd_key(busybox, 2 * MIB, 3) != vmlab.initrd_key(busybox, 2 * MIB, 4)


def test_init_script_reads_its_words_and_prints_the_markers():
    script = vmlab.INIT_SCRIPT
    for word in ("udedup.seed", "udedup.unique", "udedup.zero", "udedup.volatile", "udedup.probe"):
        assert word + "=" in script
    assert vmlab.READY_MARKER in script and vmlab.BOOT_MARKER in script
    assert "%(" not in script and "100%" in script and "%%" not in script   # the template filled in


def test_guest_cmdline():
    line = vmlab.guest_cmdline(5, 48, 32, 1024)
    words = line.split()
    assert "console=ttyS0" in words and "init_on_free=1" in words and "panic=-1" in words
    assert {"udedup.seed=5", "udedup.unique=48", "udedup.zero=32", "udedup.volatile=1024"} <= set(words)
    assert "udedup.probe=1" in vmlab.guest_cmdline(0, 0, 0, 0, probe=True).split()
    with pytest.raises(ValueError):
        vmlab.guest_cmdline(vmlab.MAX_GUEST_SEED + 1, 1, 1, 1)


def test_parse_depends():
    text = ("linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n"
            "  Recommends: firmware-linux-free\n")
    assert vmpackages.parse_depends(text, "linux-image-") == "linux-image-6.1.0-57-amd64"
    assert vmpackages.parse_depends(" |Depends: linux-image-6.9-amd64\n", "linux-image-") == "linux-image-6.9-amd64"
    assert vmpackages.parse_depends("  Depends: libc6\n", "linux-image-") is None


def _bzimage(payload: bytes) -> bytes:
    img = bytearray(0x1000)
    img[0x1F1] = 1                                   # setup sectors: payload after 2 * 512 bytes
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", img, 0x248, 0x10, len(payload))
    return bytes(img[:1024 + 0x10]) + payload


def test_bzimage_payload_and_pvh_note():
    note = struct.pack("<III4s", 4, 4, 18, b"Xen\0") + b"\0\0\0\1"
    elf = b"\x7fELF" + b"\0" * 60 + note
    assert vmpackages.bzimage_payload(_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ))) == elf
    assert vmpackages.bzimage_payload(_bzimage(gzip.compress(elf))) == elf
    assert vmpackages.bzimage_payload(_bzimage(b"\x28\xb5\x2f\xfd zstd")) is None
    assert vmpackages.bzimage_payload(b"not a kernel") is None
    assert vmpackages.has_pvh_note(elf) and not vmpackages.has_pvh_note(b"\x7fELF" + b"\0" * 64)


def _elf(*segment_types: int) -> bytes:
    head = bytearray(64)
    head[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", head, 32, 64)                        # e_phoff
    struct.pack_into("<HH", head, 54, 56, len(segment_types))   # e_phentsize, e_phnum
    return bytes(head) + b"".join(struct.pack("<I", t) + b"\0" * 52 for t in segment_types)


def test_is_static_elf(tmp_path):
    for name, blob, static in (("static", _elf(1, 1), True), ("dynamic", _elf(6, 3, 1), False),
                               ("text", b"#!/bin/sh\n", False)):
        (tmp_path / name).write_bytes(blob)
        assert vmpackages.is_static_elf(str(tmp_path / name)) is static
    assert not vmpackages.is_static_elf(os.path.realpath(sys.executable))      # python is dynamic
    assert not vmpackages.is_static_elf(str(tmp_path / "missing"))


def test_cache_dir(monkeypatch):
    monkeypatch.setenv("UDEDUP_VM_CACHE", "/x/y")
    assert vmpackages.cache_dir() == "/x/y"
    monkeypatch.delenv("UDEDUP_VM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/c")
    assert vmpackages.cache_dir() == "/c/udedup/vm"


def _fake_apt(tmp_path, monkeypatch) -> str:
    """apt-cache that knows the kernel only after apt-get update ran; apt-get logs its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stamp, log = tmp_path / "updated", tmp_path / "apt.log"
    (bindir / "apt-cache").write_text(f"""#!/bin/sh
[ -e {stamp} ] || exit 100
case "$1" in
  depends) echo "linux-image-amd64"; echo "  Depends: linux-image-9.9-amd64" ;;
  show) echo "Package: $3"; echo "Version: 9.9-1" ;;
esac
""")
    (bindir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n[ \"$1\" = update ] && touch {stamp}\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return str(log)


def test_resolve_runs_apt_get_update_once(tmp_path, monkeypatch):
    log = _fake_apt(tmp_path, monkeypatch)
    assert vmpackages.resolve_package("linux-image-amd64", "linux-image-") == ("linux-image-9.9-amd64", "9.9-1")
    assert open(log).read().split("\n").count("update -q") == 1
    cache = str(tmp_path / "cache")
    assert vmpackages.resolve_cached(cache, "linux-image-amd64", "linux-image-")[1] == "9.9-1"
    os.unlink(tmp_path / "updated")       # apt forgets; the memo still answers until the lists change
    assert vmpackages.resolve_cached(cache, "linux-image-amd64", "linux-image-")[1] == "9.9-1"


def test_unknown_package_says_what_to_do(tmp_path, monkeypatch):
    _fake_apt(tmp_path, monkeypatch)
    (tmp_path / "bin" / "apt-get").write_text("#!/bin/sh\nexit 0\n")     # update learns nothing
    with pytest.raises(WorkloadError, match="--vm-kernel PATH"):
        vmpackages.resolve_package("linux-image-amd64", "linux-image-")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(WorkloadError, match="apt-cache not found.*--vm-kernel"):
        vmpackages.resolve_package("busybox-static")


def test_user_image_paths_are_checked(tmp_path):
    with pytest.raises(WorkloadError, match="--vm-kernel.*no such file"):
        vmlab.ensure_image(MIB, kernel=str(tmp_path / "nope"), initrd=str(tmp_path / "nope"))
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    with pytest.raises(WorkloadError, match="--vm-initrd.*UDEDUP-VM-READY"):
        vmlab.ensure_image(MIB, kernel=str(kernel), initrd=str(tmp_path / "nope"))
    (tmp_path / "i").write_bytes(b"i")
    image = vmlab.ensure_image(MIB, kernel=str(kernel), initrd=str(tmp_path / "i"))
    assert image.info["kernel_source"] == image.info["initrd_source"] == "user"


# --- the command line and the spec ------------------------------------------------------------------
def test_qemu_argv():
    argv = qemu_argv("/usr/bin/qemu-system-x86_64", "tcg", 384 * MIB, "/k", "/i", "console=ttyS0",
                     "/tmp/s.log", cpus=1, name="g0")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    pairs = dict(zip(argv[1::2], argv[2::2]))
    assert pairs["-accel"] == "tcg" and pairs["-m"] == "384M" and pairs["-kernel"] == "/k"
    assert pairs["-initrd"] == "/i" and pairs["-append"] == "console=ttyS0"
    assert argv[argv.index("-serial") + 1] == "file:/tmp/s.log"
    assert "-nographic" in argv and "-no-reboot" in argv and "-cpu" not in argv
    assert "mem-merge=off" not in " ".join(argv)         # QEMU's default: guest RAM registered
    kvm = qemu_argv("q", "kvm", 256 * MIB, "/k", "/i", "", "/s")
    assert kvm[kvm.index("-cpu") + 1] == "host"


@pytest.mark.parametrize("kwargs, match", [
    ({"guests": 0}, "--vms 0"),
    ({"accel": "hvf"}, "--vm-accel"),
    ({"memory": 64 * MIB}, "at least 128 MiB"),
    ({"memory": 256 * MIB, "shared": 128 * MIB}, "does not fit"),
    ({"shared": 0, "unique": MIB}, "needs --vm-shared"),
])
def test_spec_refuses(kwargs, match):
    with pytest.raises(UsageError, match=match):
        VmSpec(**kwargs).validate()


def test_guest_seeds_are_distinct_and_in_range():
    for guests in (1, 2, 8, vmlab.MAX_GUEST_SEED + 1):
        w = VmWorkload(VmSpec(guests=guests))
        for seed in (0, 1, 12345, 2**31 - 1):
            seeds = w.guest_seeds(seed)
            assert len(set(seeds)) == guests
            assert all(0 <= s <= vmlab.MAX_GUEST_SEED for s in seeds)


def test_qemu_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WorkloadError) as err:
        VmWorkload(VmSpec()).preflight()
    assert str(err.value) == QEMU_MISSING and "apt-get install qemu-system-x86" in QEMU_MISSING
    assert err.value.exit_code == 11


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "qemu-system-x86_64").write_text("#!/bin/sh\n")
    (tmp_path / "qemu-system-x86_64").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(vmlab, "ensure_image", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    with pytest.raises(WorkloadError, match="cannot build the VM image in /ro.*UDEDUP_VM_CACHE"):
        VmWorkload(VmSpec(), cache="/ro").preflight()


def test_kvm_check_on_a_device_that_is_not_kvm(tmp_path):
    ok, why = kvm_creates_vm(str(tmp_path / "kvm"))
    assert not ok and "No such file" in why
    ok, why = kvm_creates_vm("/dev/null")
    assert not ok


def test_cli_builds_the_vm_workload():
    from udedup.cli import build_parser
    from udedup.commands.ab import build_workload

    def build(*argv):
        return build_workload(build_parser().parse_args(["ab", *argv]))

    w = build("--preset", "vms")
    assert isinstance(w, VmWorkload) and w.spec.guests == 2 and w.spec.memory == 384 * MIB
    w = build("--vms", "3", "--vm-memory", "256M", "--vm-shared", "48M", "--vm-unique", "16M",
              "--vm-accel", "tcg", "--ready-delay", "5")
    assert (w.spec.guests, w.spec.memory, w.spec.shared, w.spec.accel) == (3, 256 * MIB, 48 * MIB, "tcg")
    assert w.ready_delay == 5 and w.ready_timeout == 300
    for argv, match in ((["--vms", "2", "--size", "64M"], "choose one workload"),
                        (["--vms", "2", "--cmd", "true"], "choose one workload"),
                        (["--vms", "2", "--vm-unique", "1.5M"], "whole number of MiB"),
                        (["--vms", "2", "--vm-memory", "lots"], "not a size"),
                        (["--preset", "nope"], "vms")):
        with pytest.raises(UsageError, match=match):
            build(*argv)


# --- real guests ---------------------------------------------------------------------------------
def vm_skip_reason() -> str | None:
    if os.environ.get("UDEDUP_VM_TESTS", "1") == "0":
        return "UDEDUP_VM_TESTS=0 (CI runs the VM tests in its first run only)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing: apt-get install qemu-system-x86"
    return None


#: Small guests keep the vm tests short: 256 MiB of RAM, 32 MiB shared, 8 MiB unique.
TEST_SPEC = dict(memory=256 * MIB, shared=32 * MIB, unique=8 * MIB, zero=16 * MIB, volatile=256 << 10,
                 accel="tcg")


@pytest.fixture(scope="module")
def vm_image():
    reason = vm_skip_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    try:
        first = vmlab.ensure_image(TEST_SPEC["shared"])
    except WorkloadError as err:
        pytest.skip(f"no guest image: {err}")
    first_seconds = time.monotonic() - t0
    return first, first_seconds


@pytest.mark.vm
def test_image_builds_and_second_build_is_a_cache_hit(vm_image):
    first, _ = vm_image
    t0 = time.monotonic()
    second = vmlab.ensure_image(TEST_SPEC["shared"])
    assert time.monotonic() - t0 < 2.0
    assert second.info["kernel_cached"] and second.info["initrd_cached"]
    assert (second.kernel, second.initrd) == (first.kernel, first.initrd)
    assert os.path.getsize(second.initrd) > TEST_SPEC["shared"]


@pytest.fixture(scope="module")
def two_guests(vm_image):
    w = VmWorkload(VmSpec(guests=2, **TEST_SPEC), ready_timeout=150)
    w.preflight()
    t0 = time.monotonic()
    run = w.start(seed=1)
    ready = time.monotonic() - t0
    yield w, run, ready
    run.stop()


@pytest.mark.vm
def test_two_guests_boot_under_tcg(two_guests):
    w, run, ready = two_guests
    assert w.describe()["accelerator"] == "tcg" and "tcg" in w.name
    assert run.alive() and len(run.guests) == 2
    assert all(vmlab.READY_MARKER in line for line in run.info["ready"])
    assert len(run.pids()) == 2
    print(f"two guests ready in {ready:.1f} s ({run.info['boot_seconds']})")


@pytest.mark.vm
def test_guest_ram_is_registered_and_thp_backed(two_guests):
    from udedup.host.maps import read_mappings
    _, run, _ = two_guests
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        thp = ""
    for pid in run.pids():
        # the largest anonymous data mapping (TCG's translation buffer is larger, but executable)
        ram = max((m for m in read_mappings(pid) if m.kind == "anon" and "ex" not in m.vmflags),
                  key=lambda m: m.size)
        assert ram.size >= TEST_SPEC["memory"]
        assert ram.registered, "QEMU did not register guest RAM (mem-merge)"
        if "[madvise]" in thp or "[always]" in thp:
            assert ram.anon_huge > 0, "guest RAM holds no transparent huge page"


@pytest.mark.vm
@pytest.mark.ksm
def test_run_ab_on_two_guests(vm_image):
    from udedup.ab.engine import run_ab
    w = VmWorkload(VmSpec(guests=2, **TEST_SPEC), ready_timeout=150)
    result = run_ab(w, trials=1, seed=3, settle_timeout=15.0, cow_sample=0)
    assert [t.arm for t in sorted(result.trials, key=lambda t: t.arm)] == ["off", "on"]
    for t in result.trials:
        assert t.status in ("ok", "timeout"), (t.status, t.error)
        assert t.populate_seconds and t.saved_bytes is not None and t.series
    assert result.config["workload"]["accelerator"] == "tcg"
    assert any(t.saved_bytes > TEST_SPEC["shared"] // 2 for t in result.trials)
