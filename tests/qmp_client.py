"""Drives nicvm's QMP with QEMU's own client library (qemu.qmp from PyPI, unmodified).

Run by tests/qmp.rs with the virtualenv scripts/setup makes:
    qmp_client.py protocol UNIX_SOCKET TCP_PORT
        a VM started stopped (-S) with NICs e1000 (id=e), rtl8139 (id=r), virtio-net-pci
        (id=v): every command, error class and event but the guest's; ends with quit.
    qmp_client.py flap UNIX_SOCKET NAME...
        set_link off for every NAME, then waits for a line "up" on stdin, then on.
    qmp_client.py filter UNIX_SOCKET NAME
        prints query-rx-filter of NAME as one JSON line, and whether NIC_RX_FILTER_CHANGED
        came.
    qmp_client.py quit UNIX_SOCKET
        quit; prints the SHUTDOWN event's data.
    qmp_client.py watch UNIX_SOCKET
        prints "watching", then every event as a JSON line until SHUTDOWN.
    qmp_client.py held UNIX_SOCKET
        a VM started stopped (-S) with -no-shutdown, whose guest powers off once continued:
        SHUTDOWN and STOP come, the VM stays, stopped in "shutdown", cont is refused as QEMU
        refuses it; then quit.
Prints "OK" last when every check passed; a failed check raises (non-zero exit).
"""

import asyncio
import json
import socket
import sys

from qemu.qmp import ExecuteError, QMPClient


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def error_class(qmp, cmd, args=None):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as e:
        return e.error_class, e.error.error.desc
    raise AssertionError(f"{cmd} {args} should have failed")


async def next_event(qmp, name, timeout=10):
    while True:
        ev = await asyncio.wait_for(qmp.events.get(), timeout)
        if ev["event"] == name:
            return ev


async def close(qmp):
    """Disconnects; after quit the VM has closed the connection already (as QEMU does)."""
    try:
        await qmp.disconnect()
    except (EOFError, ConnectionError, OSError):
        pass


