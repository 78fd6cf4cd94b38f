"""The VMM command lines of a cell: both VMMs get the same guest steps, kernel and NIC."""
import unittest

from nicbench.cells import Receiver, Setup, command, guest_cpus
import os
import socket

from nicbench.vmm import Guest, NotComparable


def setup(emulating):
    return Setup(nicvm="nicvm", qemu="qemu", kernel="K", initrd="I", emulating=emulating,
                 mib=2, pings=5)


class Command(unittest.TestCase):
    def test_nicvm_on_tap(self):
        self.assertEqual(command(setup(True), "nicvm", "rtl8139-too", "tap", None), [
            "nicvm", "-m", "128", "-nographic", "-kernel", "K", "-initrd", "I", "-append",
            "console=ttyS0 quiet nicvm.run=pings:192.168.77.1:5,recv:5001,"
            "send:192.168.77.1:5002:2,exit",
            "-netdev", "tap,id=n0,ifname=bntap0,script=no,downscript=no",
            "-device", "rtl8139,cplus=off,netdev=n0"])

    def test_qemu_on_user_is_told_about_an_emulating_host(self):
        cmd = command(setup(True), "qemu", "virtio-net", "user", None)
        self.assertEqual(cmd[:4], ["qemu", "-enable-kvm", "-cpu", "host,-arch-capabilities"])
        self.assertEqual(cmd[cmd.index("-append") + 1],
                         "console=ttyS0 quiet nicvm.run=pings:10.0.2.2:5,recv:5001,"
                         "send:10.0.2.2:5002:2,exit nicvm_emulated")
        self.assertEqual(cmd[-4:], ["-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:15001-:5001",
                                    "-device", "virtio-net-pci,netdev=n0"])

    def test_multiqueue_model_gets_vcpus_and_a_multiqueue_tap(self):
        for vmm in ["nicvm", "qemu"]:
            cmd = command(setup(False), vmm, "virtio-net-mq", "tap", None)
            self.assertEqual(cmd[cmd.index("-smp") + 1], "2")
            self.assertIn("tap,id=n0,ifname=bnmq0,script=no,downscript=no,queues=2", cmd)
            self.assertIn("192.168.79.1", cmd[cmd.index("-append") + 1])
        self.assertEqual(command(setup(False), "nicvm", "virtio-net-mq", "tap", None)[-1],
                         "virtio-net-pci,mq=on,netdev=n0")

    def test_qemu_on_hardware_kvm_on_vde(self):
        cmd = command(setup(False), "qemu", "e1000", "vde", "/tmp/vde.ctl")
        self.assertEqual(cmd[3], "host")
        self.assertFalse(cmd[cmd.index("-append") + 1].endswith("nicvm_emulated"))
        self.assertIn("vde,id=n0,sock=/tmp/vde.ctl", cmd)


class GuestCpus(unittest.TestCase):
    def test_a_multiqueue_guest_with_one_vcpu_is_not_the_cells_guest(self):
        with self.assertRaises(NotComparable) as e:
            guest_cpus({"cpus": "1", "uptime": "3.1"}, "qemu", "virtio-net-mq")
        self.assertIn("1 of its 2 vCPUs under qemu", str(e.exception))
        self.assertEqual(guest_cpus({"cpus": "2"}, "nicvm", "virtio-net-mq"), 2)
        self.assertEqual(guest_cpus({"cpus": "1"}, "qemu", "e1000"), 1)
        with self.assertRaises(NotComparable):
            guest_cpus({}, "nicvm", "virtio-net")


class ConsoleLines(unittest.TestCase):
    def test_a_line_after_qemus_firmware_message_is_found(self):
        g = Guest(["sh", "-c", "printf 'SeaBIOS\\nBooting from ROM..NICVM-BOOT uptime=1.5 cpus=1\\n"
                   "NICVM-NIC lease=10.0.2.15/24\\n'"], dict(os.environ), 10)
        self.assertEqual(g.wait_line("BOOT")[1], {"uptime": "1.5", "cpus": "1"})
        self.assertEqual(g.wait_line("NIC")[1], {"lease": "10.0.2.15/24"})
        g.p.wait()
        g.p.stdout.close()
        g.p.stderr.close()


if __name__ == "__main__":
    unittest.main()


class ReceiverEnds(unittest.TestCase):
    def test_a_cell_ended_before_the_guest_sent_frees_the_port(self):
        rx = Receiver(deadline=60, port=0)
        port = rx.srv.getsockname()[1]
        rx.start(os.getpid())  # waits for a connection that never comes
        rx.close()
        self.assertFalse(rx.thread.is_alive())
        # The next cell binds the same port at once.
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            s.listen(1)
        finally:
            s.close()
