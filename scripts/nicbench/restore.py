"""The restore subcommand: boot -> lease next to restore -> lease, from one snapshot taken just
before the guest's DHCP (-save-on), on a user network with the chosen NIC. Per run: boot->lease
(process start to the guest's NICVM-NIC line), restore->vcpu (NICVM_TIMING vcpu-start of the
restoring nicvm: reading the snapshot, mapping RAM, restoring KVM and devices), restore->lease;
then --clones restores at once (each its own user network): the time until every one has its
lease. Medians over the runs (min-max)."""
import os
import subprocess
import sys
import tempfile
import threading
import time

from . import host
from .boot import run_marked
from .stats import spread

BEFORE_DHCP = "NICVM-DHCP start"
APPEND = "console=ttyS0 quiet nicvm.run=exit"


def run_once(cmd):
    """Runs nicvm to its end; returns (seconds to the guest's lease, vcpu-start seconds or
    None)."""
    marks, code, line = run_marked(cmd, b"NICVM-NIC ")
    if code != 0 or line is None or b"lease=none" in line:
        sys.exit(f"bench: no lease (exit {code}): {' '.join(cmd)}")
    return marks["line"], marks.get("vcpu")


def fmt(vals, scale=1.0, digits=2):
    s = spread([v * scale for v in vals])
    tail = f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})" if s["n"] > 1 else ""
    return f"{s['median']:.{digits}f}{tail}"


def run(nicvm, guest, nruns, device, nclones):
    gd = host.guest_dir(guest)
    kernel, initrd = os.path.join(gd, "vmlinux"), os.path.join(gd, "initramfs.cpio")
    kind = host.host_label(nicvm)
    net = ["-netdev", "user,id=n0", "-device", f"{device},netdev=n0"]
    boot = [nicvm, "-m", "128", "-nographic", "-kernel", kernel, "-initrd", initrd,
            "-append", APPEND, *net]
    with tempfile.TemporaryDirectory(prefix="nicvm-bench-") as d:
        snap = os.path.join(d, "guest.snap")
        print("bench: saving the guest before DHCP", file=sys.stderr, flush=True)
        r = subprocess.run([*boot, "-save-on", f"console={BEFORE_DHCP},file={snap}"],
                           stdin=subprocess.DEVNULL, capture_output=True,
                           env=dict(os.environ, NICVM_LOG="warn"))
        if r.returncode != 0 or not os.path.exists(snap):
            sys.exit(f"bench: saving failed (exit {r.returncode}): {r.stderr.decode()[-500:]}")
        size = os.path.getsize(snap) >> 20
        disk = os.stat(snap).st_blocks * 512 >> 20
        restore = [nicvm, "-m", "128", "-nographic", *net, "-incoming", f"file:{snap}"]
        boots, restores, vcpus = [], [], []
        for i in range(nruns):
            print(f"bench: run {i + 1}/{nruns}: boot, restore", file=sys.stderr, flush=True)
            boots.append(run_once(boot)[0])
            lease, vcpu = run_once(restore)
            restores.append(lease)
            vcpus.append(vcpu)
        clones = []
        if nclones > 0:
            print(f"bench: {nclones} clones at once", file=sys.stderr, flush=True)
            results = [None] * nclones
            t0 = time.monotonic()

            def one(i):
                results[i] = run_once(restore)[0]

            ts = [threading.Thread(target=one, args=(i,)) for i in range(nclones)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            clones = [time.monotonic() - t0, max(results), min(results)]
    out = ["", f"host: {kind}; {device} on a user network, -m 128, 1 vCPU; snapshot "
           f"{size} MiB ({disk} MiB on disk); medians of {nruns} (min-max)", "",
           "| | seconds |", "|---|---|",
           f"| boot -> lease | {fmt(boots)} |",
           f"| restore -> lease | {fmt(restores)} |",
           f"| restore -> first guest instruction (ms) | {fmt(vcpus, 1e3, 1)} |"]
    if clones:
        out.append(f"| {nclones} clones at once -> every lease | {clones[0]:.2f} "
                   f"(first {clones[2]:.2f}) |")
    print("\n".join(out))
    return 0
