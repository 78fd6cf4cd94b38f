"""What a long bench run tells its user while it runs, on stderr (stdout is the report)."""
import sys
import threading
import time


class Progress:
    """One line on stderr: rewritten every second on a terminal, one line per phase otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.prefix, self.phase, self.t0 = "", "", time.monotonic()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()

    def set(self, prefix=None, phase=""):
        with self.lock:
            if prefix is not None:
                self.prefix, self.t0 = prefix, time.monotonic()
            self.phase = phase
            if not self.tty:
                print(f"bench: {self.prefix}: {phase}", file=sys.stderr, flush=True)
        self._draw()

    def _draw(self):
        if self.tty:
            with self.lock:
                s = f"bench: {self.prefix}: {self.phase} ({time.monotonic() - self.t0:.0f} s)"
            sys.stderr.write("\r\x1b[K" + s[:150])
            sys.stderr.flush()

    def _tick(self):
        while not self.stop.wait(1):
            self._draw()

    def done(self):
        self.stop.set()
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def note(msg, progress=None):
    """A line of its own on stderr; over a progress line on a terminal, that line is cleared
    first so the two do not mix."""
    if progress and progress.tty:
        sys.stderr.write("\r\x1b[K")
    print(f"bench: {msg}", file=sys.stderr, flush=True)
