"""The boot subcommand's table, from made-up boot timings."""
import unittest

from nicbench.boot import row, table

NICVM = [{"vcpu": 0.0031, "init": 2.0, "exit": 2.5, "rss": 20.0},
         {"vcpu": 0.0125, "init": 3.0, "exit": 3.5, "rss": 22.0},
         {"vcpu": 0.0048, "init": 2.5, "exit": 3.0, "rss": 21.0}]
QEMU = [{"init": 5.0, "exit": 6.0, "rss": 42.0}]


class Boot(unittest.TestCase):
    def test_row_is_median_and_spread_and_na_for_what_was_not_measured(self):
        self.assertEqual(row(NICVM), {"vcpu": ("4.8", " (3.1-12.5)"),
                                      "init": ("2.50", " (2.00-3.00)"),
                                      "exit": ("3.00", " (2.50-3.50)"),
                                      "rss": ("21.00", " (20.00-22.00)")})
        self.assertEqual(row(QEMU)["vcpu"], ("n/a", ""))
        self.assertEqual(row(QEMU)["init"], ("5.00", ""))

    def test_table_with_ratios(self):
        self.assertEqual(table("emulating KVM", 3, [("nicvm", row(NICVM)), ("qemu", row(QEMU))]),
                         "\nhost: emulating KVM; guest: project image, -m 128, 1 vCPU; medians "
                         "of 3 (min-max); times from process start\n\n"
                         "| VMM | start->vcpu ms | start->init s | start->exit s | peak RSS MiB |\n"
                         "|---|---|---|---|---|\n"
                         "| nicvm | 4.8 (3.1-12.5) | 2.50 (2.00-3.00) | 3.00 (2.50-3.50) "
                         "| 21.00 (20.00-22.00) |\n"
                         "| qemu | n/a | 5.00 | 6.00 | 42.00 |\n"
                         "ratio nicvm/qemu start->init: 0.50\n"
                         "ratio nicvm/qemu start->exit: 0.50\n"
                         "ratio nicvm/qemu peak RSS: 0.50")

    def test_no_ratios_for_nicvm_alone_or_for_no_runs(self):
        self.assertNotIn("ratio", table("k", 3, [("nicvm", row(NICVM))]))
        self.assertNotIn("ratio", table("k", 0, [("nicvm", row([])), ("qemu", row([]))]))


if __name__ == "__main__":
    unittest.main()
