"""The SVG chart: well-formed, and the bars, whiskers and labels the report calls for."""
import unittest
import xml.etree.ElementTree as ET

from nicbench.chart import COLORS, nice_max, short, svg
from nicbench.matrix import MODELS

from .sample import report

NS = "{http://www.w3.org/2000/svg}"


def parse(report_):
    return ET.fromstring(svg(report_))


def bars(root):
    """The bars: the only rects with a tooltip."""
    return [r for r in root.iter(NS + "rect") if r.find(NS + "title") is not None]


def texts(root):
    return ["".join(t.itertext()) for t in root.iter(NS + "text")]


class Chart(unittest.TestCase):
    def test_every_model_has_a_colour(self):
        self.assertEqual(set(COLORS), set(MODELS))

    def test_well_formed_and_sized(self):
        text = svg(report())
        self.assertTrue(text.endswith("</svg>\n"))
        root = ET.fromstring(text)
        self.assertEqual(root.tag, NS + "svg")
        # Two panels (the sample has two charted metrics) of 170 + 50 under a 90 header.
        self.assertEqual((root.get("width"), root.get("height")), ("780", "560"))

    def test_a_panel_per_charted_metric_in_chart_order(self):
        titles = [t for t in texts(parse(report())) if "is better)" in t]
        # frames/s has numbers too but is not one of the charts.
        self.assertEqual(titles, ["host->guest Mbit/s (higher is better)",
                                  "boot->lease s (lower is better)"])

    def test_a_bar_per_summarized_vmm_and_metric(self):
        got = [b.find(NS + "title").text for b in bars(parse(report()))]
        self.assertEqual(got, ["tap e1000 nicvm: 2", "tap e1000 qemu: 1",
                               "tap e1000 nicvm: 30.4", "tap e1000 qemu: 40"])

    def test_bar_height_is_the_median_on_a_nice_axis(self):
        nicvm, qemu = bars(parse(report()))[:2]
        # host->guest: the largest max is 2.5, so the axis tops at 2.5 over 150 px.
        self.assertEqual(nicvm.get("height"), "120.0")
        self.assertEqual(qemu.get("height"), "60.0")
        self.assertEqual((nicvm.get("opacity"), qemu.get("opacity")), ("1", "0.45"))

    def test_whiskers_only_where_there_was_more_than_one_run(self):
        whiskers = [w for w in parse(report()).iter(NS + "line") if w.get("stroke") == "black"]
        self.assertEqual(len(whiskers), 2)
        self.assertEqual((whiskers[0].get("y1"), whiskers[0].get("y2")), ("170.0", "110.0"))

    def test_na_where_a_cell_has_nothing_to_draw(self):
        # Per panel: 8139too on nicvm (every run failed) and on QEMU (no cplus=off).
        self.assertEqual(texts(parse(report())).count("n/a"), 4)

    def test_a_dead_backend_gets_no_group(self):
        labels = [t for t in texts(parse(report())) if t in ("tap", "vde")]
        self.assertEqual(labels, ["tap", "tap"])

    def test_header_escapes_the_host_and_warns_on_an_emulating_host(self):
        t = texts(parse(report()))
        self.assertIn("host: emulating KVM (<test> & co)", t)
        self.assertIn("guest CPU bound: these are not device numbers (see the no-guest mode)", t)
        r = report()
        r["emulating"] = False
        self.assertFalse(any("guest CPU bound" in x for x in texts(parse(r))))

    def test_legend_has_each_model_and_qemu(self):
        t = texts(parse(report()))
        for label in ("e1000", "rtl8139 (8139too)", "lighter: QEMU (same kernel, NIC, backend)"):
            self.assertIn(label, t)

    def test_without_qemu_no_light_bars_and_no_qemu_legend(self):
        r = report()
        for c in r["cells"]:
            c.pop("qemu")
        root = parse(r)
        self.assertEqual(len(bars(root)), 2)
        self.assertFalse(any(x.startswith("lighter: QEMU") for x in texts(root)))
        self.assertEqual(texts(root).count("n/a"), 2)

    def test_no_results_still_draws_an_empty_chart(self):
        r = report()
        r["cells"] = []
        root = parse(r)
        self.assertEqual(bars(root), [])
        self.assertEqual(root.get("height"), "120")


class Scale(unittest.TestCase):
    def test_nice_max(self):
        for v, top in ((0, 1), (-3, 1), (0.3, 0.5), (1, 1), (7, 10), (12, 20), (21, 25),
                       (30, 50), (100, 100), (101, 200), (6723, 10000)):
            self.assertAlmostEqual(nice_max(v), top, msg=v)

    def test_short_labels(self):
        self.assertEqual(short(12.345), "12.3")
        self.assertEqual(short(0.5), "0.5")
        self.assertEqual(short(999), "999")
        self.assertEqual(short(1000), "1.0k")
        self.assertEqual(short(6601.4), "6.6k")


if __name__ == "__main__":
    unittest.main()
