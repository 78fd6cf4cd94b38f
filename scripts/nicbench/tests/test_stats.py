"""Medians, spreads and the RTT percentile, on inputs whose answers are known."""
import json
import unittest

from nicbench.matrix import METRICS
from nicbench.stats import nearest_rank, spread, summarize


class Spread(unittest.TestCase):
    def test_odd_count(self):
        self.assertEqual(spread([3.0, 1.0, 2.0]), {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3})

    def test_even_count_takes_the_mean_of_the_middle_two(self):
        self.assertEqual(spread([4, 1, 3, 2]), {"median": 2.5, "min": 1, "max": 4, "n": 4})

    def test_one_run_is_its_own_median_and_spread(self):
        self.assertEqual(spread([7.5]), {"median": 7.5, "min": 7.5, "max": 7.5, "n": 1})

    def test_key_order_is_the_json_schema(self):
        # The saved report lists them in this order; a reorder would change every JSON file.
        self.assertEqual(json.dumps(spread([1, 2])),
                         '{"median": 1.5, "min": 1, "max": 2, "n": 2}')


class Summarize(unittest.TestCase):
    def test_each_metric_over_the_runs_that_have_it(self):
        runs = [{"h2g_mbit_s": 1.0, "rtt_median_ms": 5.0, "bytes_moved": 10},
                {"h2g_mbit_s": 3.0},
                {"h2g_mbit_s": 2.0, "rtt_median_ms": 7.0}]
        self.assertEqual(summarize(runs), {
            "h2g_mbit_s": {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3},
            "rtt_median_ms": {"median": 6.0, "min": 5.0, "max": 7.0, "n": 2},
        })

    def test_metrics_come_in_table_order_and_others_are_left_out(self):
        run = {key: float(i) for i, (key, *_) in enumerate(reversed(METRICS))}
        run["transfer_s"] = 1.0
        self.assertEqual(list(summarize([run])), [m[0] for m in METRICS])

    def test_no_runs_no_summary(self):
        self.assertEqual(summarize([]), {})


class NearestRank(unittest.TestCase):
    def test_p99_of_twenty_pings_is_the_slowest(self):
        self.assertEqual(nearest_rank(list(range(1, 21)), 0.99), 20)

    def test_p99_of_a_hundred_is_the_ninety_ninth(self):
        self.assertEqual(nearest_rank(list(range(1, 101)), 0.99), 99)

    def test_p99_of_a_hundred_and_one_is_the_hundredth(self):
        self.assertEqual(nearest_rank(list(range(1, 102)), 0.99), 100)

    def test_a_measured_value_never_an_interpolation(self):
        self.assertEqual(nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5), 2.0)
        self.assertEqual(nearest_rank([0.3], 0.99), 0.3)
        self.assertEqual(nearest_rank([1, 2, 3], 0.0), 1)


if __name__ == "__main__":
    unittest.main()
