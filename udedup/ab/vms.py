"""The VM lab workload: N small QEMU guests booted from the image of :mod:`.vmlab`.

QEMU registers guest RAM with KSM itself (``-machine mem-merge=on`` is its default: MADV_MERGEABLE)
and asks for transparent huge pages (MADV_HUGEPAGE), as on a real VM host; so the guests are
started without process-wide merging. Each guest is started through the workload child's ``exec``
mode (``PR_SET_PDEATHSIG``: it dies with the harness) in its own session (stopping kills the group),
its serial console written to a file that :meth:`VmWorkload.start` watches for the ready marker.

The accelerator: ``auto`` takes KVM when ``/dev/kvm`` creates a VM *and* a probe guest prints its
kernel banner within :data:`PROBE_SECONDS` (nested KVM may open and create VMs whose guests never
run), else TCG; the probe's answer is cached for this boot. :meth:`VmWorkload.describe` records
which accelerator ran and why.
"""
from __future__ import annotations

import dataclasses
import errno as errno_mod
import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time

from ..errors import UsageError, WorkloadError
from ..host.fs import DEFAULT_PROCFS, ProcFs, as_procfs
from ..units import human_bytes
from . import vmlab, vmpackages
from .running import Running, child_argv, spawn

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QEMU_MISSING = f"{QEMU} not found: install qemu-system-x86 (apt-get install qemu-system-x86)"
ACCELERATORS = ("auto", "kvm", "tcg")
#: A guest under working KVM prints its banner well within a second; under nested KVM without
#: nested virtualization it prints nothing, ever.
PROBE_SECONDS = 8.0
_KVM_GET_API_VERSION, _KVM_CREATE_VM = 0xAE00, 0xAE01
MIB = 1 << 20


@dataclasses.dataclass
class VmSpec:
    """What the guests are: how many, their RAM, and what their /init puts in it (bytes)."""

    guests: int = 2
    memory: int = 384 * MIB
    shared: int = 96 * MIB
    unique: int = 48 * MIB
    zero: int = 32 * MIB
    volatile: int = 1 * MIB
    cpus: int = 1
    accel: str = "auto"
    kernel: str | None = None
    initrd: str | None = None
    shared_seed: int = 0

    def validate(self) -> "VmSpec":
        if not 1 <= self.guests <= vmlab.MAX_GUEST_SEED + 1:
            raise UsageError(f"--vms {self.guests}: give 1 to {vmlab.MAX_GUEST_SEED + 1} guests")
        if self.accel not in ACCELERATORS:
            raise UsageError(f"--vm-accel {self.accel!r}: choose one of {', '.join(ACCELERATORS)}")
        if self.memory < 128 * MIB:
            raise UsageError(f"--vm-memory {human_bytes(self.memory)}: a guest needs at least 128 MiB")
        if self.cpus < 1:
            raise UsageError("a guest needs at least one CPU")
        # the guest holds the initrd and the files unpacked from it at once, then the rest
        content = self.shared + self.unique + self.zero + self.volatile
        if self.initrd is None and (2 * self.shared > self.memory * 0.6 or content > self.memory * 0.7):
            raise UsageError(f"guest content (shared {human_bytes(self.shared)}, unique "
                             f"{human_bytes(self.unique)}, zero {human_bytes(self.zero)}) does not "
                             f"fit {human_bytes(self.memory)} of guest RAM: raise --vm-memory or "
                             "lower the content sizes")
        if self.unique and not self.shared:
            raise UsageError("--vm-unique needs --vm-shared > 0 (unique data is made from it)")
        if self.unique > self.shared * vmlab.UNIQUE_PASSES:
            raise UsageError(f"--vm-unique may be at most {vmlab.UNIQUE_PASSES} times --vm-shared")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def qemu_argv(qemu: str, accel: str, memory: int, kernel: str, initrd: str, append: str,
              serial: str, cpus: int = 1, name: str = "udedup-vm") -> list[str]:
    """The command line of one guest: no display, no devices but the serial console (to a file),
    no monitor, QEMU's own defaults for RAM (mem-merge on, THP asked for)."""
    argv = [qemu, "-name", name, "-accel", accel, "-m", f"{memory // MIB}M", "-smp", str(cpus),
            "-kernel", kernel, "-initrd", initrd, "-append", append,
            "-nographic", "-nodefaults", "-no-user-config", "-no-reboot", "-monitor", "none",
            "-serial", f"file:{serial}"]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    return argv


def kvm_creates_vm(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether ``path`` opens and creates a VM (the cheap check; it does not prove guests run)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return False, f"{path}: {os.strerror(err.errno)}"
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0) != 12:
            return False, f"{path}: unexpected KVM API version"
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as err:
        return False, f"KVM_CREATE_VM failed: {errno_mod.errorcode.get(err.errno, err.errno)}"
    finally:
        os.close(fd)
    return True, f"{path} creates VMs"


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.splitlines()[0].strip() if out else "?"


def _boot_id(procfs: ProcFs) -> str:
    return (procfs.global_text("sys", "kernel", "random", "boot_id") or "?").strip()


