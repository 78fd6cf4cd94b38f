"""The private network namespace a nics run lives in, so its taps, DHCP servers and ports
cannot clash with the host's: set up at the start, removed at the end, also on failure."""
import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
import time

# The tap the tap backend's guests reach, and the one behind the vde_switch; each has its own
# /24 with dnsmasq on .1.
TAP, TAP_NET = "bntap0", "192.168.77"
VDE_TAP, VDE_NET = "bnvde0", "192.168.78"
# The multiqueue tap of the multiqueue models (a tap made without multi_queue refuses them,
# one made with it refuses single-queue opens).
MQ_TAP, MQ_NET = "bnmq0", "192.168.79"


def sh(cmd, check=True):
    """Runs a shell command line (the ip calls chain with &&); with check, its failure raises
    with the command's own stderr, which says what the host lacks."""
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r


def listening(path):
    """Whether a Unix stream socket accepts connections (its file appears at bind, a moment
    before the server listens)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


class Netns:
    """A private network namespace this process enters (threads and children started later
    live in it too): lo, a tap with dnsmasq, and, for vde, a vde_switch with its own tap."""

    def __init__(self):
        self.name = f"nicvm-bench-{os.getpid()}"
        self.children = []
        self.tmp = tempfile.mkdtemp(prefix="nicvm-bench-")
        sh(f"ip netns add {self.name} && ip -n {self.name} link set lo up")
        self.home = None
        try:
            self._populate()
        except BaseException:
            self.close()
            raise

    def _populate(self):
        sh(f"ip -n {self.name} tuntap add dev {TAP} mode tap && "
           f"ip -n {self.name} addr add {TAP_NET}.1/24 dev {TAP} && "
           f"ip -n {self.name} link set {TAP} up && "
           f"ip -n {self.name} tuntap add dev {MQ_TAP} mode tap multi_queue && "
           f"ip -n {self.name} addr add {MQ_NET}.1/24 dev {MQ_TAP} && "
           f"ip -n {self.name} link set {MQ_TAP} up")
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        self.enter(fd)
        os.close(fd)
        self.dnsmasq(TAP, TAP_NET)
        self.dnsmasq(MQ_TAP, MQ_NET)

    @staticmethod
    def enter(fd):
        # CLONE_NEWNET: only the network namespace changes, for this (the main) thread.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    def dnsmasq(self, iface, net):
        self.children.append(subprocess.Popen(
            ["dnsmasq", "--no-daemon", f"--interface={iface}", "--bind-interfaces",
             "--except-interface=lo", f"--dhcp-range={net}.50,{net}.60,255.255.255.0,1h",
             "--port=0", "--no-resolv", "--no-hosts",
             f"--dhcp-leasefile={self.tmp}/{iface}.leases", "--pid-file="],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.3)

    def vde_switch(self):
        """A vde_switch whose other port is a tap with a DHCP server; returns its socket dir."""
        sock = os.path.join(self.tmp, "vde.ctl")
        p = subprocess.Popen(["vde_switch", "-s", sock, "-t", VDE_TAP], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.children.append(p)
        for _ in range(50):
            if listening(os.path.join(sock, "ctl")) and os.path.exists(
                    f"/sys/class/net/{VDE_TAP}"):
                break
            if p.poll() is not None:
                raise RuntimeError(f"vde_switch exited: {p.stderr.read().decode().strip()}")
            time.sleep(0.1)
        sh(f"ip addr add {VDE_NET}.1/24 dev {VDE_TAP} && ip link set {VDE_TAP} up")
        self.dnsmasq(VDE_TAP, VDE_NET)
        return sock

    def close(self):
        for c in self.children:
            c.kill()
            c.wait()
        # Back home first, so that the clean-up's own processes are not in there.
        if self.home is not None:
            self.enter(self.home)
            os.close(self.home)
            self.home = None
        # Whatever else is still in there (not this process: its other threads may be).
        sh(f"ip netns pids {self.name} | grep -vx {os.getpid()} | xargs -r kill -9; "
           f"ip netns del {self.name}", check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
