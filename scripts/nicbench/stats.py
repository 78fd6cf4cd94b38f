"""The figures a bench prints from the values it measured: a median with its min-max spread
(every table cell and bar shows both, so one lucky or unlucky run cannot pass for the result),
and nearest-rank percentiles for the RTT tail."""
import math
import statistics

from .matrix import METRICS


def spread(vals):
    """Median, min, max and count of a non-empty list (the JSON report's summary entry)."""
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def summarize(runs):
    """The spread of each metric over the runs that measured it; a metric no run measured is
    left out (the tables say n/a, the chart draws no bar)."""
    out = {}
    for key, *_ in METRICS:
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = spread(vals)
    return out


def nearest_rank(sorted_vals, q):
    """The q-quantile of a sorted non-empty list by nearest rank: always a value that was
    measured, never an interpolation (of 20 pings, p99 is the slowest)."""
    return sorted_vals[max(math.ceil(q * len(sorted_vals)) - 1, 0)]
