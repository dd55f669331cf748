"""The real-host scenario of ``bench_daemon_peers.py``: real programs from Debian packages.

  java-1..3      three JVMs (openjdk-17-jre-headless), ``java -Xms256m Heap.java MIB``: a heap of
                 8 KiB strings, 3 in 5 copies of 64 templates (8 characters repeated), the others
                 each its own; the same program in each
  node-1..3      three Node.js processes (nodejs): 256 KiB buffers copied from 16 templates, the
                 same in each, and a few thousand repeated JS strings
  redis-server   one Redis (redis-server) on a free port, no persistence, ``DEBUG POPULATE`` unique keys
  py-worker-a/b  two Python workers (the synthetic scenario's workload process): one with duplicates
                 inside itself, one of unique pages rewritten at 4 Hz
  qemu guests    two QEMU guests of the VM lab (udedup.ab.vms, TCG): guest RAM registered by QEMU
                 itself (mem-merge on, MADV_MERGEABLE), THP asked for (MADV_HUGEPAGE)

"Everything registered" (register="prctl") starts every program but QEMU with KSM merge-any
(PR_SET_MEMORY_MERGE before exec: kept across exec since Linux 6.7); QEMU registers its guest RAM
itself in every peer, as on a real VM host. Missing programs are installed with apt-get
(``--no-install-recommends``); a program that cannot be had is left out with the reason.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
PR_SET_PDEATHSIG, PR_SET_MEMORY_MERGE = 1, 67

#: program -> the Debian package that brings it
PACKAGES = {"java": "openjdk-17-jre-headless", "node": "nodejs", "redis-server": "redis-server",
            "qemu-system-x86_64": "qemu-system-x86", "ksmtuned": "ksmtuned"}

#: --programs words -> the program each starts ("python": the Python workers, always at hand)
PROGRAM_OF = {"java": "java", "node": "node", "redis": "redis-server", "qemu": "qemu-system-x86_64"}
SELECTABLE = ("java", "node", "redis", "python", "qemu")

#: what udedup's daemon is told to look at (candidates.names: shell patterns on comm)
CANDIDATE_NAMES = ("java", "node", "redis-server", "qemu-system-*", "py-worker-*")

JAVA_SOURCE = r"""
import java.util.ArrayList;
import java.nio.charset.StandardCharsets;