class Guest:
    """One started guest: its process (a :class:`Running`) and its serial console file."""

    def __init__(self, argv: list[str], serial: str, name: str, procfs: ProcFs):
        self.serial = serial
        self.name = name
        proc, err = spawn(child_argv("exec", "--no-merge", "--", *argv), stdin_pipe=False)
        self.running = Running(proc, name, stderr_file=err, procfs=procfs)
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.ready_line = ""

    def console(self) -> str:
        try:
            with open(self.serial, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def seen(self, marker: str) -> str | None:
        """The first console line containing ``marker``, or None."""
        for line in self.console().splitlines():
            if marker in line:
                return line.strip()
        return None


def probe_kvm(qemu: str, image: vmlab.GuestImage, procfs: ProcFs, deadline: float = PROBE_SECONDS
              ) -> tuple[bool, str]:
    """Boot one throw-away guest under KVM: does its kernel print its banner before ``deadline``?"""
    with tempfile.TemporaryDirectory(prefix="udedup-vmprobe-") as tmp:
        serial = os.path.join(tmp, "serial.log")
        argv = qemu_argv(qemu, "kvm", 128 * MIB, image.kernel, image.initrd,
                         vmlab.guest_cmdline(0, 0, 0, 0, probe=True), serial, name="udedup-probe")
        guest = Guest(argv, serial, "kvm probe", procfs)
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < deadline:
                if guest.seen("Linux version") or guest.seen(vmlab.BOOT_MARKER):
                    return True, f"a KVM probe guest booted (banner after {time.monotonic() - t0:.1f} s)"
                if not guest.running.alive():
                    return False, (f"a KVM probe guest {guest.running.exit_description()}")
                time.sleep(0.1)
        finally:
            guest.running.stop(grace=0)
    return False, (f"/dev/kvm creates VMs but a probe guest printed nothing within {deadline:g} s "
                   "(no nested virtualization?)")


def choose_accelerator(requested: str, qemu: str, image: vmlab.GuestImage,
                       procfs: ProcFs, cache: str | None = None) -> tuple[str, str]:
    """``(accelerator, why)`` for ``requested`` (auto, kvm or tcg)."""
    if requested == "tcg":
        return "tcg", "asked for (--vm-accel tcg)"
    ok, why = kvm_creates_vm()
    if ok:
        key = json.dumps([_boot_id(procfs), qemu_version(qemu), image.kernel])
        memo = os.path.join(cache or vmpackages.cache_dir(), "kvm-probe.json")
        try:
            with open(memo) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            ok, why = saved["ok"], saved["why"] + " (probed earlier this boot)"
        else:
            ok, why = probe_kvm(qemu, image, procfs)
            try:
                vmpackages.write_atomic(memo, json.dumps({"key": key, "ok": ok, "why": why}).encode())
            except OSError:
                pass
    if ok:
        return "kvm", why
    if requested == "kvm":
        raise WorkloadError(f"--vm-accel kvm: {why}; use --vm-accel tcg (or auto)")
    return "tcg", f"KVM unusable: {why}"


class VmRunning:
    """The started guests, one :class:`Running` each, seen by the engine as one workload."""

    owned = True

    def __init__(self, guests: list[Guest], name: str, tmpdir: tempfile.TemporaryDirectory):
        self.guests = guests
        self.name = name
        self._tmp = tmpdir
        self.info: dict = {}
        self.stopped = False

    @property
    def pid(self) -> int | None:
        return self.guests[0].running.pid if self.guests else None

    def pids(self) -> list[int]:
        return [p for g in self.guests for p in g.running.pids()]

    def alive(self) -> bool:
        return bool(self.guests) and all(g.running.alive() for g in self.guests)

    def exit_description(self) -> str | None:
        for g in self.guests:
            died = g.running.exit_description()
            if died is not None:
                return f"{g.name} {died}"
        return None

    def cow(self, sample: int, seed: int, timeout: float = 30.0) -> dict | None:
        return None       # the guests' memory is not ours to write

    def stop(self, grace: float = 2.0) -> None:
        """SIGKILL every guest's process group (a guest has no state worth a clean shutdown) and
        reap it; idempotent."""
        self.stopped = True
        try:
            for g in self.guests:
                g.running.kill()
        finally:
            self._tmp.cleanup()


class VmWorkload:
    """N guests from the VM lab image: ``preflight()`` finds qemu, builds (or finds) the image and
    picks the accelerator; ``start()`` boots them all and waits for every ready marker."""

    kind = "vms"

    def __init__(self, spec: VmSpec | None = None, ready_timeout: float = 180.0,
                 ready_delay: float | None = None, cache: str | None = None,
                 procfs: str | ProcFs = DEFAULT_PROCFS):
        self.spec = (spec or VmSpec()).validate()
        if ready_timeout <= 0 or (ready_delay is not None and ready_delay < 0):
            raise UsageError("readiness delay must be >= 0 and its timeout > 0 seconds")
        self.ready_timeout = float(ready_timeout)
        self.ready_delay = ready_delay
        self.cache = cache
        self.procfs = as_procfs(procfs)
        self.qemu: str | None = None
        self.image: vmlab.GuestImage | None = None
        self.accel: str | None = None
        self.accel_reason = ""
        self.name = f"{self.spec.guests} VMs x {self.spec.memory // MIB} MiB"

    def describe(self) -> dict:
        s = self.spec
        return {"kind": self.kind, "name": self.name, "spec": s.as_dict(),
                "accelerator": self.accel, "accelerator_reason": self.accel_reason,
                "qemu": self.qemu, "qemu_version": qemu_version(self.qemu) if self.qemu else None,
                "image": self.image.as_dict() if self.image else None}

    def preflight(self) -> None:
        self.qemu = shutil.which(QEMU)
        if self.qemu is None:
            raise WorkloadError(QEMU_MISSING)
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # pragma: no cover
            avail = None
        need = self.spec.guests * self.spec.memory
        if avail is not None and need > avail * 0.8:
            raise WorkloadError(f"{self.spec.guests} guests of {human_bytes(self.spec.memory)} need "
                                f"{human_bytes(need)} but only {human_bytes(avail)} are free: use "
                                "fewer --vms or a smaller --vm-memory")
        if self.image is None:
            cache = self.cache or vmpackages.cache_dir()
            log.info("VM lab: building or finding the guest image in %s", cache)
            try:
                self.image = vmlab.ensure_image(self.spec.shared, self.spec.shared_seed,
                                                kernel=self.spec.kernel, initrd=self.spec.initrd,
                                                cache=cache)
            except OSError as err:
                raise WorkloadError(f"cannot build the VM image in {cache}: {err.strerror or err}; "
                                    "set UDEDUP_VM_CACHE to a writable folder") from err
        if self.accel is None:
            self.accel, self.accel_reason = choose_accelerator(self.spec.accel, self.qemu,
                                                               self.image, self.procfs, self.cache)
            log.info("VM lab: accelerator %s (%s)", self.accel, self.accel_reason)
        self.name = f"{self.spec.guests} VMs x {self.spec.memory // MIB} MiB ({self.accel})"

    def guest_argv(self, index: int, seed: int, serial: str) -> list[str]:
        s = self.spec
        append = vmlab.guest_cmdline(seed, s.unique // MIB, s.zero // MIB, s.volatile >> 10)
        return qemu_argv(self.qemu or QEMU, self.accel or "tcg", s.memory, self.image.kernel,
                         self.image.initrd, append, serial, cpus=s.cpus, name=f"udedup-vm{index}")

    def guest_seeds(self, seed: int) -> list[int]:
        """Distinct guest seeds (0..MAX_GUEST_SEED) drawn from the trial's seed."""
        span = vmlab.MAX_GUEST_SEED + 2 - self.spec.guests
        base = seed % span
        return [base + g for g in range(self.spec.guests)]

    def start(self, seed: int = 0) -> VmRunning:
        if self.image is None or self.accel is None:
            self.preflight()
        tmp = tempfile.TemporaryDirectory(prefix="udedup-vms-")
        guests: list[Guest] = []
        run = VmRunning(guests, self.name, tmp)
        try:
            for i, guest_seed in enumerate(self.guest_seeds(seed)):
                serial = os.path.join(tmp.name, f"guest{i}.log")
                guests.append(Guest(self.guest_argv(i, guest_seed, serial), serial, f"guest {i}",
                                    self.procfs))
            self._wait_ready(run)
        except BaseException:
            run.stop(grace=0)
            raise
        run.info = {"boot_seconds": [round(g.ready_at - g.started, 2) for g in guests],
                    "ready": [g.ready_line for g in guests]}
        return run

    def _wait_ready(self, run: VmRunning) -> None:
        deadline = time.monotonic() + self.ready_timeout
        delay_end = time.monotonic() + self.ready_delay if self.ready_delay is not None else None
        while True:
            died = run.exit_description()
            if died is not None:
                tail = _last_lines(next(g for g in run.guests if g.running.exit_description()))
                raise WorkloadError(f"VM lab: {died} before it was ready" + tail)
            now = time.monotonic()
            for g in run.guests:
                if g.ready_at is None:
                    line = (g.seen(vmlab.READY_MARKER) if delay_end is None
                            else ("" if now >= delay_end else None))
                    if line is not None:
                        g.ready_at, g.ready_line = now, line
            if all(g.ready_at is not None for g in run.guests):
                return
            if now > deadline:
                late = [g for g in run.guests if g.ready_at is None]
                raise WorkloadError(f"VM lab: {late[0].name} not ready after {self.ready_timeout:g} s "
                                    f"under {self.accel} ({len(late)} of {len(run.guests)} guests "
                                    "late; raise --ready-timeout)" + _last_lines(late[0]))
            time.sleep(0.1)


def _last_lines(guest: Guest, n: int = 2) -> str:
    lines = [ln.strip() for ln in guest.console().splitlines() if ln.strip()]
    return f"; its console ended: {' | '.join(lines[-n:])[:240]}" if lines else "; its console is empty"
