"""The Markdown tables of a nics report: what `scripts/bench nics` prints at the end and
`scripts/bench table REPORT.json` prints again from the saved JSON."""
import json

from .matrix import METRICS, MODELS


def load(path):
    """A saved report (the JSON `nics --json` writes)."""
    with open(path) as f:
        return json.load(f)


def fmt(m, key, digits):
    """One table cell: the median, with the min-max spread when there was more than one run."""
    if not m or key not in m:
        return "n/a"
    v = m[key]
    s = f"{v['median']:.{digits}f}"
    if v["n"] > 1:
        s += f" ({v['min']:.{digits}f}-{v['max']:.{digits}f})"
    return s


def dead_backends(report):
    """The backends whose every cell is n/a for one same reason, with that reason: such a
    backend is one line under the table, not a row per cell."""
    dead = {}
    for b in report["backends"]:
        nas = {c.get(v, {}).get("na") for c in report["cells"] if c["backend"] == b
               for v in ("nicvm", "qemu") if v in c}
        if len(nas) == 1 and None not in nas:
            dead[b] = nas.pop()
    return dead


def markdown(report):
    """The guest table: a row per cell and VMM, and a nicvm/QEMU ratio row where both ran."""
    cols = METRICS
    out = [f"host: {report['host_label']}; guest: project image (Linux 6.1, busybox), -m 128, "
           f"1 vCPU (-smp N where the NIC says so); {report['mib']} MiB each way, {report['pings']} pings; medians of "
           f"{report['runs']} (min-max)", ""]
    out.append("| backend | NIC | VMM | " + " | ".join(c[1] for c in cols) + " | checked |")
    out.append("|" + "---|" * (len(cols) + 4))
    dead = dead_backends(report)
    for cell in report["cells"]:
        if cell["backend"] in dead:
            continue
        name = MODELS[cell["model"]][0]
        for vmm in ("nicvm", "qemu"):
            res = cell.get(vmm)
            if res is None:
                continue
            if "na" in res:
                out.append(f"| {cell['backend']} | {name} | {vmm} | n/a: {res['na']} |"
                           + " |" * (len(cols)))
                continue
            checked = f"{res['bytes_checked']}/{res['bytes_moved']}" if res["runs_ok"] else "-"
            # A console tail can hold a '|': it would start a new column.
            errs = (f" ({len(res['errors'])} failed: {res['errors'][0].replace('|', '/')})"
                    if res["errors"] else "")
            out.append(f"| {cell['backend']} | {name} | {vmm} | "
                       + " | ".join(fmt(res["summary"], k, d) for k, _, _, d, _ in cols)
                       + f" | {checked}{errs} |")
        n, q = cell.get("nicvm", {}), cell.get("qemu", {})
        if n.get("summary") and q.get("summary"):
            ratios = []
            for k, *_ in cols:
                a, b = n["summary"].get(k), q["summary"].get(k)
                ratios.append(f"{a['median'] / b['median']:.2f}x" if a and b and b["median"]
                              else "")
            out.append(f"| {cell['backend']} | {name} | nicvm/QEMU | "
                       + " | ".join(ratios) + " | |")
    for b, why in dead.items():
        out.append(f"\n{b}: n/a ({why})")
    return "\n".join(out)


def no_guest_table(ng):
    """The no-guest results (scripts/bench-net --json): host ns per frame, model vs floor."""
    out = [f"no guest ({ng['frame_len']}-byte frames; host ns per frame, the model next to a "
           "bare write()/read() on the same tap):", "",
           "| model | direction | ns/frame model | ns/frame floor | ratio |",
           "|---|---|---|---|---|"]
    for row in ng["rows"]:
        out.append(f"| {row['model']} | {row['direction']} | {row['ns_per_frame_model']} | "
                   f"{row['ns_per_frame_floor']} | {row['ratio']:.2f} |")
    # The floor itself with its syscalls batched: what fewer syscalls than frames would save.
    for row in ng.get("uring_floor", []):
        out.append(f"| floor via io_uring ({row['batch']} per enter) | {row['direction']} | "
                   f"{row['ns_per_frame_uring']} | {row['ns_per_frame_floor']} | "
                   f"{row['ratio']:.2f} |")
    # Two queue pairs: a thread per queue against one thread for both (wall clock per frame).
    mq = ng.get("queues") or []
    if mq:
        out += ["", f"{mq[0]['model']} on {mq[0]['queues']} queue pairs (wall-clock ns per "
                "frame): one I/O thread for all queues, then a thread each", "",
                "| direction | reader | one thread | a thread each | ratio |",
                "|---|---|---|---|---|"]
    for row in mq:
        out += [f"| {row['direction']} | {row['model']} | {row['ns_per_frame_one_thread']} | "
                f"{row['ns_per_frame_thread_each']} | {row['ratio']:.2f} |",
                f"| {row['direction']} | floor: read()/write() of each queue | "
                f"{row['floor_ns_per_frame_one_thread']} | "
                f"{row['floor_ns_per_frame_thread_each']} | {row['floor_ratio']:.2f} |"]
    return "\n".join(out)


def tables(report):
    """Everything a report prints: the guest table, then the no-guest one when it ran."""
    out = markdown(report)
    ng = report.get("no_guest")
    if ng and "rows" in ng:
        out += "\n\n" + no_guest_table(ng)
    return out
