"""The boot subcommand: boot to /init and exit, nicvm next to QEMU. Start->vcpu (nicvm only:
NICVM_TIMING), start->init (the guest's first /init line), start->exit, and peak RSS with
-m 128; medians over the runs."""
import os
import shutil
import subprocess
import sys
import threading
import time

from . import host
from .stats import spread

APPEND = "console=ttyS0 quiet nicvm.run=exit"


def run_marked(cmd, marker):
    """Runs nicvm to its end with NICVM_TIMING; returns (marks, exit code, the first stdout
    line holding `marker`, or None). marks: "vcpu" (its vcpu-start, seconds from its main),
    "line" (seconds to that line), "exit" (seconds to its end), "rss" (peak RSS in MiB)."""
    env = dict(os.environ, NICVM_TIMING="1", NICVM_LOG="warn")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    marks = {}

    def read_err():
        for line in p.stderr:
            s = line.decode(errors="replace")
            if s.startswith("nicvm-timing: vcpu-start"):
                marks["vcpu"] = float(s.split()[2])

    t = threading.Thread(target=read_err)
    t.start()
    found = None
    for line in p.stdout:
        if marker in line and found is None:
            marks["line"] = time.monotonic() - t0
            found = line
    _, status, usage = os.wait4(p.pid, 0)
    marks["exit"] = time.monotonic() - t0
    t.join()
    marks["rss"] = usage.ru_maxrss / 1024
    return marks, os.waitstatus_to_exitcode(status), found


def boot_once(cmd):
    """Runs one boot; returns dict of seconds and peak RSS in MiB."""
    marks, code, _ = run_marked(cmd, b"NICVM-BOOT")
    if code != 0 or "line" not in marks:
        sys.exit(f"bench: boot failed (exit {code}): {' '.join(cmd)}")
    marks["init"] = marks.pop("line")
    return marks


def row(runs):
    """Per measurement, (median, " (min-max)") as printed, start->vcpu in milliseconds, the
    others in seconds (RSS in MiB); ("n/a", "") when no run has it (QEMU has no start->vcpu)."""
    out = {}
    for k in ("vcpu", "init", "exit", "rss"):
        vals = [r[k] for r in runs if k in r]
        if not vals:
            out[k] = ("n/a", "")
            continue
        if k == "vcpu":  # milliseconds: a few of them, which two decimals of a second hide
            vals = [v * 1000 for v in vals]
        s = spread(vals)
        d = 1 if k == "vcpu" else 2
        out[k] = (f"{s['median']:.{d}f}",
                  f" ({s['min']:.{d}f}-{s['max']:.{d}f})" if s["n"] > 1 else "")
    return out


def table(kind, nruns, results):
    """The boot table for [(VMM name, row)], with nicvm/QEMU ratios of the printed medians
    when both ran."""
    out = ["", f"host: {kind}; guest: project image, -m 128, 1 vCPU; medians of {nruns} "
           "(min-max); times from process start", "",
           "| VMM | start->vcpu ms | start->init s | start->exit s | peak RSS MiB |",
           "|---|---|---|---|---|"]
    for name, r in results:
        cells = [f"{v}{s}" for v, s in (r["vcpu"], r["init"], r["exit"], r["rss"])]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(results) == 2:
        n, q = results[0][1], results[1][1]
        for k, lbl in (("init", "start->init"), ("exit", "start->exit"), ("rss", "peak RSS")):
            if "n/a" in (n[k][0], q[k][0]):  # only with --runs 0
                continue
            out.append(f"ratio nicvm/qemu {lbl}: {float(n[k][0]) / float(q[k][0]):.2f}")
    return "\n".join(out)


def run(nicvm, guest, nruns, no_qemu):
    """Boots nicvm (and QEMU, when installed and wanted) nruns times each; prints the table."""
    gd = host.guest_dir(guest)
    kernel, initrd = os.path.join(gd, "vmlinux"), os.path.join(gd, "initramfs.cpio")
    kind = host.host_label(nicvm)
    emulating = "emulating" in kind
    series = [("nicvm", [nicvm, "-m", "128", "-nographic", "-kernel", kernel, "-initrd", initrd,
                         "-append", APPEND])]
    qemu = shutil.which("qemu-system-x86_64")
    if qemu and not no_qemu:
        # QEMU cannot present nicvm's emulating-host CPUID leaf: say it on the command line.
        qappend = APPEND + (" nicvm_emulated" if emulating else "")
        cpu = "host,-arch-capabilities" if emulating else "host"
        series.append(("qemu", [qemu, "-enable-kvm", "-cpu", cpu, "-m", "128", "-nographic",
                                "-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel",
                                kernel, "-initrd", initrd, "-append", qappend]))
    results = []
    for name, cmd in series:
        runs = []
        for i in range(nruns):
            print(f"bench: {name} boot {i + 1}/{nruns}", file=sys.stderr, flush=True)
            runs.append(boot_once(cmd))
        results.append((name, row(runs)))
    print(table(kind, nruns, results))
    return 0
