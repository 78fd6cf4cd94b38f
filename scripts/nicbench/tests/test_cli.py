"""scripts/bench itself, as a user runs it, on the saved report of a real run in docs/bench/:
`table` prints docs/bench/nics.md and `svg` draws docs/bench/nics.svg again, byte for byte.
When a change to the tables or the chart is meant, regenerate those two files with
`scripts/bench table docs/bench/nics.json > docs/bench/nics.md` (it ends in a blank line) and
`scripts/bench svg docs/bench/nics.json`."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

from nicbench import ROOT, cli

BENCH = os.path.join(ROOT, "scripts/bench")
DOCS = os.path.join(ROOT, "docs/bench")


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def read(path):
    with open(path) as f:
        return f.read()


class SavedReport(unittest.TestCase):
    def test_table_prints_the_committed_tables(self):
        r = bench("table", os.path.join(DOCS, "nics.json"))
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        self.assertEqual(r.stdout.rstrip("\n"), read(os.path.join(DOCS, "nics.md")).rstrip("\n"))

    def test_svg_draws_the_committed_chart(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "chart.svg")
            r = bench("svg", os.path.join(DOCS, "nics.json"), out)
            self.assertEqual((r.returncode, r.stdout, r.stderr), (0, out + "\n", ""))
            self.assertEqual(read(out), read(os.path.join(DOCS, "nics.svg")))

    def test_svg_goes_beside_the_report_by_default(self):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(os.path.join(DOCS, "nics.json"), os.path.join(tmp, "run.json"))
            r = bench("svg", "run.json", cwd=tmp)
            self.assertEqual((r.returncode, r.stdout), (0, "run.svg\n"))
            self.assertEqual(read(os.path.join(tmp, "run.svg")),
                             read(os.path.join(DOCS, "nics.svg")))


class Usage(unittest.TestCase):
    def test_table_and_svg_need_a_report(self):
        for sub, usage in (("table", "usage: scripts/bench table REPORT.json\n"),
                           ("svg", "usage: scripts/bench svg REPORT.json [OUT.svg]\n")):
            r = bench(sub)
            self.assertEqual((r.returncode, r.stdout, r.stderr), (1, "", usage))

    def test_unknown_subcommand(self):
        r = bench("bogus")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr, "bench: unknown subcommand bogus "
                                   "(nics, boot, restore, net, svg, table; -h for help)\n")

    def test_help_names_every_subcommand(self):
        for flag in ("-h", "--help", "help"):
            r = bench(flag)
            self.assertEqual(r.returncode, 0)
            self.assertTrue(r.stdout.startswith("nicvm benchmarks (python3 standard library"))
            for usage in ("scripts/bench [nics]", "scripts/bench boot", "scripts/bench restore",
                          "scripts/bench net",
                          "scripts/bench svg JSON", "scripts/bench table JSON"):
                self.assertIn(usage, r.stdout)

    def test_nics_checks_its_options_before_it_runs(self):
        # In-process, with the run itself replaced: a check that let one through must not
        # start a real bench.
        for args, msg in ((["--models", "foo"], "--models: foo? (one of rtl8139-cp, "
                                                "rtl8139-too, e1000, virtio-net, virtio-net-mq)"),
                          (["nics", "--backends", "tap,foo"], "--backends: foo? (one of tap, "
                                                              "user, vde)"),
                          (["nics", "--runs", "0"], "--runs, --mib and --pings must be at "
                                                    "least 1")):
            err = io.StringIO()
            with mock.patch("nicbench.nics.run") as run, contextlib.redirect_stderr(err), \
                    self.assertRaises(SystemExit) as exit_:
                cli.main(args)
            run.assert_not_called()
            self.assertEqual(exit_.exception.code, 2, args)
            self.assertTrue(err.getvalue().endswith(f"scripts/bench nics: error: {msg}\n"),
                            err.getvalue())

    def test_nics_is_the_default_and_gets_its_options(self):
        with mock.patch("nicbench.nics.run", return_value=0) as run:
            self.assertEqual(cli.main(["--models", "e1000,virtio-net", "--backends", "user",
                                       "--runs", "1", "--no-qemu"]), 0)
        a, models, backends = run.call_args.args
        self.assertEqual((models, backends), (["e1000", "virtio-net"], ["user"]))
        self.assertEqual((a.runs, a.mib, a.pings, a.no_qemu, a.no_netbench, a.netbench_args),
                         (1, 4, 20, True, False, "--quick"))
        self.assertEqual(a.json, os.path.join(ROOT, "target/bench/nics.json"))

    def test_restore_checks_its_options_and_gets_them(self):
        for args in (["restore", "--runs", "0"], ["restore", "--clones", "-1"]):
            err = io.StringIO()
            with mock.patch("nicbench.restore.run") as run, contextlib.redirect_stderr(err), \
                    self.assertRaises(SystemExit) as exit_:
                cli.main(args)
            run.assert_not_called()
            self.assertEqual(exit_.exception.code, 2, args)
            self.assertIn("--runs must be at least 1, --clones at least 0", err.getvalue())
        with mock.patch("nicbench.restore.run", return_value=0) as run:
            self.assertEqual(cli.main(["restore", "--device", "e1000", "--clones", "3"]), 0)
        nicvm, guest, runs, device, clones = run.call_args.args
        self.assertEqual((runs, device, clones, guest), (5, "e1000", 3, None))
        self.assertEqual(nicvm, os.path.join(ROOT, "target/release/nicvm"))


if __name__ == "__main__":
    unittest.main()
