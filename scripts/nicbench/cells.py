"""One run of one cell of the nics matrix: a VMM (nicvm or QEMU) boots the guest with one NIC
on one backend; the guest takes a lease, pings the host, receives and sends the reference
stream; the host times each step, checks every byte and, for nicvm, reads NICVM_STATS."""
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from .matrix import MODELS, MULTIQUEUE
from .netns import MQ_NET, MQ_TAP, TAP, TAP_NET, VDE_NET
from .stats import nearest_rank
from .vmm import CellError, Guest, NotComparable, fields, proc_cpu

# The guest's xfer listens on GUEST_PORT (reached through FWD_PORT on the host with user
# networking) and sends to the host's HOST_PORT.
GUEST_PORT, HOST_PORT, FWD_PORT = 5001, 5002, 15001


@dataclass
class Setup:
    """What every run of a bench shares: the VMMs, the guest image and the workload."""
    nicvm: str
    qemu: str | None
    kernel: str
    initrd: str
    emulating: bool  # the KVM host emulates guest kernel code (QEMU must be told, see command)
    mib: int
    pings: int


class Stream:
    """The xorshift64 byte stream the guest's xfer sends, and its FNV-1a, made by the host's
    copy of the same xfer binary (so the two sides cannot disagree about the stream)."""

    def __init__(self, xfer, nbytes):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        p = subprocess.Popen([xfer, "send", "127.0.0.1", str(port), str(nbytes)],
                             stdout=subprocess.PIPE, text=True)
        c, _ = srv.accept()
        chunks = []
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            chunks.append(b)
        c.close()
        srv.close()
        out = p.communicate()[0]
        self.data = b"".join(chunks)
        sent = fields(out.split("NICVM-SENT", 1)[1])
        if len(self.data) != nbytes or sent.get("result") != "ok":
            raise RuntimeError(f"xfer on the host: {out.strip()}")
        self.fnv = sent["fnv1a64"]


def command(setup, vmm, model, backend, vde_sock):
    """The VMM's command line for one run: the guest's steps on its kernel command line, the
    backend as -netdev, the model as -device; QEMU gets the same kernel, initramfs and NIC."""
    _, ndev, qdev, _ = MODELS[model]
    queues = MULTIQUEUE.get(model, 1)
    tap, tap_net = (MQ_TAP, MQ_NET) if queues > 1 else (TAP, TAP_NET)
    host_ip = {"tap": f"{tap_net}.1", "vde": f"{VDE_NET}.1", "user": "10.0.2.2"}[backend]
    steps = (f"pings:{host_ip}:{setup.pings},recv:{GUEST_PORT},"
             f"send:{host_ip}:{HOST_PORT}:{setup.mib},exit")
    append = f"console=ttyS0 quiet nicvm.run={steps}"
    netdev = {
        "tap": f"tap,id=n0,ifname={tap},script=no,downscript=no"
               + (f",queues={queues}" if queues > 1 else ""),
        "user": f"user,id=n0,hostfwd=tcp:127.0.0.1:{FWD_PORT}-:{GUEST_PORT}",
        "vde": f"vde,id=n0,sock={vde_sock}",
    }[backend]
    smp = ["-smp", str(queues)] if queues > 1 else []
    if vmm == "nicvm":
        return [setup.nicvm, "-m", "128", *smp, "-nographic", "-kernel", setup.kernel,
                "-initrd", setup.initrd, "-append", append, "-netdev", netdev,
                "-device", f"{ndev},netdev=n0"]
    # QEMU cannot present nicvm's emulating-host CPUID leaf: the guest is told on its command
    # line instead.
    return [setup.qemu, "-enable-kvm",
            "-cpu", "host,-arch-capabilities" if setup.emulating else "host",
            "-m", "128", *smp, "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
            "-kernel", setup.kernel, "-initrd", setup.initrd,
            "-append", append + (" nicvm_emulated" if setup.emulating else ""),
            "-netdev", netdev, "-device", f"{qdev},netdev=n0"]


def guest_cpus(boot, vmm, model):
    """The vCPUs the guest brought up (its NICVM-BOOT line's fields); NotComparable when
    fewer than the cell gave it: a multiqueue guest then uses fewer queue pairs, and a
    one-vCPU guest beside a two-vCPU one measures nothing about the NICs. (QEMU on an
    emulating host: its firmware cannot start the other vCPUs, so its MP table lists only
    the first, and the project's guest kernel has no ACPI to find them otherwise.)"""
    want = MULTIQUEUE.get(model, 1)
    got = int(boot.get("cpus", "0"))
    if got < want:
        raise NotComparable(f"the guest brought up {got} of its {want} vCPUs under {vmm}, "
                            f"so its driver used {got} queue pair(s): not the cell's guest")
    return got


class Receiver:
    """The host's end of the guest's send step. It listens before the guest boots; once
    started, a thread takes the connection and reads to EOF, sampling the VMM's CPU time at
    accept and at EOF, into self.got."""

    def __init__(self, deadline, port=HOST_PORT):
        self.deadline = deadline
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("0.0.0.0", port))
        self.srv.listen(1)
        self.got = {}
        self.thread = None

    def start(self, pid):
        self.thread = threading.Thread(target=self._receive, args=(pid,), daemon=True)
        self.thread.start()

    def _receive(self, pid):
        got = self.got
        self.srv.settimeout(self.deadline)
        try:
            c, _ = self.srv.accept()
        except OSError as e:
            got["error"] = str(e)
            return
        got["cpu0"], got["t0"] = proc_cpu(pid), time.monotonic()
        chunks = []
        c.settimeout(self.deadline)
        try:
            while True:
                b = c.recv(1 << 20)
                if not b:
                    break
                chunks.append(b)
        except OSError as e:
            got["error"] = str(e)
        got["t1"], got["cpu1"] = time.monotonic(), proc_cpu(pid)
        got["data"] = b"".join(chunks)
        c.close()

    def join(self):
        self.thread.join(self.deadline)

    def close(self):
        """Stops listening at once, also with the thread still waiting for the guest (a cell
        that ended early): a close alone leaves the socket listening while that thread's
        wait holds it, and the next cell could not bind the port."""
        try:
            self.srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.srv.close()
        if self.thread is not None:
            self.thread.join(5)


