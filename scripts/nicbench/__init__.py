"""nicvm's benchmarks as a package (python3 standard library only), behind scripts/bench.

cli.py parses the command line and dispatches; each other module holds one part of a run, so
the parts that need no root, KVM or guest (statistics, tables, chart) can be tested alone.
"""
import os

# The repository: target/, scripts/setup and scripts/bench-net are found from here.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
