"""The SVG chart of a nics report, drawn by hand (standard library only): one panel per
metric, bars per frontend grouped by backend, QEMU's beside nicvm's, min-max whiskers."""
import math

from .matrix import METRICS, MODELS

CHARTS = ["h2g_mbit_s", "g2h_mbit_s", "boot_to_lease_s", "rtt_median_ms", "cpu_s_per_gb"]
COLORS = {"rtl8139-cp": "#d95f02", "rtl8139-too": "#e6ab02", "e1000": "#1b9e77",
          "virtio-net": "#7570b3", "virtio-net-mq": "#e7298a"}
BAR_W, GAP, GROUP_GAP, LEFT, PANEL_H, TOP = 16, 2, 28, 70, 170, 90


def esc(s):
    """Text for SVG: the host kind and error messages can hold <, > and &."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_max(v):
    """The top of an axis: the smallest 1, 2, 2.5 or 5 times a power of ten that holds v."""
    if v <= 0:
        return 1
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def short(v):
    """A bar's label, narrow enough to fit over it."""
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.3g}"


def svg(report):
    """Bars per frontend (QEMU's beside nicvm's, lighter), grouped by backend; one panel per
    metric; whiskers show min-max."""
    cells = report["cells"]
    backends = [b for b in report["backends"] if any(
        c["backend"] == b and c.get("nicvm", {}).get("summary") for c in cells)]
    models = report["models"]
    vmms = ["nicvm"] + (["qemu"] if any(c.get("qemu", {}).get("summary") for c in cells) else [])
    per_group = len(models) * (len(vmms) * BAR_W + GAP * 2)
    width = max(LEFT + max(len(backends), 1) * (per_group + GROUP_GAP) + 20, 780)
    charts = [k for k in CHARTS if any(k in (c.get(v, {}).get("summary") or {})
                                       for c in cells for v in vmms)]
    height = TOP + len(charts) * (PANEL_H + 50) + 30
    o = _head(report, models, vmms, width, height)
    y0 = TOP
    for key in charts:
        o += _panel(key, cells, backends, models, vmms, width, y0)
        y0 += PANEL_H + 50
    o.append("</svg>")
    return "\n".join(o) + "\n"


def _head(report, models, vmms, width, height):
    """The title, the host kind (red with its warning on an emulating host) and the legend."""
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="10" y="20" font-size="14" font-weight="bold">nicvm NIC frontends: '
         f'{esc(report["mib"])} MiB each way, medians of {report["runs"]} (whiskers: min-max)'
         f'</text>',
         f'<text x="10" y="36" fill="{"#b00" if report["emulating"] else "#333"}">'
         f'host: {esc(report["host"])}</text>']
    if report["emulating"]:
        o.append('<text x="10" y="50" fill="#b00">guest CPU bound: these are not device '
                 'numbers (see the no-guest mode)</text>')
    lx = 10
    for m in models:
        o.append(f'<rect x="{lx}" y="58" width="10" height="10" fill="{COLORS[m]}"/>'
                 f'<text x="{lx + 14}" y="67">{esc(MODELS[m][0])}</text>')
        lx += 20 + 7 * len(MODELS[m][0])
    if "qemu" in vmms:
        o.append(f'<rect x="{lx}" y="58" width="10" height="10" fill="#999" opacity="0.45"/>'
                 f'<text x="{lx + 14}" y="67">lighter: QEMU (same kernel, NIC, backend)</text>')
    return o


def _panel(key, cells, backends, models, vmms, width, y0):
    """One metric's panel from y0 down: its title, a grid of five lines scaled to the largest
    max, and a group of bars per backend (n/a where QEMU or a cell has nothing to show)."""
    title = next(c[1] for c in METRICS if c[0] == key)
    better = next(c[4] for c in METRICS if c[0] == key)
    vals = [c[v]["summary"][key]["max"] for c in cells for v in vmms
            if key in (c.get(v, {}).get("summary") or {})]
    vmax = nice_max(max(vals) if vals else 1)
    base = y0 + PANEL_H
    o = [f'<text x="10" y="{y0 + 4}" font-size="12" font-weight="bold">{esc(title)} '
         f'<tspan font-weight="normal" fill="#666">({better} is better)</tspan></text>']
    for i in range(5):
        v = vmax * i / 4
        y = base - (PANEL_H - 20) * i / 4
        o.append(f'<line x1="{LEFT}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                 f'stroke="#ddd"/><text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">'
                 f'{v:g}</text>')
    x = LEFT + 10
    for b in backends:
        gx = x
        for m in models:
            cell = next((c for c in cells if c["backend"] == b and c["model"] == m), None)
            for v in vmms:
                s = ((cell or {}).get(v, {}).get("summary") or {}).get(key)
                if s:
                    h = (PANEL_H - 20) * s["median"] / vmax
                    op = "1" if v == "nicvm" else "0.45"
                    o.append(f'<rect x="{x}" y="{base - h:.1f}" width="{BAR_W}" '
                             f'height="{h:.1f}" fill="{COLORS[m]}" opacity="{op}">'
                             f'<title>{esc(b)} {esc(MODELS[m][0])} {v}: '
                             f'{s["median"]:.3g}</title></rect>')
                    if s["n"] > 1:
                        cx = x + BAR_W / 2
                        ylo = base - (PANEL_H - 20) * s["min"] / vmax
                        yhi = base - (PANEL_H - 20) * s["max"] / vmax
                        o.append(f'<line x1="{cx}" x2="{cx}" y1="{ylo:.1f}" y2="{yhi:.1f}" '
                                 f'stroke="black"/>')
                    o.append(f'<text x="{x + BAR_W / 2}" y="{base - h - 3:.1f}" '
                             f'text-anchor="middle" font-size="8">{short(s["median"])}</text>')
                else:
                    o.append(f'<text x="{x + BAR_W / 2}" y="{base - 3}" '
                             f'text-anchor="middle" font-size="8" fill="#999">n/a</text>')
                x += BAR_W
            x += GAP * 2
        o.append(f'<text x="{(gx + x) / 2:.0f}" y="{base + 15}" text-anchor="middle" '
                 f'font-weight="bold">{esc(b)}</text>')
        x += GROUP_GAP
    o.append(f'<line x1="{LEFT}" x2="{width - 10}" y1="{base}" y2="{base}" stroke="#333"/>')
    return o
