"""The VMM process under test (nicvm or QEMU) and what its guest says: the project's guest
reports each step on its console as a NICVM-<TAG> line of key=value fields."""
import os
import queue
import signal
import subprocess
import threading
import time


class CellError(Exception):
    """A run of a cell that failed; its message goes into the report and the table."""


class NotComparable(CellError):
    """The VMM ran, but not the guest the cell is about (fewer vCPUs came up than it was
    given): the cell is n/a for it, with this reason, and is not run again."""


def proc_cpu(pid):
    """User+sys CPU seconds of a live process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def fields(rest):
    """The key=value fields of a NICVM-<TAG> line (or of xfer's own report) as a dict."""
    return dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)


class Guest:
    """A VMM process booting the guest; its console lines are timestamped as they arrive."""

    def __init__(self, cmd, env, deadline):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        self.lines = queue.Queue()
        self.console, self.err = [], []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()
        self.rusage = None

    def _read(self):
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.console.append(line)
            self.lines.put((time.monotonic(), line))
        self.lines.put((time.monotonic(), None))

    def wait_line(self, tag):
        """(arrival time, fields) of the next NICVM-<tag> line."""
        prefix = f"NICVM-{tag}"
        while True:
            left = self.deadline - time.monotonic()
            try:
                t, line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise CellError(f"no {prefix} line within the deadline; last: {self.tail()}") \
                    from None
            if line is None:
                raise CellError(f"the VMM exited before {prefix}: {self.tail()}")
            # QEMU's firmware ends its last message without a newline ("Booting from
            # ROM.."): the guest's first line follows it on the same line.
            line = line[max(line.find("NICVM-"), 0):]
            if line.startswith("NICVM-ERROR"):
                raise CellError(line)
            if line.startswith(prefix + " ") or line == prefix:
                return t, fields(line[len(prefix):])

    def tail(self):
        """The last three console and stderr lines: what an error message quotes."""
        err = b"".join(self.err).decode(errors="replace").strip().splitlines()[-3:]
        return " | ".join(self.console[-3:] + err)

    def finish(self):
        """Waits for the VMM to exit (killing it at the deadline); its status, with the
        rusage of the whole process in self.rusage."""
        if self.p.returncode is not None:
            return self.p.returncode
        while True:
            pid, status, ru = os.wait4(self.p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > self.deadline:
                os.kill(self.p.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(self.p.pid, 0)
                break
            time.sleep(0.05)
        self.rusage = ru
        self.p.returncode = os.waitstatus_to_exitcode(status)
        return self.p.returncode

    def kill(self):
        if self.p.returncode is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.finish()
