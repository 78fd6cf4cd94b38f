"""The Markdown tables, compared as exact text."""
import unittest

from nicbench.report import dead_backends, fmt, markdown, no_guest_table, tables

from .sample import report

GUEST_TABLE = """\
host: emulating KVM (<test> & co) -- guest CPU bound: these are not device numbers (see the \
no-guest mode); guest: project image (Linux 6.1, busybox), -m 128, 1 vCPU (-smp N where the NIC says so); 1 MiB each way, \
5 pings; medians of 2 (min-max)

| backend | NIC | VMM | boot->lease s | host->guest Mbit/s | guest->host Mbit/s | RTT median ms \
| RTT p99 ms | CPU s/GB | frames/s | irq/s | checked |
|---|---|---|---|---|---|---|---|---|---|---|---|
| tap | e1000 | nicvm | 30.4 (30.1-30.7) | 2.0 (1.5-2.5) | n/a | n/a | n/a | n/a \
| 1500 (1400-1600) | n/a | 4194304/4194304 |
| tap | e1000 | qemu | 40.0 | 1.0 | n/a | n/a | n/a | n/a | n/a | n/a \
| 2097152/2097152 (1 failed: exit status 1: a / b) |
| tap | e1000 | nicvm/QEMU | 0.76x | 2.00x |  |  |  |  |  |  | |
| tap | rtl8139 (8139too) | nicvm | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a \
| - (1 failed: no DHCP lease) |
| tap | rtl8139 (8139too) | qemu | n/a: QEMU's rtl8139 is always C+ (no cplus=off) \
| | | | | | | | |

vde: n/a (vde_switch is not installed)"""

NO_GUEST_TABLE = """\
no guest (1514-byte frames; host ns per frame, the model next to a bare write()/read() on the \
same tap):

| model | direction | ns/frame model | ns/frame floor | ratio |
|---|---|---|---|---|
| e1000 | tx | 2500 | 2000 | 1.25 |
| virtio-net | rx | 900 | 1000 | 0.90 |"""


class Fmt(unittest.TestCase):
    def test_median_with_spread_when_more_than_one_run(self):
        s = {"k": {"median": 1.25, "min": 1.0, "max": 1.5, "n": 3}}
        self.assertEqual(fmt(s, "k", 2), "1.25 (1.00-1.50)")

    def test_median_alone_for_one_run(self):
        self.assertEqual(fmt({"k": {"median": 6601.4, "min": 6601.4, "max": 6601.4, "n": 1}},
                             "k", 0), "6601")

    def test_missing_is_na(self):
        self.assertEqual(fmt({}, "k", 1), "n/a")
        self.assertEqual(fmt({"other": {}}, "k", 1), "n/a")


class Markdown(unittest.TestCase):
    def test_every_kind_of_row(self):
        self.assertEqual(markdown(report()), GUEST_TABLE)

    def test_no_guest_table(self):
        self.assertEqual(no_guest_table(report()["no_guest"]), NO_GUEST_TABLE)

    def test_the_batched_floor_follows_the_models(self):
        ng = report()["no_guest"]
        ng["uring_floor"] = [{"direction": "TX", "frames": 1000, "batch": 64,
                              "ns_per_frame_uring": 270, "ns_per_frame_floor": 290,
                              "ratio": 0.931}]
        self.assertEqual(no_guest_table(ng), NO_GUEST_TABLE
                         + "\n| floor via io_uring (64 per enter) | TX | 270 | 290 | 0.93 |")

    def test_the_two_queue_case_follows_the_models(self):
        ng = report()["no_guest"]
        ng["queues"] = [{"model": "virtio-net", "direction": d, "queues": 2, "frames": 960,
                         "ns_per_frame_one_thread": 887, "ns_per_frame_thread_each": 534,
                         "ratio": 0.602, "floor_ns_per_frame_one_thread": 840,
                         "floor_ns_per_frame_thread_each": 462, "floor_ratio": 0.55}
                        for d in ("RX", "TX")]
        self.assertEqual(no_guest_table(ng), NO_GUEST_TABLE + "\n\n"
                         "virtio-net on 2 queue pairs (wall-clock ns per frame): one I/O "
                         "thread for all queues, then a thread each\n\n"
                         "| direction | reader | one thread | a thread each | ratio |\n"
                         "|---|---|---|---|---|\n"
                         "| RX | virtio-net | 887 | 534 | 0.60 |\n"
                         "| RX | floor: read()/write() of each queue | 840 | 462 | 0.55 |\n"
                         "| TX | virtio-net | 887 | 534 | 0.60 |\n"
                         "| TX | floor: read()/write() of each queue | 840 | 462 | 0.55 |")

    def test_tables_put_the_no_guest_one_after_a_blank_line(self):
        self.assertEqual(tables(report()), GUEST_TABLE + "\n\n" + NO_GUEST_TABLE)

    def test_a_failed_no_guest_run_prints_no_table(self):
        r = report()
        r["no_guest"] = {"error": "cargo: not found"}
        self.assertEqual(tables(r), GUEST_TABLE)
        r["no_guest"] = None
        self.assertEqual(tables(r), GUEST_TABLE)

    def test_a_backend_is_dead_only_when_all_its_cells_say_the_same(self):
        r = report()
        self.assertEqual(dead_backends(r), {"vde": "vde_switch is not installed"})
        r["cells"][3]["qemu"] = {"na": "another reason"}
        self.assertEqual(dead_backends(r), {})
        self.assertIn("| vde | e1000 | nicvm | n/a: vde_switch is not installed |",
                      markdown(r))

    def test_no_ratio_row_without_both_summaries(self):
        r = report()
        del r["cells"][0]["qemu"]
        self.assertNotIn("nicvm/QEMU", markdown(r))


if __name__ == "__main__":
    unittest.main()
