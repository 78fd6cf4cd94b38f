"""The nics subcommand: the whole matrix (backends x models x VMMs x runs) in a private network
namespace, then its report: JSON (every run), SVG, and the tables on stdout."""
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

from . import ROOT, host
from .cells import Setup, Stream, run_cell
from .chart import svg
from .matrix import MODELS, MULTIQUEUE
from .netns import Netns
from .progress import Progress, note
from .report import tables
from .stats import summarize
from .vmm import CellError, NotComparable

QEMU_NO_CPLUS_OFF = "QEMU's rtl8139 is always C+ (no cplus=off)"


def new_report(kind, setup, runs, models, backends):
    """The report's header: what ran where; cells and no_guest are filled in as they run."""
    label = kind
    if setup.emulating:
        label += " -- guest CPU bound: these are not device numbers (see the no-guest mode)"
    else:
        label = "hardware KVM: " + label
    report = {"host": kind, "host_label": label, "emulating": setup.emulating,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux "
                         f"{platform.release()}",
              "runs": runs, "mib": setup.mib, "pings": setup.pings, "models": models,
              "backends": backends, "qemu": None, "cells": [], "no_guest": None,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if setup.qemu:
        report["qemu"] = subprocess.run([setup.qemu, "--version"], capture_output=True,
                                        text=True).stdout.splitlines()[0]
    return report


def result(runs, errors):
    """A cell's entry for one VMM: its runs, their failures and their summary."""
    return {"runs": runs, "errors": errors, "runs_ok": len(runs), "summary": summarize(runs),
            "bytes_moved": sum(r["bytes_moved"] for r in runs),
            "bytes_checked": sum(r["bytes_checked"] for r in runs)}


def measure(report, setup, nruns, na_backend, xfer, netbench_args, progress):
    """Runs the matrix into report["cells"] inside a fresh namespace (removed however this
    ends), then the no-guest mode unless netbench_args is None."""
    ns = None
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        ns = Netns()
        vde_sock = None
        if "vde" in report["backends"] and "vde" not in na_backend:
            try:
                vde_sock = ns.vde_switch()
            except (RuntimeError, OSError) as e:
                na_backend["vde"] = f"vde_switch: {e}"
        stream = Stream(xfer, setup.mib << 20)
        vmms = ["nicvm"] + (["qemu"] if setup.qemu else [])
        plan = [(b, m) for b in report["backends"] for m in report["models"]]
        total = len(plan) * len(vmms) * nruns
        done = 0
        for b, m in plan:
            cell = {"backend": b, "model": m, "nicvm_device": MODELS[m][1],
                    "qemu_device": MODELS[m][2]}
            for vmm in vmms:
                if b in na_backend:
                    cell[vmm] = {"na": na_backend[b]}
                    done += nruns
                    continue
                if m in MULTIQUEUE and b != "tap":
                    cell[vmm] = {"na": "a multiqueue model runs on a multiqueue tap only"}
                    done += nruns
                    continue
                if vmm == "qemu" and MODELS[m][2] is None:
                    cell[vmm] = {"na": QEMU_NO_CPLUS_OFF}
                    done += nruns
                    continue
                runs, errors, na = [], [], None
                for i in range(nruns):
                    done += 1
                    progress.set(f"[{done}/{total}] {b} {MODELS[m][0]} {vmm} run {i + 1}/{nruns}",
                                 "starting")
                    try:
                        runs.append(run_cell(setup, vmm, m, b, stream, vde_sock, progress))
                    except NotComparable as e:
                        na = str(e)
                        note(f"{b} {MODELS[m][0]} {vmm}: n/a: {e}", progress)
                        done += nruns - i - 1
                        break
                    except (CellError, OSError) as e:
                        errors.append(str(e)[:300])
                        note(f"{b} {MODELS[m][0]} {vmm} run {i + 1}: {e}", progress)
                        # A QEMU built without vde fails every run alike: one is enough.
                        if vmm == "qemu" and b == "vde" and not runs:
                            break
                cell[vmm] = {"na": na} if na else result(runs, errors)
            report["cells"].append(cell)
        progress.done()
        if netbench_args is not None:
            note(f"no-guest mode: scripts/bench-net --json {netbench_args}", progress)
            r = subprocess.run([os.path.join(ROOT, "scripts/bench-net"), "--json",
                                *netbench_args.split()], capture_output=True, text=True)
            if r.returncode == 0:
                report["no_guest"] = json.loads(r.stdout)
            else:
                report["no_guest"] = {"error": r.stderr.strip()[-500:]}
    finally:
        progress.done()
        signal.signal(signal.SIGTERM, old_term)
        if ns:
            ns.close()


def run(a, models, backends):
    """The nics subcommand with its parsed options; the exit status is 1 when a cell's VMM
    failed every run."""
    if os.geteuid() != 0:
        sys.exit("bench: needs root (a private network namespace with a tap)")
    gd = host.guest_dir(a.guest)
    if not os.path.exists(a.nicvm):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "nicvm"], cwd=ROOT, check=True)
    kind = host.host_label(a.nicvm)
    setup = Setup(nicvm=a.nicvm, qemu=None if a.no_qemu else shutil.which("qemu-system-x86_64"),
                  kernel=os.path.join(gd, "vmlinux"), initrd=os.path.join(gd, "initramfs.cpio"),
                  emulating="emulating" in kind, mib=a.mib, pings=a.pings)
    report = new_report(kind, setup, a.runs, models, backends)
    na_backend = {}
    if "vde" in backends:
        p = host.vde_problem(a.nicvm)
        if p:
            na_backend["vde"] = p
            note(f"vde column n/a: {p}")

    measure(report, setup, a.runs, na_backend, os.path.join(gd, "xfer"),
            None if a.no_netbench else a.netbench_args, Progress())
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # The JSON first: the measurements survive whatever drawing the chart does.
    for path, make in ((a.json, lambda: json.dumps(report, indent=1) + "\n"),
                       (a.svg, lambda: svg(report))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(make())
    print(tables(report))
    print(f"\nJSON: {a.json}\nSVG: {a.svg}")
    failed = [c for c in report["cells"] for v in ("nicvm", "qemu")
              if c.get(v, {}).get("errors") and not c[v].get("runs_ok")]
    return 1 if failed else 0