def raw(path, data, read=True):
    """Sends raw bytes on a fresh connection after negotiating; returns what came back."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rb")
    greeting = json.loads(f.readline())
    check("QMP" in greeting, f"greeting {greeting}")
    s.sendall(b'{"execute": "qmp_capabilities"}')
    check(json.loads(f.readline()) == {"return": {}}, "raw negotiation")
    s.sendall(data)
    reply = json.loads(f.readline()) if read else None
    s.close()
    return reply


async def protocol(path, tcp_port):
    qmp = QMPClient("nicvm-test")
    await qmp.connect(path)
    check(qmp.greeting.QMP.version["qemu"]["major"] >= 8, "greeting version")
    # A second client at the same time, over TCP.
    other = QMPClient("second")
    await other.connect(("127.0.0.1", tcp_port))

    v = await qmp.execute("query-version")
    check(v["package"].startswith("nicvm"), f"query-version {v}")
    st = await qmp.execute("query-status")
    check(st == {"running": False, "singlestep": False, "status": "prelaunch"}, f"-S: {st}")
    check(await qmp.execute("query-name") == {"name": "qmp-test"}, "query-name")
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for c in ["set_link", "query-rx-filter", "quit", "human-monitor-command", "cont"]:
        check(c in names, f"query-commands lacks {c}")

    check(await qmp.execute("query-kvm") == {"enabled": True, "present": True}, "query-kvm")
    # Each vCPU with the host thread that runs it, as QEMU lists them.
    cpus = await qmp.execute("query-cpus-fast")
    check([c["cpu-index"] for c in cpus] == [0, 1], f"-smp 2: {cpus}")
    for c in cpus:
        with open(f"/proc/{c['thread-id']}/comm") as f:
            comm = f.read().strip()
        check(comm == f"vcpu{c['cpu-index']}" and c["target"] == "x86_64", f"{c}: {comm}")
        # -smp 2,sockets=2: a core on each socket, as QEMU says.
        want = {"socket-id": c["cpu-index"], "core-id": 0, "thread-id": 0}
        check(c["props"] == want, f"{c}")

    pci = await qmp.execute("query-pci")
    devs = {d.get("qdev_id"): d for d in pci[0]["devices"]}
    check(devs["e"]["id"]["vendor"] == 0x8086 and devs["e"]["id"]["device"] == 0x100E, "e1000 ids")
    check(devs["r"]["id"]["vendor"] == 0x10EC and devs["r"]["id"]["device"] == 0x8139, "rtl8139")
    check(devs["v"]["id"]["vendor"] == 0x1AF4, "virtio")
    # The host bridge as the guest sees it (Linux logs [1b36:0008] for 00:00.0).
    host = devs[None]
    check((host["slot"], host["id"]["vendor"], host["id"]["device"]) == (0, 0x1B36, 0x0008),
          f"host bridge {host}")
    check(all(d["class_info"]["class"] == 0x0200 for k, d in devs.items() if k), "class")

    filters = {f["name"]: f for f in await qmp.execute("query-rx-filter")}
    check(set(filters) == {"e", "r", "v"}, f"query-rx-filter names {set(filters)}")
    for f in filters.values():
        for key in ["main-mac", "promiscuous", "multicast", "unicast", "vlan",
                    "broadcast-allowed", "multicast-overflow", "unicast-overflow",
                    "vlan-table", "unicast-table", "multicast-table"]:
            check(key in f, f"query-rx-filter lacks {key}: {f}")
    check(filters["e"]["main-mac"] == "52:54:00:12:34:56", "main-mac")
    one = await qmp.execute("query-rx-filter", {"name": "r"})
    check(len(one) == 1 and one[0]["name"] == "r", "query-rx-filter name=")
    cls, desc = await error_class(qmp, "query-rx-filter", {"name": "nope"})
    check((cls, desc) == ("GenericError", "invalid net client name: nope"), (cls, desc))
    _, desc = await error_class(qmp, "query-rx-filter", {"name": "ne"})
    check(desc == "net client(ne) isn't a NIC", desc)

    # set_link by device id and by netdev id; the monitor's text shows it.
    await qmp.execute("set_link", {"name": "e", "up": False})
    await qmp.execute("set_link", {"name": "nr", "up": False})
    text = await qmp.execute("human-monitor-command", {"command-line": "info network"})
    check("e: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56,link=down" in text, text)
    check("r: index=0,type=nic,model=rtl8139" in text and text.count("link=down") == 4, text)
    await qmp.execute("set_link", {"name": "e", "up": True})
    await qmp.execute("set_link", {"name": "r", "up": True})
    text = await qmp.execute("human-monitor-command", {"command-line": "info network"})
    check("link=down" not in text, text)
    cls, desc = await error_class(qmp, "set_link", {"name": "nope", "up": False})
    check(cls == "DeviceNotFound" and "nope" in desc, f"{cls} {desc}")
    cls, _ = await error_class(qmp, "set_link", {"name": "e"})
    check(cls == "GenericError", cls)

    # Errors: unknown command, a powerdown the machine cannot deliver.
    cls, _ = await error_class(qmp, "no-such-command")
    check(cls == "CommandNotFound", cls)
    cls, desc = await error_class(qmp, "system_powerdown")
    check(cls == "GenericError" and "ACPI" in desc, desc)
    text = await qmp.execute("human-monitor-command", {"command-line": "info status"})
    check(text == "VM status: paused (prelaunch)\r\n", repr(text))
    text = await qmp.execute("human-monitor-command",
                             {"command-line": "info status", "cpu-index": 0})
    check(text == "VM status: paused (prelaunch)\r\n", repr(text))
    for index, want in [("x", "Invalid parameter type for 'cpu-index', expected: integer"),
                        (99, "Parameter 'cpu-index' expects a CPU number")]:
        cls, desc = await error_class(qmp, "human-monitor-command",
                                      {"command-line": "info status", "cpu-index": index})
        check((cls, desc) == ("GenericError", want), (cls, desc))

    # cont / stop, with their events on both clients.
    await qmp.execute("cont")
    ev = await next_event(qmp, "RESUME")
    await next_event(other, "RESUME")
    check("timestamp" in ev, f"event {ev}")
    check("data" not in ev, f"no data member, as QEMU's RESUME: {ev}")
    check((await qmp.execute("query-status"))["status"] == "running", "after cont")
    # stop on a connection of its own: the first line after it is its STOP event, then the
    # answer, as QEMU sends them.
    r = raw(path, b'{"execute": "stop"}')
    check(r.get("event") == "STOP" and "data" not in r, f"STOP before the answer: {r}")
    await next_event(qmp, "STOP")
    st = await other.execute("query-status")
    check(st["status"] == "paused" and not st["running"], f"after stop {st}")

    # Malformed JSON, a huge message, a message cut short: error classes, never a crash.
    r = raw(path, b'{"execute": }')
    check(r["error"]["class"] == "GenericError", f"malformed: {r}")
    r = raw(path, b'{"execute": "query-status", "arguments": {"x": "' + b"a" * 200000 + b'"}}')
    check(r["error"]["class"] == "GenericError", f"huge: {r}")
    r = raw(path, b"[1, 2]")
    check(r["error"]["class"] == "GenericError", f"not an object: {r}")
    r = raw(path, b'{"execute": "query-name", "id": "x7"}')
    check(r == {"id": "x7", "return": {"name": "qmp-test"}}, f"id echoed: {r}")
    raw(path, b'{"execute": "query-st', read=False)   # leaves in the middle
    check((await qmp.execute("query-status"))["status"] == "paused", "still serving")
    await other.disconnect()

    await qmp.execute("quit")
    ev = await next_event(qmp, "SHUTDOWN")
    check(ev["data"] == {"guest": False, "reason": "host-qmp-quit"}, f"SHUTDOWN {ev}")
    await close(qmp)


async def flap(path, names):
    qmp = QMPClient("flap")
    await qmp.connect(path)
    for n in names:
        await qmp.execute("set_link", {"name": n, "up": False})
    print("down", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for n in names:
        await qmp.execute("set_link", {"name": n, "up": True})
    print("up", flush=True)
    await qmp.disconnect()


async def rx_filter(path, name):
    qmp = QMPClient("filter")
    await qmp.connect(path)
    f = await qmp.execute("query-rx-filter", {"name": name})
    print(json.dumps(f[0]), flush=True)
    await qmp.disconnect()


async def watch(path):
    qmp = QMPClient("watch")
    await qmp.connect(path)
    print("watching", flush=True)
    while True:
        ev = await qmp.events.get()
        print(json.dumps({"event": ev["event"], "data": ev.get("data", {})}), flush=True)
        if ev["event"] == "SHUTDOWN":
            break
    await close(qmp)


async def held(path):
    qmp = QMPClient("held")
    await qmp.connect(path)
    print("connected", flush=True)
    # Started with -S: the guest runs once this client listens (on hardware KVM it powers
    # off within a few seconds, before a client that connects late could hear it).
    await qmp.execute("cont")
    ev = await next_event(qmp, "SHUTDOWN", timeout=240)
    check(ev["data"] == {"guest": True, "reason": "guest-shutdown"}, f"SHUTDOWN {ev}")
    await next_event(qmp, "STOP")
    st = await qmp.execute("query-status")
    check(st["status"] == "shutdown" and not st["running"], f"held {st}")
    text = await qmp.execute("human-monitor-command", {"command-line": "info status"})
    check(text == "VM status: paused (shutdown)\r\n", repr(text))
    cls, desc = await error_class(qmp, "cont")
    check(cls == "GenericError" and desc == "Resetting the Virtual Machine is required", desc)
    text = await qmp.execute("human-monitor-command", {"command-line": "cont"})
    check(text == "Error: Resetting the Virtual Machine is required\r\n", repr(text))
    st = await qmp.execute("query-status")
    check(st["status"] == "shutdown", f"still held {st}")
    await qmp.execute("quit")
    ev = await next_event(qmp, "SHUTDOWN")
    check(ev["data"] == {"guest": False, "reason": "host-qmp-quit"}, f"SHUTDOWN {ev}")
    await close(qmp)


async def quit_(path):
    qmp = QMPClient("quit")
    await qmp.connect(path)
    await qmp.execute("quit")
    ev = await next_event(qmp, "SHUTDOWN")
    print(json.dumps(ev["data"]), flush=True)
    await close(qmp)


def main():
    what, path = sys.argv[1], sys.argv[2]
    if what == "protocol":
        asyncio.run(protocol(path, int(sys.argv[3])))
    elif what == "flap":
        asyncio.run(flap(path, sys.argv[3:]))
    elif what == "filter":
        asyncio.run(rx_filter(path, sys.argv[3]))
    elif what == "quit":
        asyncio.run(quit_(path))
    elif what == "watch":
        asyncio.run(watch(path))
    elif what == "held":
        asyncio.run(held(path))
    print("OK", flush=True)


main()
