"""A small hand-built nics report that reaches every kind of row: a cell with both VMMs and a
ratio, a failed run whose message holds a '|', a VMM that never succeeded, QEMU's n/a for
8139too, a backend that could not run at all, and a no-guest table."""
import copy

_REPORT = {
    "host": "emulating KVM (<test> & co)",
    "host_label": "emulating KVM (<test> & co) -- guest CPU bound: these are not device numbers "
                  "(see the no-guest mode)",
    "emulating": True,
    "runs": 2, "mib": 1, "pings": 5,
    "models": ["e1000", "rtl8139-too"],
    "backends": ["tap", "vde"],
    "qemu": "QEMU emulator version 8.2.0",
    # The tables and the chart read the summaries only; the runs are left empty.
    "cells": [
        {"backend": "tap", "model": "e1000", "nicvm_device": "e1000", "qemu_device": "e1000",
         "nicvm": {"runs": [], "errors": [], "runs_ok": 2, "summary": {
             "boot_to_lease_s": {"median": 30.4, "min": 30.1, "max": 30.7, "n": 2},
             "h2g_mbit_s": {"median": 2.0, "min": 1.5, "max": 2.5, "n": 2},
             "frames_per_s": {"median": 1500.0, "min": 1400.0, "max": 1600.0, "n": 2}},
             "bytes_moved": 4194304, "bytes_checked": 4194304},
         "qemu": {"runs": [], "errors": ["exit status 1: a | b"], "runs_ok": 1, "summary": {
             "boot_to_lease_s": {"median": 40.0, "min": 40.0, "max": 40.0, "n": 1},
             "h2g_mbit_s": {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}},
             "bytes_moved": 2097152, "bytes_checked": 2097152}},
        {"backend": "tap", "model": "rtl8139-too", "nicvm_device": "rtl8139,cplus=off",
         "qemu_device": None,
         "nicvm": {"runs": [], "errors": ["no DHCP lease"], "runs_ok": 0, "summary": {},
                   "bytes_moved": 0, "bytes_checked": 0},
         "qemu": {"na": "QEMU's rtl8139 is always C+ (no cplus=off)"}},
        {"backend": "vde", "model": "e1000", "nicvm_device": "e1000", "qemu_device": "e1000",
         "nicvm": {"na": "vde_switch is not installed"},
         "qemu": {"na": "vde_switch is not installed"}},
        {"backend": "vde", "model": "rtl8139-too", "nicvm_device": "rtl8139,cplus=off",
         "qemu_device": None,
         "nicvm": {"na": "vde_switch is not installed"},
         "qemu": {"na": "vde_switch is not installed"}},
    ],
    "no_guest": {"frame_len": 1514, "rows": [
        {"model": "e1000", "direction": "tx", "ns_per_frame_model": 2500,
         "ns_per_frame_floor": 2000, "ratio": 1.25},
        {"model": "virtio-net", "direction": "rx", "ns_per_frame_model": 900,
         "ns_per_frame_floor": 1000, "ratio": 0.9}]},
}


def report():
    """A fresh copy, so a test may change it."""
    return copy.deepcopy(_REPORT)