public class Heap {
    public static void main(String[] args) throws Exception {
        long bytes = Long.parseLong(args[0]) << 20;
        String[] templates = new String[64];
        for (int t = 0; t < templates.length; t++)      // 8 characters repeated: page-periodic
            templates[t] = String.format("t%02d-row;", t).repeat(1024);
        ArrayList<String> heap = new ArrayList<>();
        for (long have = 0, i = 0; have < bytes; i++) {
            String s;
            if (i % 5 < 3) {    // a copy of a template: the same content again, a new object
                byte[] raw = templates[(int) (i % templates.length)].getBytes(StandardCharsets.ISO_8859_1);
                s = new String(raw, StandardCharsets.ISO_8859_1);
            } else {            // a string of its own
                StringBuilder b = new StringBuilder(8192);
                for (long x = i * 2654435761L; b.length() < 8192; x = x * 6364136223846793005L + 1442695040888963407L)
                    b.append(Long.toHexString(x));
                s = b.toString();
            }
            heap.add(s);
            have += s.length() + 40;
        }
        System.out.println("ready " + heap.size());
        System.out.flush();
        while (System.in.read() >= 0) { }
        System.out.println(heap.get(0).length());
    }
}
"""

NODE_SOURCE = r"""
const mib = Number(process.argv[2]);
const templates = [];
for (let t = 0; t < 16; t++) {
  const b = Buffer.alloc(262144);
  let x = (t + 1) * 2654435761 >>> 0;
  for (let i = 0; i < b.length; i += 4) { x = (Math.imul(x, 1103515245) + 12345) >>> 0; b.writeUInt32LE(x, i); }
  templates.push(b);
}
const held = [];
for (let i = 0; i < mib * 4; i++) held.push(Buffer.from(templates[i % 16]));   // 256 KiB copies
const strings = [];
for (let i = 0; i < 20000; i++) strings.push(('session-' + (i % 50) + '-').repeat(40));
process.stdout.write('ready ' + held.length + ' ' + strings.length + '\n');
process.stdin.on('data', () => {});
process.stdin.on('end', () => process.exit(0));
"""


def ensure_programs(log, install: bool = True, wanted=tuple(PACKAGES)) -> tuple[dict, list[str]]:
    """{program: path} of the ``wanted`` programs found (installing the missing ones with apt-get
    when ``install``), and one note per program left out, with the reason."""
    wanted = [p for p in PACKAGES if p in wanted]
    missing = [p for p in wanted if shutil.which(p) is None]
    notes = []
    if missing and install and shutil.which("apt-get") and os.geteuid() == 0:
        pkgs = sorted({PACKAGES[p] for p in missing})
        log(f"installing {' '.join(pkgs)} (apt-get install -y --no-install-recommends)")
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
            notes.append(f"apt-get install {' '.join(pkgs)} failed: {last}")
        # a freshly installed redis-server starts as a service: ours runs on its own port anyway
    found = {p: shutil.which(p) for p in wanted if shutil.which(p)}
    for p in wanted:
        if p not in found:
            notes.append(f"{p}: not available (Debian package {PACKAGES[p]}); left out of the scenario")
    return found, notes


def _preexec(merge_any: bool):
    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if merge_any and libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
            os._exit(97)
    return run


class Program:
    """One real program started by the scenario: ``name``, ``pid``, ``info`` ({"pages": committed
    pages, as ksmtuned sees them}), ``stop()`` (idempotent, kills its process group)."""

    def __init__(self, name, argv, register: str, ready: str | None = "ready", cwd=None):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                                     preexec_fn=_preexec(register == "prctl"))
        self.ready = ready
        self.info: dict = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout=300.0) -> dict:
        import select
        if self.ready is not None:
            end = time.monotonic() + timeout
            while True:
                left = end - time.monotonic()
                r, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
                line = self.proc.stdout.readline() if r else b""
                if not line:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not start (exit {self.proc.poll()})")
                if line.decode(errors="replace").startswith(self.ready):
                    break
        self.info = {"pages": rss_pages(self.pid)}
        return self.info

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


class Redis(Program):
    """redis-server on a free port, no persistence, then ``DEBUG POPULATE keys`` of ``size`` bytes."""

    def __init__(self, path, register, keys: int, size: int, workdir: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--enable-debug-command", "local",
                "--dir", workdir, "--logfile", ""]
        super().__init__("redis-server", argv, register, ready=None)
        self.keys, self.size = keys, size

    def command(self, *words, timeout=300.0) -> bytes:
        msg = f"*{len(words)}\r\n".encode() + b"".join(
            f"${len(str(w).encode())}\r\n{w}\r\n".encode() for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(msg)
            reply = s.recv(4096)
        if not reply.startswith(b"+"):
            raise RuntimeError(f"redis {' '.join(map(str, words))}: {reply[:200]!r}")
        return reply

    def wait_ready(self, timeout=300.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            try:
                self.command("PING", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start (exit {self.proc.poll()})")
                time.sleep(0.1)
        self.command("DEBUG", "POPULATE", self.keys, "key", self.size)
        self.info = {"pages": rss_pages(self.pid)}
        return self.info


class Guest:
    """One QEMU guest of a :class:`udedup.ab.vms.VmRunning` (killed with its group)."""

    def __init__(self, run, index: int, memory: int):
        self.run, self.index = run, index
        self.name = "qemu-system-x86"
        self.info = {"pages": memory // os.sysconf("SC_PAGE_SIZE")}

    @property
    def pid(self) -> int:
        return self.run.guests[self.index].running.pid

    def wait_ready(self, timeout=300.0) -> dict:
        return self.info

    def stop(self) -> None:
        self.run.guests[self.index].running.kill()
        if all(not g.running.alive() for g in self.run.guests):
            self.run.stop()


def rss_pages(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1])
    except OSError:
        return 0


class RealHost:
    """The scenario: ``start(register, log)`` starts every available program and waits until each
    holds its data; ``describe()`` says what it is. Sizes scale with ``scale`` (1 = about 2.2 GiB)."""

    name = "realhost"

    def __init__(self, scale: float, child_cls, log, install: bool = True, vm_memory_mib: int = 0,
                 programs=SELECTABLE):
        self.scale, self.child_cls, self.log = scale, child_cls, log
        wanted = {PROGRAM_OF[p] for p in programs if p in PROGRAM_OF}
        self.python = "python" in programs
        self.programs, self.notes = ensure_programs(log, install=install, wanted=wanted | {"ksmtuned"})
        self.workdir = tempfile.mkdtemp(prefix="udedup-realhost-")
        for name, src in (("Heap.java", JAVA_SOURCE), ("hold.js", NODE_SOURCE)):
            with open(os.path.join(self.workdir, name), "w") as f:
                f.write(src)
        self.vm_memory = (vm_memory_mib or (384 if scale >= 0.5 else 256)) * MiB
        self.vms = None
        if "qemu-system-x86_64" in self.programs:
            from udedup.ab.vms import VmSpec, VmWorkload
            shared = 96 if scale >= 0.5 else 48
            spec = VmSpec(guests=2, memory=self.vm_memory, shared=shared * MiB,
                          unique=min(48, shared) * MiB, zero=32 * MiB, accel="tcg")
            try:
                self.vms = VmWorkload(spec, ready_timeout=300)
                self.vms.preflight()
            except Exception as err:  # noqa: BLE001 - any failure: no guests, said so
                self.vms = None
                self.notes.append(f"QEMU guests left out: {err}")

    def size_mib(self, mib: float) -> int:
        return max(4, int(mib * self.scale))

    def describe(self) -> str:
        parts = []
        if "java" in self.programs:
            parts.append(f"3 JVMs (java -Xms256m, {self.size_mib(160)} MiB of 8 KiB strings, 60 % copies of 64 templates, each)")
        if "node" in self.programs:
            parts.append(f"3 Node.js ({self.size_mib(96)} MiB of 256 KiB buffers copied from 16 templates each)")
        if "redis-server" in self.programs:
            parts.append(f"redis-server ({self.redis_keys()} unique keys x 1 KiB, DEBUG POPULATE)")
        if self.python:
            parts.append(f"2 Python workers ({self.size_mib(192)} MiB: 50 % duplicates; "
                         f"{self.size_mib(128)} MiB unique at 4 Hz)")
        if self.vms is not None:
            s = self.vms.spec
            parts.append(f"2 QEMU guests ({self.vms.accel}, {s.memory // MiB} MiB RAM, "
                         f"{s.shared // MiB} MiB shared image, {s.unique // MiB} MiB unique, "
                         f"{s.zero // MiB} MiB zero; guest RAM registered by QEMU, THP asked for)")
        return "; ".join(parts)

    def redis_keys(self) -> int:
        return self.size_mib(256) * 1024 * 3 // 4

    def candidate_names(self, kids) -> list[str]:
        return list(CANDIDATE_NAMES)

    def start(self, register: str, qemu: bool, log) -> list:
        kids: list = []
        try:
            if self.vms is not None:        # booting takes longest: first, while the rest fill
                run = self.vms.start(seed=0)
                kids += [Guest(run, i, self.vm_memory) for i in range(len(run.guests))]
            if "java" in self.programs:
                for i in range(3):
                    kids.append(Program(f"java-{i + 1}", [self.programs["java"], "-Xms256m",
                                        f"-Xmx{max(512, 4 * self.size_mib(160))}m",
                                        os.path.join(self.workdir, "Heap.java"),
                                        str(self.size_mib(160))], register, cwd=self.workdir))
            if "node" in self.programs:
                for i in range(3):
                    kids.append(Program(f"node-{i + 1}", [self.programs["node"],
                                        os.path.join(self.workdir, "hold.js"),
                                        str(self.size_mib(96))], register, cwd=self.workdir))
            if "redis-server" in self.programs:
                kids.append(Redis(self.programs["redis-server"], register, self.redis_keys(), 1024,
                                  self.workdir))
            if self.python:
                kids.append(self.child_cls("py-worker-a", self.size_mib(192) * MiB, dup=0.5,
                                           private_seed=21, register=register))
                kids.append(self.child_cls("py-worker-b", self.size_mib(128) * MiB, private_seed=22,
                                           volatile_hz=4.0, register=register))
            for k in kids:
                k.wait_ready()
            time.sleep(2.0)     # let the JVMs' and Node's start-up work pass
        except BaseException:
            for k in kids:
                k.stop()
            raise
        return kids

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":      # a quick look: start everything once, print the pids, stop
    host = RealHost(float(sys.argv[1]) if len(sys.argv) > 1 else 0.1, None, print)
    print(host.describe(), host.notes)