def run_cell(setup, vmm, model, backend, stream, vde_sock, progress):
    """One boot of one cell; returns the run's metrics or raises CellError."""
    driver = MODELS[model][3]
    stats_path = os.path.join(tempfile.gettempdir(), f"nicvm-bench-stats-{os.getpid()}.json")
    if os.path.exists(stats_path):
        os.unlink(stats_path)
    env = dict(os.environ, NICVM_LOG="warn", NICVM_STATS=stats_path)
    cmd = command(setup, vmm, model, backend, vde_sock)

    deadline = 360 + 40 * setup.mib
    rx = Receiver(deadline)
    g = Guest(cmd, env, deadline)
    rx.start(g.p.pid)
    r = {}
    try:
        progress.set(phase="booting")
        _, boot = g.wait_line("BOOT")
        r["guest_cpus"] = guest_cpus(boot, vmm, model)
        t, nic = g.wait_line("NIC")
        if nic.get("driver") != driver:
            raise CellError(f"guest driver {nic.get('driver')}, expected {driver}")
        if nic.get("lease", "none") == "none":
            raise CellError("no DHCP lease")
        r["boot_to_lease_s"] = t - g.t0
        r["guest_lease_uptime_s"] = float(nic.get("t", "nan"))
        guest_ip = nic["lease"].split("/")[0]

        progress.set(phase=f"{setup.pings} pings")
        _, pings = g.wait_line("PINGS")
        rtts = sorted(float(x) for x in pings.get("rtts", "none").split(",") if x != "none")
        if not rtts:
            raise CellError("no ping replies")
        r["pings_answered"] = len(rtts)
        r["rtt_median_ms"] = statistics.median(rtts)
        r["rtt_p99_ms"] = nearest_rank(rtts, 0.99)

        progress.set(phase=f"{setup.mib} MiB host->guest")
        g.wait_line("LISTEN")
        addr = ("127.0.0.1", FWD_PORT) if backend == "user" else (guest_ip, GUEST_PORT)
        s = None
        for _ in range(100):
            try:
                s = socket.create_connection(addr, timeout=10)
                break
            except OSError:
                time.sleep(0.3)
        if s is None:
            raise CellError(f"cannot connect to the guest at {addr}")
        c0, t0 = proc_cpu(g.p.pid), time.monotonic()
        s.settimeout(deadline)
        s.sendall(stream.data)
        s.shutdown(socket.SHUT_WR)
        t1, recv = g.wait_line("RECV")
        c1 = proc_cpu(g.p.pid)
        s.close()
        h2g_ok = recv.get("bytes") == str(len(stream.data)) and recv.get("fnv1a64") == stream.fnv
        if not h2g_ok:
            raise CellError(f"host->guest: guest got {recv.get('bytes')} bytes "
                            f"fnv1a64={recv.get('fnv1a64')}, sent {len(stream.data)} {stream.fnv}")
        r["h2g_mbit_s"] = len(stream.data) * 8 / (t1 - t0) / 1e6

        progress.set(phase=f"{setup.mib} MiB guest->host")
        _, sent = g.wait_line("SENT")
        rx.join()
        got = rx.got
        if "data" not in got:
            raise CellError(f"guest->host: {got.get('error', 'nothing arrived')}")
        data = got["data"]
        g2h_ok = (sent.get("result") == "ok" and sent.get("fnv1a64") == stream.fnv
                  and data == stream.data)
        if not g2h_ok:
            raise CellError(f"guest->host: {len(data)} bytes arrived, guest says {sent}")
        r["g2h_mbit_s"] = len(data) * 8 / (got["t1"] - got["t0"]) / 1e6
        r["bytes_moved"] = len(stream.data) + len(data)
        r["bytes_checked"] = (len(stream.data) if h2g_ok else 0) + (len(data) if g2h_ok else 0)
        transfer_s = (t1 - t0) + (got["t1"] - got["t0"])
        r["transfer_s"] = transfer_s
        if None not in (c0, c1, got["cpu0"], got["cpu1"]):
            cpu = (c1 - c0) + (got["cpu1"] - got["cpu0"])
            r["transfer_cpu_s"] = cpu
            r["cpu_s_per_gb"] = cpu / (r["bytes_moved"] / 1e9)

        progress.set(phase="exit")
        code = g.finish()
        if code != 0:
            raise CellError(f"exit status {code}: {g.tail()}")
        ru = g.rusage
        r["vmm_cpu_total_s"] = ru.ru_utime + ru.ru_stime
        r["vmm_wall_s"] = time.monotonic() - g.t0
        r["vmm_peak_rss_mib"] = ru.ru_maxrss / 1024
        if vmm == "nicvm":
            with open(stats_path) as f:
                st = json.load(f)
            nic_stats = st["nics"][0]
            r["nic_stats"] = nic_stats
            frames = nic_stats["tx_frames"] + nic_stats["rx_frames"]
            r["frames_per_s"] = frames / transfer_s
            r["irqs_per_s"] = nic_stats["interrupts"] / transfer_s
        return r
    finally:
        g.kill()
        rx.close()
        if os.path.exists(stats_path):
            os.unlink(stats_path)
