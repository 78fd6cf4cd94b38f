"""nicvm benchmarks (python3 standard library only; needs root for its network namespace).

  scripts/bench [nics] [options]   the NIC frontend comparison (the default subcommand)
  scripts/bench boot [--runs N] [--no-qemu]
                                   boot to /init and exit, nicvm next to QEMU
  scripts/bench restore [--runs N] [--device MODEL] [--clones N]
                                   boot->lease next to restore->lease from a snapshot taken
                                   before DHCP, restore->first instruction, N clones at once
  scripts/bench net [--quick] [--json] [FRAMES] [FRAME_LEN]
                                   the no-guest mode: each NIC model driven by a synthetic
                                   driver on a tap, host ns per frame next to bare write()/read()
                                   (scripts/bench-net)

nics: boots the project's guest once per cell and run of the matrix
  {rtl8139 (8139cp), rtl8139 cplus=off (8139too), e1000, virtio-net-pci} x {tap, user, vde}
plus virtio-net-pci mq=on (a two-vCPU guest on a two-queue multiqueue tap, tap only)
and measures, per cell:
  boot->lease     process start to the guest's DHCP lease (its NICVM-NIC line), seconds
  host->guest, guest->host
                  TCP throughput, Mbit/s, of --mib MiB each way with the project's xfer helper
                  (xorshift64 stream; every byte is checked: FNV-1a on the guest's side, byte
                  for byte on the host's side); host->guest is timed from connect to the
                  guest's report, guest->host from accept to EOF
  RTT             --pings guest->host pings, 0.2 s apart: median and p99 (nearest rank), ms
  CPU s/GB        the VMM process's user+sys CPU (vCPU threads included) during the two
                  transfers, per GB moved
  frames/s, irq/s nicvm's own counters (NICVM_STATS) over the run, frames both ways, divided
                  by the transfer time (the transfers are nearly all of the frames)
Every cell runs --runs times; the table shows medians and the min-max spread. With QEMU
installed (and no --no-qemu), the same kernel, initramfs, NIC, backend and options run under
qemu-system-x86_64 too, and a ratio row (nicvm/QEMU) follows. QEMU has no plain RTL8139C
(its rtl8139 is always C+), so its 8139too cells are n/a.

The vde column runs when nicvm accepts -netdev vde and vde_switch is installed; otherwise
its cells say why not. Everything runs in a private network namespace (a tap, dnsmasq, lo;
a vde_switch) that is removed at the end, also on failure or Ctrl-C.

Output: a Markdown table on stdout, --json PATH (default target/bench/nics.json, including
the no-guest results unless --no-netbench) and --svg PATH (default target/bench/nics.svg: bars
per frontend grouped by backend, with min-max whiskers). A progress line on stderr. Every
label says what kind of KVM host ran it: on a host whose KVM emulates guest kernel code the
guest's CPU bounds every number, so they say little about the device models themselves
(the no-guest numbers do).

options: --models rtl8139-cp,rtl8139-too,e1000,virtio-net,virtio-net-mq
         --backends tap,user,vde
         --runs N (3)  --mib N (4)  --pings N (20)  --no-qemu  --json PATH  --svg PATH
         --no-netbench  --netbench-args ARGS ("--quick")  --nicvm PATH  --guest DIR
         scripts/bench svg JSON [SVG]   redraws the chart of a saved report
         scripts/bench table JSON       prints the tables of a saved report again
"""
# The docstring above is the -h text, verbatim. This module parses each subcommand's
# arguments and hands them to the module that does the work.
import argparse
import os
import sys

from . import ROOT, boot, nics, restore
from .chart import svg
from .matrix import BACKENDS, MODELS
from .report import load, tables


def cmd_nics(argv):
    """nics: the options are all checked here, before anything needs root or a guest."""
    ap = argparse.ArgumentParser(prog="scripts/bench nics")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--pings", type=int, default=20)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", default=os.path.join(ROOT, "target/bench/nics.json"))
    ap.add_argument("--svg", default=os.path.join(ROOT, "target/bench/nics.svg"))
    ap.add_argument("--no-netbench", action="store_true")
    ap.add_argument("--netbench-args", default="--quick")
    ap.add_argument("--nicvm", default=os.path.join(ROOT, "target/release/nicvm"))
    ap.add_argument("--guest")
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    backends = [b for b in a.backends.split(",") if b]
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: {m}? (one of {', '.join(MODELS)})")
    for b in backends:
        if b not in BACKENDS:
            ap.error(f"--backends: {b}? (one of {', '.join(BACKENDS)})")
    if a.runs < 1 or a.mib < 1 or a.pings < 1:
        ap.error("--runs, --mib and --pings must be at least 1")
    return nics.run(a, models, backends)


def cmd_boot(argv):
    """boot: see boot.py."""
    ap = argparse.ArgumentParser(prog="scripts/bench boot")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--nicvm", default=os.path.join(ROOT, "target/release/nicvm"))
    ap.add_argument("--guest")
    a = ap.parse_args(argv)
    return boot.run(a.nicvm, a.guest, a.runs, a.no_qemu)


def cmd_restore(argv):
    """restore: see restore.py."""
    ap = argparse.ArgumentParser(prog="scripts/bench restore")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="virtio-net-pci")
    ap.add_argument("--clones", type=int, default=10)
    ap.add_argument("--nicvm", default=os.path.join(ROOT, "target/release/nicvm"))
    ap.add_argument("--guest")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.clones < 0:
        ap.error("--runs must be at least 1, --clones at least 0")
    return restore.run(a.nicvm, a.guest, a.runs, a.device, a.clones)


def cmd_table(argv):
    """table REPORT.json: the tables of a saved report, as nics printed them."""
    if not argv:
        sys.exit("usage: scripts/bench table REPORT.json")
    print(tables(load(argv[0])))
    return 0


def cmd_svg(argv):
    """svg REPORT.json [OUT.svg]: redraws a saved report's chart (beside it by default)."""
    if not argv:
        sys.exit("usage: scripts/bench svg REPORT.json [OUT.svg]")
    report = load(argv[0])
    out = argv[1] if len(argv) > 1 else os.path.splitext(argv[0])[0] + ".svg"
    with open(out, "w") as f:
        f.write(svg(report))
    print(out)
    return 0


def main(argv):
    """scripts/bench with its arguments; returns the exit status (nics when no subcommand)."""
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    sub = argv[0] if argv and not argv[0].startswith("-") else "nics"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    if sub == "net":
        os.execv(os.path.join(ROOT, "scripts/bench-net"), ["scripts/bench-net", *rest])
    cmds = {"nics": cmd_nics, "boot": cmd_boot, "restore": cmd_restore, "svg": cmd_svg,
            "table": cmd_table}
    if sub not in cmds:
        sys.exit(f"bench: unknown subcommand {sub} (nics, boot, restore, net, svg, table; -h for help)")
    try:
        return cmds[sub](rest)
    except KeyboardInterrupt:
        return 130
