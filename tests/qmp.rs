//! QMP and the human monitor, driven as test harnesses drive QEMU: QMP through QEMU's own
//! Python client (`qemu.qmp` from PyPI, in the virtualenv scripts/setup makes; see
//! tests/qmp_client.py), HMP over a plain socket and on the console. Most tests start the VM
//! stopped (-S): the protocol needs no running guest. One guest boot flaps the link of every
//! NIC personality and reads the receive filters the guest programmed.

mod support;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The virtualenv's python with qemu.qmp, or None (skipped loudly; a failure in CI).
fn qmp_python() -> Option<PathBuf> {
    let p = std::env::var_os("NICVM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(p);
    }
    let why = format!(
        "no python with qemu.qmp at {} (run scripts/setup)",
        p.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("CI must run the QMP tests, but {why}");
    }
    eprintln!("\n!!!!!! SKIPPING QMP TEST: {why} !!!!!!\n");
    None
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/qmp_client.py")
}

/// A scratch directory, removed when dropped (also when the test fails).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp(what: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("nicvm-qmp-{what}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// nicvm with the guest image's kernel, stdout and stderr collected on threads; killed when
/// dropped (a failed test leaves no nicvm behind).
struct Vm {
    child: Child,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        support::reaper::kill_guest(&mut self.child);
    }
}

fn spawn(img: &Image, append: &str, extra: &[&str], stdin: Stdio) -> Vm {
    let mut child = nicvm_cmd()
        .args(["-kernel", &img.kernel.display().to_string()])
        .args(["-initrd", &img.initrd.display().to_string()])
        .args(["-append", &format!("console=ttyS0 quiet {append}")])
        .args(extra)
        .env("NICVM_LOG", "warn")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nicvm");
    support::reaper::guest_started(child.id());
    let mut o = child.stdout.take().unwrap();
    let mut e = child.stderr.take().unwrap();
    Vm {
        child,
        out: Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = o.read_to_string(&mut s);
            s
        })),
        err: Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            s
        })),
    }
}

/// A stopped VM (-S, no NIC) with a monitor (`-qmp` or `-monitor`) on a Unix socket in `dir`,
/// once that socket is there: (the VM, the socket's path).
fn stopped_vm(img: &Image, dir: &Path, monitor: &str, stdin: Stdio) -> (Vm, PathBuf) {
    let sock = dir.join("monitor.sock");
    let endpoint = format!("unix:{},server=on,wait=off", sock.display());
    let vm = spawn(
        img,
        "",
        &["-S", "-nographic", "-nic", "none", monitor, &endpoint],
        stdin,
    );
    wait_for(&sock);
    (vm, sock)
}

impl Vm {
    /// Waits for the exit (killing nicvm after `deadline`): (status, stdout, stderr).
    fn wait(mut self, deadline: Duration) -> (Option<i32>, String, String) {
        let t0 = Instant::now();
        let code = loop {
            if let Some(s) = support::reaper::try_reap(&mut self.child) {
                break s.code();
            }
            if t0.elapsed() > deadline {
                support::reaper::kill_guest(&mut self.child);
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = self.out.take().unwrap().join().unwrap();
        let err = self.err.take().unwrap().join().unwrap();
        (code, out, err)
    }
}

fn wait_for(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn python(py: &Path, args: &[&str]) -> String {
    let o = Command::new(py)
        .arg(client_script())
        .args(args)
        .output()
        .expect("run python");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && out.lines().last() == Some("OK"),
        "qmp_client.py {args:?} failed\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

const THREE_NICS: [&str; 12] = [
    "-netdev",
    "user,id=ne",
    "-device",
    "e1000,netdev=ne,id=e",
    "-netdev",
    "user,id=nr",
    "-device",
    "rtl8139,netdev=nr,id=r",
    "-netdev",
    "user,id=nv",
    "-device",
    "virtio-net-pci,netdev=nv,id=v",
];

/// Every QMP command and error class, two clients at once (Unix and TCP), events on both,
/// malformed and huge input, a client leaving mid-message; quit exits 0 and removes the
/// socket.
#[test]
fn qmp_commands_errors_and_events_on_a_stopped_vm() {
    let Some(img) = image() else { return };
    let Some(py) = qmp_python() else { return };
    let dir = temp("protocol");
    let sock = dir.join("qmp.sock");
    let port = free_port();
    let mut a: Vec<String> = args(&[
        "-S",
        "-nographic",
        "-name",
        "qmp-test",
        "-smp",
        "2,sockets=2",
    ]);
    a.extend(args(&THREE_NICS));
    a.extend(args(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", sock.display()),
        "-chardev",
        &format!("socket,id=m2,host=127.0.0.1,port={port},server=on,wait=off"),
        "-mon",
        "chardev=m2,mode=control",
    ]));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let vm = spawn(&img, "", &a, Stdio::null());
    wait_for(&sock);
    python(
        &py,
        &["protocol", sock.to_str().unwrap(), &port.to_string()],
    );
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "quit exits 0\n{out}\n{err}");
    assert!(err.contains("terminating on QMP quit"), "{err}");
    assert!(!sock.exists(), "the socket file is removed");
    drop(dir);
}

/// `-mon ...,pretty=on`: answers and events indented as QEMU prints them (four spaces a level,
/// CR LF), which tools that read QEMU's pretty output line by line expect.
#[test]
fn qmp_pretty_on_indents_answers_and_events() {
    let Some(img) = image() else { return };
    let dir = temp("pretty");
    let sock = dir.join("qmp.sock");
    let chardev = format!("socket,id=m,path={},server=on,wait=off", sock.display());
    let vm = spawn(
        &img,
        "",
        &[
            "-S",
            "-nographic",
            "-nic",
            "none",
            "-chardev",
            &chardev,
            "-mon",
            "chardev=m,mode=control,pretty=on",
        ],
        Stdio::null(),
    );
    wait_for(&sock);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // One message: up to the line that closes its outermost object.
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut message = || {
        let mut m = String::new();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "EOF after {m:?}");
            m.push_str(&line);
            if line == "}\r\n" {
                return m;
            }
        }
    };
    let greeting = message();
    assert!(
        greeting.starts_with("{\r\n    \"QMP\": {\r\n        \"")
            && greeting.contains("\r\n        \"version\": {\r\n            \""),
        "{greeting:?}"
    );
    assert!(
        greeting.contains("        \"capabilities\": [\r\n        ]"),
        "{greeting:?}"
    );
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}").unwrap();
    assert_eq!(message(), "{\r\n    \"return\": {\r\n    }\r\n}\r\n");
    s.write_all(b"{\"execute\":\"query-status\",\"id\":7}")
        .unwrap();
    let status = message();
    assert!(
        status.contains("\r\n        \"status\": \"prelaunch\"")
            && status.contains("\r\n    \"id\": 7"),
        "{status:?}"
    );
    s.write_all(b"{\"execute\":\"quit\"}").unwrap();
    // The SHUTDOWN event and quit's answer, in either order.
    let both = [message(), message()].concat();
    assert!(
        both.contains("\r\n    \"event\": \"SHUTDOWN\"")
            && both.contains("\r\n        \"reason\": \"host-qmp-quit\"")
            && both.contains("{\r\n    \"return\": {\r\n    }\r\n}\r\n"),
        "{both:?}"
    );
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    drop(dir);
}

/// QMP as a raw byte stream, where a harness's mistakes land: a line that is not JSON does
/// not take the commands after it down with it; a key given twice is an error, not the last
/// one winning (`"execute":"query-status","execute":"quit"` must not quit); so is a `\u0000`
/// in a string; unexpected arguments are refused; a client sending 2000 commands in one write
/// gets 2000 answers (it is not read while its answers back up, never dropped).
#[test]
fn qmp_byte_stream_resyncs_and_pushes_back() {
    let Some(img) = image() else { return };
    let dir = temp("raw");
    let (vm, sock) = stopped_vm(&img, &dir, "-qmp", Stdio::null());
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = || {
        let mut l = String::new();
        r.read_line(&mut l).expect("an answer within 30 s");
        serde_json::from_str::<serde_json::Value>(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    };
    assert!(line().get("QMP").is_some());
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    assert_eq!(line()["return"], serde_json::json!({}));
    let desc = |v: &serde_json::Value| v["error"]["desc"].as_str().unwrap_or("").to_string();

    // Not JSON, then a command in the same write: an error, then the command's answer.
    w.write_all(b"hello\n{\"execute\":\"query-name\",\"id\":\"A\"}\n")
        .unwrap();
    let e = line();
    assert!(desc(&e).contains("JSON parse error"), "{e}");
    assert_eq!(line()["id"], "A");
    // A broken message between two good ones.
    w.write_all(b"{\"execute\":\"query-name\",\"id\":\"B\"}\n{\"a\":}\n{\"execute\":\"query-name\",\"id\":\"C\"}\n")
        .unwrap();
    assert_eq!(line()["id"], "B");
    assert!(desc(&line()).contains("JSON parse error"));
    assert_eq!(line()["id"], "C");
    // A string left open at a line end: an error there, then the next line's command.
    w.write_all(b"\"\n{\"execute\":\"query-name\",\"id\":\"E\"}\n")
        .unwrap();
    assert!(desc(&line()).contains("JSON parse error"));
    assert_eq!(line()["id"], "E");
    // Too long: one error, then the next line's command.
    let mut long = b"{\"execute\":\"".to_vec();
    long.extend(std::iter::repeat_n(b'x', 200_000));
    long.extend(b"\n{\"execute\":\"query-name\",\"id\":\"D\"}\n");
    w.write_all(&long).unwrap();
    let e = line();
    assert!(desc(&e).contains("longer than"), "{e}");
    assert_eq!(line()["id"], "D");

    // Duplicate keys.
    w.write_all(b"{\"execute\":\"query-status\",\"execute\":\"quit\",\"id\":1}\n")
        .unwrap();
    let e = line();
    assert!(desc(&e).contains("duplicate key 'execute'"), "{e}");
    // A NUL in a string, as QEMU refuses it.
    w.write_all(b"{\"execute\":\"query-status\",\"id\":\"\\u0000\"}\n")
        .unwrap();
    let e = line();
    assert!(desc(&e).contains("\\u0000 is not supported"), "{e}");
    // Unexpected members and arguments.
    w.write_all(b"{\"execute\":\"query-status\",\"foo\":1,\"id\":2}\n")
        .unwrap();
    assert!(desc(&line()).contains("'foo' is unexpected"));
    w.write_all(
        b"{\"execute\":\"set_link\",\"arguments\":{\"name\":\"x\",\"up\":true,\"x\":1},\"id\":3}\n",
    )
    .unwrap();
    assert!(desc(&line()).contains("Parameter 'x' is unexpected"));
    // Single-quoted strings, as QEMU's parser takes them (and its docs' examples use), a '"'
    // and an escaped quote in them; then a broken one and a good one in the same write.
    w.write_all(b"{'execute':'query-name','id':'q\\'\"1'}\n")
        .unwrap();
    let a = line();
    assert_eq!(a["id"], "q'\"1", "{a}");
    assert!(a["return"].is_object(), "{a}");
    w.write_all(b"{'execute':'query-name','id':}\n{'execute':'query-name','id':'q2'}\n")
        .unwrap();
    assert!(desc(&line()).contains("JSON parse error"));
    assert_eq!(line()["id"], "q2");
    // Still running: the duplicate-key quit did not happen.
    w.write_all(b"{\"execute\":\"query-status\",\"id\":4}\n")
        .unwrap();
    let st = line();
    assert_eq!(st["id"], 4);
    assert_eq!(st["return"]["status"], "prelaunch", "{st}");

    // 2000 commands in one write (about 1 MiB of answers), written from a thread since
    // nicvm stops reading until the answers are read.
    let mut batch = Vec::new();
    for i in 0..2000 {
        batch.extend(format!("{{\"execute\":\"query-commands\",\"id\":{i}}}").bytes());
    }
    let mut w2 = w.try_clone().unwrap();
    let writer = std::thread::spawn(move || w2.write_all(&batch).unwrap());
    for i in 0..2000 {
        let a = line();
        assert_eq!(a["id"], i, "answers in order, none lost");
        assert!(a["return"].is_array());
    }
    writer.join().unwrap();

    w.write_all(b"{\"execute\":\"quit\"}\n").unwrap();
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    drop(dir);
}

/// -serial unix:PATH,server=on,wait=off: the guest's console on a socket, and
/// -serial chardev:ID naming a -chardev socket; both removed at exit.
#[test]
fn serial_console_on_a_unix_socket() {
    let Some(img) = image() else { return };
    let dir = temp("serial");
    let sock = dir.join("serial.sock");
    let vm = spawn(
        &img,
        "nicvm.run=exit",
        &[
            "-display",
            "none",
            "-nic",
            "none",
            "-chardev",
            &format!("socket,id=s0,path={},server=on,wait=off", sock.display()),
            "-serial",
            "chardev:s0",
        ],
        Stdio::null(),
    );
    wait_for(&sock);
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(240))).unwrap();
    let mut console = String::new();
    for l in BufReader::new(s).lines() {
        let Ok(l) = l else { break };
        console.push_str(&l);
        console.push('\n');
        if l.contains("NICVM-EXIT") {
            break;
        }
    }
    let (code, out, err) = vm.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        console.contains("NICVM-READY"),
        "the console on the socket:\n{console}"
    );
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert!(!sock.exists());
    drop(dir);
}

/// `-monitor telnet::PORT,server,nowait` with a telnet client that negotiates unasked (as
/// PuTTY does at connect) and sends a no-op and an interrupt among the keys: HMP gets the
/// lines as typed. nicvm itself sends no telnet command (the client keeps its line mode).
#[test]
fn hmp_on_a_telnet_socket_gets_the_lines_without_the_clients_commands() {
    let Some(img) = image() else { return };
    const IAC: u8 = 0xff;
    let mut taken = String::new();
    for _ in 0..5 {
        let port = free_port();
        let monitor = format!("telnet::{port},server,nowait");
        let mut vm = spawn(
            &img,
            "",
            &["-S", "-nographic", "-nic", "none", "-monitor", &monitor],
            Stdio::null(),
        );
        let t0 = Instant::now();
        while !support::net::tcp_listener_of(vm.child.id(), port) {
            if vm.child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no listener on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if vm.child.try_wait().unwrap().is_some() {
            // The port was taken between free_port and nicvm's bind: another one.
            let (_, _, err) = vm.wait(Duration::from_secs(5));
            assert!(err.contains("Address already in use"), "{err}");
            taken = err;
            continue;
        }
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s);
        let mut greeting = Vec::new();
        while !greeting.ends_with(b"(qemu) ") {
            let mut b = [0u8; 1];
            assert_eq!(r.read(&mut b).unwrap(), 1, "{greeting:?}");
            greeting.push(b[0]);
        }
        assert!(!greeting.contains(&IAC), "no negotiation: {greeting:?}");
        // IAC WILL NAWS, IAC SB NAWS 0 80 0 24 IAC SE, IAC DO ECHO; then "info st", IAC NOP,
        // "atus", CR NUL (a client not in binary mode), LF.
        let mut keys = vec![
            IAC, 251, 31, IAC, 250, 31, 0, 80, 0, 24, IAC, 240, IAC, 253, 1,
        ];
        keys.extend(b"info st");
        keys.extend([IAC, 241]);
        keys.extend(b"atus\r\0\n");
        r.get_mut().write_all(&keys).unwrap();
        assert_eq!(hmp_read(&mut r), "VM status: paused (prelaunch)\n");
        // An interrupt (IAC IP) before the next line is no part of it.
        r.get_mut().write_all(&[IAC, 244]).unwrap();
        assert_eq!(
            hmp(&mut r, "info status"),
            "VM status: paused (prelaunch)\n"
        );
        r.get_mut().write_all(b"quit\r\n").unwrap();
        let (code, out, err) = vm.wait(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{out}\n{err}");
        return;
    }
    panic!("five ports in a row were taken before nicvm bound them; the last time:\n{taken}");
}

/// HMP `info usernet`, as in QEMU: a forward asked for on port 0 is bound to a port the
/// kernel picks, and this is where a harness learns which (nothing said it before).
#[test]
fn info_usernet_names_the_port_a_forward_was_bound_to() {
    let Some(img) = image() else { return };
    let dir = temp("usernet");
    let sock = dir.join("hmp.sock");
    let monitor = format!("unix:{},server=on,wait=off", sock.display());
    let vm = spawn(
        &img,
        "",
        &[
            "-S",
            // Made after every -netdev's network, whatever the order here (as QEMU does).
            "-nic",
            "user,model=virtio-net-pci",
            "-netdev",
            "user,id=u0,hostfwd=tcp:127.0.0.1:0-:22",
            "-device",
            "e1000,netdev=u0",
            "-monitor",
            &monitor,
        ],
        Stdio::null(),
    );
    wait_for(&sock);
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    hmp_read(&mut r);
    let table = hmp(&mut r, "info usernet");
    assert!(
        table.starts_with("Hub -1 (u0):\n  Protocol[State]"),
        "{table}"
    );
    let port: u16 = table
        .lines()
        .find(|l| l.trim_start().starts_with("TCP[HOST_FORWARD]"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a TCP forward with its port: {table}"));
    assert_ne!(port, 0);
    // That port is where the forward listens.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the forward's port");
    // hostfwd_add without a netdev id: QEMU's first user network, the -netdev's.
    assert_eq!(hmp(&mut r, "hostfwd_add tcp:127.0.0.1:0-:23"), "");
    let table = hmp(&mut r, "info usernet");
    let u0 = table
        .split("Hub -1 (")
        .find(|t| t.starts_with("u0)"))
        .unwrap_or_default();
    // Protocol[State] FD Source-address Port Dest.-address Port ...
    assert!(
        u0.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"TCP[HOST_FORWARD]") && f.get(5) == Some(&"23")
        }),
        "{table}"
    );
    assert!(hmp(&mut r, "info").contains("usernet"));
    r.get_mut().write_all(b"quit\n").unwrap();
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    drop(dir);
}

/// HMP over a plain Unix socket: info network/status/pci, set_link, help, then quit (exit 0).
#[test]
fn hmp_over_a_socket() {
    let Some(img) = image() else { return };
    let dir = temp("hmp");
    let sock = dir.join("hmp.sock");
    let mut a: Vec<String> = args(&["-S", "-nographic"]);
    a.extend(args(&THREE_NICS));
    // A NIC without an id (as from -nic): listings call it e1000.1 (the second e1000). In a
    // slot below the others': info pci goes by slot, as QEMU's.
    a.extend(args(&[
        "-netdev",
        "user,id=n4",
        "-device",
        "e1000,netdev=n4,addr=2",
    ]));
    a.extend(args(&[
        "-monitor",
        &format!("unix:{},server,nowait", sock.display()),
    ]));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let vm = spawn(&img, "", &a, Stdio::null());
    wait_for(&sock);
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    assert!(hmp_read(&mut r).contains("monitor - type 'help'"));
    assert_eq!(
        hmp(&mut r, "info status"),
        "VM status: paused (prelaunch)\n"
    );
    let net = hmp(&mut r, "info network");
    assert!(
        net.contains("e: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\n \\ ne: index=0,type=user,net=10.0.2.0,restrict=off\n"),
        "{net}"
    );
    assert!(
        net.contains("v: index=0,type=nic,model=virtio-net-pci"),
        "{net}"
    );
    assert_eq!(hmp(&mut r, "set_link v off"), "");
    assert!(hmp(&mut r, "info network")
        .contains("model=virtio-net-pci,macaddr=52:54:00:12:34:58,link=down"));
    assert!(hmp(&mut r, "set_link nope off").contains("Device 'nope' not found"));
    // By the name the listing gives it, as QEMU takes it.
    assert_eq!(hmp(&mut r, "set_link e1000.1 off"), "");
    let net = hmp(&mut r, "info network");
    let line = net
        .lines()
        .find(|l| l.starts_with("e1000.1: "))
        .unwrap_or("");
    assert!(line.ends_with(",link=down"), "{net}");
    let pci = hmp(&mut r, "info pci");
    assert!(
        pci.contains("PCI device 8086:100e") && pci.contains("PCI device 10ec:8139"),
        "{pci}"
    );
    let slots: Vec<&str> = pci
        .lines()
        .filter_map(|l| l.strip_prefix("  Bus  0, device "))
        .map(|l| l.split(',').next().unwrap().trim())
        .collect();
    assert_eq!(slots, ["2", "3", "4", "5"], "{pci}");
    // virtio-net's BAR 4 is 64-bit memory (the VM is stopped before the guest placed it).
    assert!(
        pci.contains("PCI device 1af4:1000") && pci.contains("BAR4: 64 bit memory at"),
        "{pci}"
    );
    assert!(hmp(&mut r, "help").contains("set_link name on|off"));
    assert!(hmp(&mut r, "system_powerdown").contains("ACPI"));
    assert!(hmp(&mut r, "frobnicate").contains("unknown command"));
    // An unknown command is named, not echoed back whole.
    let long = hmp(&mut r, &"x".repeat(4000));
    assert!(
        long.starts_with("unknown command: 'xxx") && long.len() < 200,
        "{}",
        long.len()
    );
    assert_eq!(
        hmp(&mut r, "c now"),
        "cont|c: extraneous characters at the end of line\nTry \"help c\" for more information\n",
        "a known command with too many words: nothing done (still prelaunch below)"
    );
    // As QEMU's readline: a CR alone ends a line (a raw client's Enter), backspace edits,
    // a double-quoted argument is one word.
    r.get_mut().write_all(b"info statuX\x7fs\r").unwrap();
    assert_eq!(hmp_read(&mut r), "VM status: paused (prelaunch)\n");
    assert_eq!(hmp(&mut r, "set_link \"e\" on"), "");
    assert_eq!(
        hmp(&mut r, "set_link e"),
        "Expected 'on' or 'off'\nTry \"help set_link\" for more information\n"
    );
    assert_eq!(hmp(&mut r, "help s"), "stop|s  -- stop emulation\n");
    assert_eq!(hmp(&mut r, "migrate"), "usage: migrate [-d] file:PATH\n");
    assert_eq!(hmp(&mut r, "migrate -d"), "usage: migrate [-d] file:PATH\n");
    // A line over the limit is refused whole: its end does not run as a command.
    let over = format!("{}quit", " ".repeat(5000));
    assert_eq!(hmp(&mut r, &over), "line too long\n");
    assert_eq!(
        hmp(&mut r, "info status"),
        "VM status: paused (prelaunch)\n"
    );
    // Migrated before it ever ran: postmigrate, as QEMU says. Writing the snapshot takes
    // longer than other commands (tens of seconds on nested KVM under TCG).
    let snap = dir.join("snap");
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(180)))
        .unwrap();
    assert_eq!(hmp(&mut r, &format!("migrate file:{}", snap.display())), "");
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        hmp(&mut r, "info status"),
        "VM status: paused (postmigrate)\n"
    );
    hmp(&mut r, "cont");
    assert_eq!(hmp(&mut r, "info status"), "VM status: running\n");
    // quit, and a line after it in the same write: neither an answer nor a prompt follows.
    r.get_mut().write_all(b"quit\ninfo status\n").unwrap();
    let mut rest = String::new();
    r.get_mut()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = r.read_to_string(&mut rest);
    assert_eq!(rest, "", "nothing after quit, as in QEMU");
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!sock.exists());
    drop(dir);
}

/// -monitor stdio, the serial console on stdio too (nicvm's default): the monitor has the
/// console first, as it asked for it (it waited behind the guest's console, and a `quit`
/// typed there went to the guest).
#[test]
fn a_monitor_on_stdio_has_the_console_first() {
    let Some(img) = image() else { return };
    let mut vm = spawn(
        &img,
        "",
        &["-S", "-monitor", "stdio", "-nic", "none"],
        Stdio::piped(),
    );
    let mut stdin = vm.child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"info status\rquit\r").unwrap();
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("(qemu) info status\r\nVM status: paused (prelaunch)\r\n(qemu) quit"),
        "{out:?}"
    );
}

/// -serial mon:stdio, and QEMU's -nographic alone (whose console is mon:stdio): Ctrl-a c
/// switches the console to the monitor and back, on a pipe too (-nographic had no monitor,
/// and Ctrl-a meant nothing on a pipe: a harness's Ctrl-a x left nicvm running).
#[test]
fn the_console_monitor_behind_ctrl_a_c() {
    let Some(img) = image() else { return };
    for console in [&["-serial", "mon:stdio"][..], &[]] {
        let mut a = vec!["-S", "-nographic", "-nic", "none"];
        a.extend_from_slice(console);
        let mut vm = spawn(&img, "", &a, Stdio::piped());
        let mut stdin = vm.child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(b"\x01cinfo status\r").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stdin.write_all(b"\x01c\x01cquit\r").unwrap();
        let (code, out, err) = vm.wait(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{a:?}\n{out}\n{err}");
        assert!(
            out.contains("(qemu) info status\r\nVM status: paused (prelaunch)\r\n(qemu) "),
            "{a:?}: {out:?}"
        );
        assert!(err.contains("terminating on monitor quit"), "{a:?}: {err}");
    }
    // Ctrl-a x on a pipe, with -nographic alone.
    let mut vm = spawn(
        &img,
        "",
        &["-S", "-nographic", "-nic", "none"],
        Stdio::piped(),
    );
    let mut stdin = vm.child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"\x01x").unwrap();
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("terminating on Ctrl-a x"), "{err}");
}

/// The console monitor's `migrate` while the guest floods the console: the console thread
/// ran the command holding stdout's lock, a vCPU printing waited for that lock holding the
/// serial port's, and the save waited for the serial port: nicvm hung for good (Ctrl-a x and
/// SIGTERM included). -nographic alone makes that console monitor, as QEMU's does.
#[test]
fn console_monitor_migrate_while_the_guest_floods_the_console() {
    let Some(img) = image() else { return };
    let dir = temp("flood");
    let snap = dir.join("snap");
    let mut child = nicvm_cmd()
        .args(boot_args(
            &img,
            "nicvm.dhcp=off nicvm.run=shell",
            &["-nic", "none"],
        ))
        .env("NICVM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(Some(child.id()));
    let mut stdin = child.stdin.take().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |what: &str, n: usize| {
        let t0 = Instant::now();
        let mut count = 0;
        while count < n {
            let left = Duration::from_secs(240).saturating_sub(t0.elapsed());
            let l = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what}:\n{seen}"));
            if l.contains(what) {
                count += 1;
            }
            if seen.len() < 20_000 {
                seen.push_str(&l);
                seen.push('\n');
            }
        }
    };
    wait_for("NICVM-SHELL", 1);
    std::thread::sleep(Duration::from_secs(2));
    stdin
        .write_all(b"while :; do echo flood-flood-flood-flood; done\n")
        .unwrap();
    // The loop's own lines (the typed command is echoed once).
    wait_for("flood-flood-flood-flood", 50);
    let cmd = format!("\x01cmigrate file:{}\r", snap.display());
    stdin.write_all(cmd.as_bytes()).unwrap();
    let t0 = Instant::now();
    // Writing it takes tens of seconds on nested KVM (see the prelaunch test above).
    while !snap.exists() && t0.elapsed() < Duration::from_secs(180) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stdin.write_all(b"\x01x").unwrap();
    let code = wait_bounded(&mut child, &mut guard, Duration::from_secs(30));
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(snap.exists(), "the snapshot written\n{err}");
    assert_eq!(code, Some(0), "{err}");
    drop(dir);
}

/// -daemonize with -pidfile and QMP: the caller returns 0 once the VM is set up; the pid file
/// names the running nicvm; QMP quit ends it and the pid file goes.
#[test]
fn daemonized_vm_with_a_pid_file_quits_over_qmp() {
    let Some(img) = image() else { return };
    let Some(py) = qmp_python() else { return };
    let dir = temp("daemon");
    let (sock, pidfile) = (dir.join("qmp.sock"), dir.join("pid"));
    let o = nicvm_cmd()
        .args([
            "-kernel",
            &img.kernel.display().to_string(),
            "-S",
            "-daemonize",
        ])
        .args(["-display", "none", "-nic", "none", "-pidfile"])
        .arg(&pidfile)
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ])
        .env("NICVM_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(sock.exists(), "set up before the caller returned");
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the daemon runs");
    let out = python(&py, &["quit", sock.to_str().unwrap()]);
    assert!(
        out.contains(r#"{"guest": false, "reason": "host-qmp-quit"}"#),
        "{out}"
    );
    let t0 = Instant::now();
    // SAFETY: as above.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the daemon did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !pidfile.exists() && !sock.exists(),
        "pid file and socket removed"
    );
    drop(dir);
}

/// A stopped nicvm with no NIC and a monitor on `sock`, its stderr piped, with `extra`
/// options; returned once the monitor listens.
fn stopped_with_a_monitor(img: &Image, sock: &Path, extra: &[&str]) -> std::process::Child {
    let child = nicvm_cmd()
        .args(["-kernel", &img.kernel.display().to_string()])
        .args(["-S", "-display", "none", "-nic", "none"])
        .args(extra)
        .args([
            "-monitor",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    support::reaper::guest_started(child.id());
    let mut guard = KillOnDrop(Some(child.id()));
    wait_for(sock);
    guard.0 = None;
    child
}

/// A `-name` with control characters in it is shown escaped on nicvm's last line, which stays
/// one line (it split the line and sent the terminal an escape sequence).
#[test]
fn a_name_with_control_characters_stays_on_one_escaped_line() {
    let Some(img) = image() else { return };
    let dir = temp("name");
    let sock = dir.join("monitor.sock");
    let mut child = stopped_with_a_monitor(&img, &sock, &["-name", "vm\x1b[31m\n2"]);
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    support::reaper::guest_ending(child.id());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        err.ends_with("nicvm (vm\\u{1b}[31m\\n2): terminating on SIGTERM\n"),
        "{err:?}"
    );
    drop(dir);
}

/// `-name ...,process=NAME` names the process as QEMU does: `ps`, `pgrep` and
/// /proc/PID/comm show it (the kernel keeps 15 bytes).
#[test]
fn name_process_sets_the_process_name() {
    let Some(img) = image() else { return };
    let dir = temp("procname");
    let sock = dir.join("monitor.sock");
    let mut child = stopped_with_a_monitor(
        &img,
        &sock,
        &["-name", "guest=vm1,process=nicvm-proc-name-x"],
    );
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id()));
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    support::reaper::guest_ending(child.id());
    let status = child.wait().unwrap();
    assert_eq!(comm.unwrap(), "nicvm-proc-name\n");
    assert_eq!(status.code(), Some(0));
    drop(dir);
}

/// A stderr nobody reads any more (the pipe's reader went away) is no reason to fail: SIGTERM
/// still ends nicvm with status 0 and its pid file and socket removed.
#[test]
fn a_closed_stderr_still_gives_a_clean_exit() {
    let Some(img) = image() else { return };
    let dir = temp("epipe");
    let (sock, pidfile) = (dir.join("monitor.sock"), dir.join("pid"));
    let pid_arg = pidfile.display().to_string();
    let mut child = stopped_with_a_monitor(&img, &sock, &["-pidfile", &pid_arg]);
    // The reader goes: nicvm's next line meets EPIPE.
    drop(child.stderr.take());
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = support::reaper::try_reap(&mut child) {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("nicvm did not exit on SIGTERM within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        !pidfile.exists() && !sock.exists(),
        "pid file and socket removed"
    );
    drop(dir);
}

/// A -netdev no NIC uses: QEMU's warning, once each, when the set-up succeeds. As in QEMU it
/// runs all the same: its forward listens, `info usernet` lists it, `hostfwd_add` reaches it;
/// what a netdev like it receives is read and dropped (a UDP socket netdev's receive queue
/// empties), before a capture sees it (QEMU's is a file header alone). `info network` lists
/// them with the capture's filter.
#[test]
fn an_unused_netdev_runs_as_in_qemu() {
    let Some(img) = image() else { return };
    let dir = temp("nopeer");
    let sock = dir.join("monitor.sock");
    let pcap = dir.join("n0.pcap");
    let (port, port2, udp, peer) = (free_port(), free_port(), free_port(), free_port());
    let endpoint = format!("unix:{},server=on,wait=off", sock.display());
    let dump = format!("filter-dump,id=f0,netdev=n0,file={}", pcap.display());
    let netdev = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22");
    let socket = format!("socket,id=s0,udp=127.0.0.1:{peer},localaddr=127.0.0.1:{udp}");
    let vm = spawn(
        &img,
        "",
        &[
            "-S",
            "-nographic",
            "-nic",
            "none",
            "-netdev",
            &netdev,
            "-netdev",
            &socket,
            "-object",
            &dump,
            "-monitor",
            &endpoint,
        ],
        Stdio::null(),
    );
    wait_for(&sock);
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    hmp_read(&mut r);
    let net = hmp(&mut r, "info network");
    assert!(
        net.starts_with(&format!(
            "n0: index=0,type=user,net=10.0.2.0,restrict=off\nfilters:\n  - f0: \
             type=filter-dump,file={},maxlen=65536,position=tail,status=on,insert=behind,\
             netdev=n0,queue=all\n",
            pcap.display()
        )),
        "{net}"
    );
    assert_eq!(
        hmp(&mut r, &format!("hostfwd_add n0 tcp:127.0.0.1:{port2}-:23")),
        ""
    );
    let table = hmp(&mut r, "info usernet");
    assert!(table.starts_with("Hub -1 (n0):\n"), "{table}");
    for p in [port, port2] {
        assert!(table.contains(&format!("127.0.0.1 {p:>5}")), "{p}: {table}");
    }
    // The forward takes a connection (slirp then asks where the guest is: dropped unseen).
    let _conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the forward listens");
    // Datagrams to the socket netdev are read: its receive queue empties.
    let tx = std::net::UdpSocket::bind(("127.0.0.1", peer)).unwrap();
    for i in 0..300u16 {
        tx.send_to(&[i as u8; 600], ("127.0.0.1", udp)).unwrap();
    }
    let queued = || -> Option<u64> {
        let table = std::fs::read_to_string("/proc/net/udp").ok()?;
        let local = format!("0100007F:{udp:04X}");
        let line = table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(&local))?;
        let queues = line.split_whitespace().nth(4)?; // tx_queue:rx_queue
        u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
    };
    let t0 = Instant::now();
    while queued() != Some(0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the socket netdev is not read: {:?} bytes wait",
            queued()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let cap = std::fs::read(&pcap).unwrap();
    assert_eq!(cap.len(), 24, "a pcap file header alone, as QEMU's");
    assert_eq!(cap[..4], 0xa1b2_c3d4u32.to_le_bytes());
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    for id in ["n0", "s0"] {
        assert_eq!(
            err.matches(&format!("nicvm: warning: netdev {id} has no peer"))
                .count(),
            1,
            "{err}"
        );
    }
    drop(dir);
}

/// SIGUSR1 ends nicvm cleanly, like SIGTERM.
#[test]
fn sigusr1_is_a_clean_exit() {
    let Some(img) = image() else { return };
    let dir = temp("usr1");
    let (vm, sock) = stopped_vm(&img, &dir, "-monitor", Stdio::null());
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGUSR1) };
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("terminating on SIGUSR1"), "{err}");
    assert!(!sock.exists());
    drop(dir);
}

/// Console input the guest does not take is not buffered without bound: with the guest
/// stopped (-S) nicvm stops reading stdin after 64 KiB, so a writer pushing 8 MiB blocks, as on
/// a serial line, and nicvm's memory stays small.
#[test]
fn console_input_the_guest_does_not_take_waits() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let Some(img) = image() else { return };
    let dir = temp("stdin");
    let (mut vm, _sock) = stopped_vm(&img, &dir, "-monitor", Stdio::piped());
    let mut stdin = vm.child.stdin.take().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..128 {
            if stdin.write_all(&chunk).is_err() {
                return; // nicvm went away: the pipe broke
            }
            w.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    let took = written.load(Ordering::Relaxed);
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    writer.join().unwrap();
    assert_eq!(code, Some(0), "{out}\n{err}");
    // What nicvm took: its 64 KiB, the pipe's buffer and the one chunk in flight at most.
    assert!(
        took < 1024 * 1024,
        "nicvm read {took} bytes of console input the stopped guest never took"
    );
    assert!(rss_kib < 512 * 1024, "nicvm's RSS grew to {rss_kib} KiB");
    drop(dir);
}

/// A line of the guest's console, read as it comes.
fn expect_line(lines: &mut impl Iterator<Item = String>, seen: &mut String, want: &str) {
    for l in lines.by_ref() {
        seen.push_str(&l);
        seen.push('\n');
        if l.contains(want) {
            return;
        }
    }
    panic!("no line with '{want}'\n{seen}");
}

/// One guest boot, four NIC personalities (e1000, virtio-net, rtl8139 as 8139cp and as
/// 8139too): QMP set_link off makes every driver report the carrier down, on brings it back
/// and each gets a new DHCP lease over it; query-rx-filter shows what the guest programmed
/// (promiscuous mode, a multicast group, virtio-net's filter through its control queue); a
/// client watching from the start hears NIC_RX_FILTER_CHANGED, and GUEST_PANICKED then
/// SHUTDOWN when the guest ends with a kernel panic (exit status 2).
#[test]
fn link_flap_rx_filters_and_a_guest_panic() {
    let Some(img) = image() else { return };
    let Some(py) = qmp_python() else { return };
    let dir = temp("guest");
    let sock = dir.join("qmp.sock");
    let ifaces = ["eth0", "eth1", "eth2", "eth3"];
    // The guest's drivers probe in link order: virtio_net, e1000, 8139cp, 8139too (checked
    // below from the NIC lines), so the e1000 is eth1 and the 8139cp eth2.
    let mut steps: Vec<String> = vec!["promisc:eth1".into(), "promisc:eth2".into()];
    steps.extend(ifaces.iter().map(|i| format!("carrierwait:{i}:0")));
    steps.extend(ifaces.iter().map(|i| format!("carrierwait:{i}:1")));
    steps.extend(ifaces.iter().map(|i| format!("dhcp:{i}")));
    steps.push("mcast:eth1:239.1.2.3:5000:1".into());
    steps.push("panic".into());
    let append = format!("nicvm.run={}", steps.join(","));
    let mut child = nicvm_cmd()
        .args(["-kernel", &img.kernel.display().to_string()])
        .args(["-initrd", &img.initrd.display().to_string()])
        .args(["-append", &format!("console=ttyS0 quiet {append}")])
        .args(["-nographic", "-m", "128"])
        .args(["-netdev", "user,id=n0", "-device", "e1000,netdev=n0,id=e"])
        .args([
            "-netdev",
            "user,id=n1",
            "-device",
            "virtio-net-pci,netdev=n1,id=v",
        ])
        .args([
            "-netdev",
            "user,id=n2",
            "-device",
            "rtl8139,netdev=n2,id=cp",
        ])
        .args([
            "-netdev",
            "user,id=n3",
            "-device",
            "rtl8139,netdev=n3,id=too,cplus=off",
        ])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ])
        .env("NICVM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(Some(child.id()));
    wait_for(&sock);
    let mut watch = Command::new(&py)
        .arg(client_script())
        .args(["watch", sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut watch_out = BufReader::new(watch.stdout.take().unwrap());
    let mut l = String::new();
    watch_out.read_line(&mut l).unwrap();
    assert_eq!(l, "watching\n");

    let mut lines = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let mut seen = String::new();
    expect_line(&mut lines, &mut seen, "NICVM-READY");
    for (i, driver) in ["virtio_net", "e1000", "8139cp", "8139too"]
        .iter()
        .enumerate()
    {
        assert!(
            seen.contains(&format!("NICVM-NIC iface=eth{i} driver={driver} ")),
            "eth{i} is not {driver}\n{seen}"
        );
    }
    expect_line(&mut lines, &mut seen, "NICVM-PROMISC iface=eth2");
    // Promiscuous mode is in the registers now.
    for name in ["e", "cp"] {
        let out = python(&py, &["filter", sock.to_str().unwrap(), name]);
        let f: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(f["promiscuous"], true, "{name}: {f}\n{seen}");
        assert_eq!(f["unicast"], "all", "{name}: {f}");
    }
    // virtio_net programmed its filter through the control queue: not promiscuous, its
    // IPv4 all-hosts group (joined with its address) in the multicast table.
    let out = python(&py, &["filter", sock.to_str().unwrap(), "v"]);
    let f: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(f["promiscuous"], false, "v: {f}\n{seen}");
    let all_hosts = f["multicast-table"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "01:00:5e:00:00:01");
    assert!(all_hosts, "v: {f}");
    // Link down on all four, by device id and by netdev id.
    let mut flap = Command::new(&py)
        .arg(client_script())
        .args(["flap", sock.to_str().unwrap(), "e", "n1", "cp", "too"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut flap_out = BufReader::new(flap.stdout.take().unwrap());
    let mut l = String::new();
    flap_out.read_line(&mut l).unwrap();
    assert_eq!(l, "down\n");
    for i in ifaces {
        expect_line(
            &mut lines,
            &mut seen,
            &format!("NICVM-CARRIER iface={i} carrier=0"),
        );
    }
    flap.stdin.take().unwrap().write_all(b"up\n").unwrap();
    for i in ifaces {
        expect_line(
            &mut lines,
            &mut seen,
            &format!("NICVM-CARRIER iface={i} carrier=1"),
        );
    }
    assert!(flap.wait().unwrap().success());
    // Each NIC gets a new lease over the link that came back.
    for i in ifaces {
        expect_line(
            &mut lines,
            &mut seen,
            &format!("NICVM-LEASE iface={i} lease=10.0.2.15/24"),
        );
    }
    // A multicast group joined on the e1000: Linux puts it in an exact filter (RA[1..]).
    expect_line(&mut lines, &mut seen, "NICVM-MCASTLISTEN");
    let out = python(&py, &["filter", sock.to_str().unwrap(), "e"]);
    let f: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let joined = f["multicast-table"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "01:00:5e:01:02:03");
    assert!(joined, "the group is in the filter: {f}");
    assert_ne!(f["multicast"], "none", "{f}");
    // The guest ends with a kernel panic.
    for l in lines.by_ref() {
        seen.push_str(&l);
        seen.push('\n');
    }
    let status = wait_bounded(&mut child, &mut guard, Duration::from_secs(120));
    assert_eq!(status, Some(2), "a guest panic is exit status 2\n{seen}");
    let mut events = String::new();
    watch_out.read_to_string(&mut events).unwrap();
    assert!(watch.wait().unwrap().success(), "{events}");
    let events: Vec<serde_json::Value> = events
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    // The paths as QEMU 7.2 gives them (virtio-net: its virtio device inside the PCI one).
    for (nic, path) in [
        ("e", "/machine/peripheral/e"),
        ("v", "/machine/peripheral/v/virtio-backend"),
    ] {
        assert!(
            events.iter().any(|e| e["event"] == "NIC_RX_FILTER_CHANGED"
                && e["data"]["name"] == nic
                && e["data"]["path"] == path),
            "{nic}: {names:?}"
        );
    }
    let n = names.len();
    assert!(
        n >= 2 && names[n - 2..] == ["GUEST_PANICKED", "SHUTDOWN"],
        "{names:?}"
    );
    assert_eq!(events[n - 1]["data"]["reason"], "guest-panic");
    assert!(!sock.exists());
    drop(dir);
}

/// `-no-shutdown`, as libvirt starts QEMU: the guest's power-off stops it instead of ending
/// nicvm; the monitor hears SHUTDOWN and STOP, sees it stopped in "shutdown" and cannot
/// continue it; quit then ends nicvm cleanly.
#[test]
fn no_shutdown_holds_a_guest_that_powered_off() {
    let Some(img) = image() else { return };
    let Some(py) = qmp_python() else { return };
    let dir = temp("held");
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut vm = spawn(
        &img,
        "nicvm.run=poweroff",
        &[
            "-S",
            "-no-shutdown",
            "-nic",
            "none",
            "-m",
            "128",
            "-qmp",
            &qmp,
        ],
        Stdio::null(),
    );
    wait_for(&sock);
    let o = Command::new(&py)
        .arg(client_script())
        .args(["held", sock.to_str().unwrap()])
        .output()
        .expect("run python");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    if !(o.status.success() && out.starts_with("connected\n") && out.ends_with("OK\n")) {
        // What the guest and nicvm said, to tell why.
        support::reaper::kill_guest(&mut vm.child);
        let (_, stdout, stderr) = vm.wait(Duration::from_secs(10));
        panic!(
            "qmp_client.py held failed\n{out}\n{}\n--- guest ---\n{stdout}\n--- nicvm ---\n{stderr}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let (code, stdout, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "quit is a clean exit\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("NICVM-EXIT"),
        "the guest powered off\n{stdout}"
    );
    assert!(!sock.exists());
}

/// quit ends the VM with status 0 and the tap's downscript runs; with script=no the tap stays
/// down and a warning says so (root and /dev/net/tun only). `info network` names the tap and
/// its scripts as QEMU does (it said `type=tap` alone, and a harness could not find the tap).
#[test]
fn quit_runs_the_downscripts() {
    let Some(img) = image() else { return };
    let Some(py) = qmp_python() else { return };
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("\n!!!!!! SKIPPING: creating a tap needs root and /dev/net/tun !!!!!!\n");
        return;
    }
    let dir = temp("down");
    let (sock, log, down) = (dir.join("qmp.sock"), dir.join("log"), dir.join("down"));
    let hmp_sock = dir.join("hmp.sock");
    write_script(
        &down,
        &format!("#!/bin/sh\necho \"down $1\" >> {}\n", log.display()),
    );
    let ifname = format!("nq{}", std::process::id() % 100_000);
    let vm = spawn(
        &img,
        "",
        &[
            "-S",
            "-nographic",
            "-netdev",
            &format!(
                "tap,id=t,ifname={ifname},script=no,downscript={}",
                down.display()
            ),
            "-device",
            "e1000,netdev=t",
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
            "-monitor",
            &format!("unix:{},server=on,wait=off", hmp_sock.display()),
        ],
        Stdio::null(),
    );
    wait_for(&sock);
    wait_for(&hmp_sock);
    let s = UnixStream::connect(&hmp_sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    hmp_read(&mut r);
    let net = hmp(&mut r, "info network");
    assert!(
        net.contains(&format!(
            " \\ t: index=0,type=tap,ifname={ifname},script=no,downscript={}\n",
            down.display()
        )),
        "{net}"
    );
    drop(r);
    let out = python(&py, &["quit", sock.to_str().unwrap()]);
    assert!(out.contains("host-qmp-quit"), "{out}");
    let (code, out, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains(&format!("tap {ifname}: no ifup script ran (script=no)"))
            && err.contains("stays down"),
        "script=no on a tap that is down is said once: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap_or_default(),
        format!("down {ifname}\n"),
        "the downscript ran with the tap's name\n{err}"
    );
    assert!(
        !Path::new(&format!("/sys/class/net/{ifname}")).exists(),
        "the tap nicvm made is gone"
    );
    drop(dir);
}

/// The names of `pid`'s threads.
fn threads_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `wait=on`, QEMU's default for a server socket: before the guest starts, nicvm waits for a
/// client on each such socket, in order, saying so as QEMU does; the client gets all of the
/// console and the QMP greeting. (nicvm started the guest at once, with a note: what the
/// guest printed before a harness connected was lost.)
#[test]
fn wait_on_holds_the_guest_until_each_socket_has_a_client() {
    let Some(img) = image() else { return };
    let dir = temp("wait-on");
    let (q, s) = (dir.0.join("qmp.sock"), dir.0.join("serial.sock"));
    let qmp_arg = format!("unix:{},server", q.display());
    let serial_arg = format!("unix:{},server=on", s.display());
    let vm = spawn(
        &img,
        "",
        &[
            "-nic",
            "none",
            "-display",
            "none",
            "-qmp",
            &qmp_arg,
            "-serial",
            &serial_arg,
        ],
        Stdio::null(),
    );
    wait_for(&q);
    wait_for(&s);
    let pid = vm.child.id();
    let no_vcpu = |when: &str| {
        std::thread::sleep(Duration::from_millis(1000));
        let t = threads_of(pid);
        assert!(
            !t.iter().any(|t| t == "vcpu0"),
            "{when}: the guest runs: {t:?}"
        );
    };
    no_vcpu("before any client");
    let mut qmp = BufReader::new(UnixStream::connect(&q).unwrap());
    no_vcpu("with a QMP client only");
    let serial = UnixStream::connect(&s).unwrap();
    let mut greeting = String::new();
    qmp.read_line(&mut greeting).unwrap();
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    // The console from its start: the guest's first line.
    read_console_to_boot(serial);
    qmp.get_mut()
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
        .unwrap();
    let (code, _, err) = vm.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let said = format!(
        "nicvm: waiting for connection on: {qmp_arg}=on (wait=on)\n\
         nicvm: waiting for connection on: {serial_arg} (wait=on)\n"
    );
    assert!(err.contains(&said), "{err}");
    drop(dir);
}

/// Reads the guest's console on `s` from its start up to its `NICVM-BOOT` line.
fn read_console_to_boot(s: UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut console = String::new();
    for line in BufReader::new(s).lines() {
        let line = line.expect("the guest's console");
        console.push_str(&line);
        if line.contains("NICVM-BOOT") {
            return;
        }
    }
    panic!("the console ended before NICVM-BOOT: {console}");
}

/// Reads a QMP line (greeting, answer or event) within `limit`.
fn qmp_line(r: &mut BufReader<UnixStream>, limit: Duration) -> String {
    r.get_ref().set_read_timeout(Some(limit)).unwrap();
    let mut l = String::new();
    r.read_line(&mut l).expect("a QMP line");
    l
}

/// The monitor and console as QEMU's Python harness (`qemu.machine`) hands them over: each a
/// socket it made (a socketpair end) that nicvm inherits, `-chardev socket,id=ID,fd=N`. The
/// monitor greets and answers on it, the console carries the guest's output. (nicvm refused
/// `fd=` as an unknown parameter, so the harness could not start it.)
#[test]
fn monitor_and_console_on_inherited_sockets() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(img) = image() else { return };
    let (qmp_ours, qmp_theirs) = UnixStream::pair().unwrap();
    let (con_ours, con_theirs) = UnixStream::pair().unwrap();
    let (qfd, cfd) = (qmp_theirs.as_raw_fd(), con_theirs.as_raw_fd());
    let mut cmd = nicvm_cmd();
    cmd.args(["-kernel", &img.kernel.display().to_string()])
        .args(["-initrd", &img.initrd.display().to_string()])
        .args(["-append", "console=ttyS0 quiet"])
        .args(["-display", "none", "-vga", "none", "-nic", "none"])
        .args(["-chardev", &format!("socket,id=mon,fd={qfd}")])
        .args(["-mon", "chardev=mon,mode=control"])
        .args(["-chardev", &format!("socket,id=console,fd={cfd}")])
        .args(["-serial", "chardev:console"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec, only fcntl (async-signal-safe) on the two descriptors
    // the child is to inherit.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(qfd, libc::F_SETFD, 0);
            libc::fcntl(cfd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    support::reaper::guest_started(child.id());
    let mut guard = KillOnDrop(Some(child.id()));
    drop((qmp_theirs, con_theirs));
    let mut qmp = BufReader::new(qmp_ours);
    let greeting = qmp_line(&mut qmp, Duration::from_secs(30));
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    qmp.get_mut()
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    assert!(qmp_line(&mut qmp, Duration::from_secs(10)).contains("\"return\""));
    read_console_to_boot(con_ours);
    qmp.get_mut()
        .write_all(b"{\"execute\":\"quit\"}\n")
        .unwrap();
    let code = wait_bounded(&mut child, &mut guard, Duration::from_secs(30));
    support::reaper::guest_ending(child.id());
    assert_eq!(code, Some(0));
}

/// An inherited socket that has no peer (never connected) is refused at set-up in one line;
/// it was taken, seen hung up at once and dropped, leaving a VM without its monitor.
#[test]
fn an_inherited_socket_without_a_peer_is_refused() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::process::CommandExt;
    let Some(img) = image() else { return };
    // SAFETY: a new TCP socket, owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: the descriptor socket() just returned.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();
    let mut cmd = nicvm_cmd();
    cmd.args(["-kernel", &img.kernel.display().to_string()])
        .args(["-S", "-display", "none", "-nic", "none"])
        .args(["-chardev", &format!("socket,id=mon,fd={fd}")])
        .args(["-mon", "chardev=mon,mode=control"]);
    // SAFETY: only fcntl (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!("nicvm: -mon: its -chardev's fd={fd}: descriptor {fd} is not a connected socket (it has no peer)\n")
    );
    drop(sock);
}

/// `-daemonize` with `wait=on`: a signal that ends the daemon while it waits for its client
/// leaves the caller with status 1, as QEMU's (it said 0: started, for a VM that never ran).
#[test]
fn a_daemon_ended_while_it_waits_fails_its_caller() {
    let Some(img) = image() else { return };
    let dir = temp("daemon-wait");
    let (sock, pidfile) = (dir.0.join("qmp.sock"), dir.0.join("pid"));
    let mut caller = nicvm_cmd()
        .args(["-kernel", &img.kernel.display().to_string()])
        .args(["-display", "none", "-nic", "none", "-daemonize"])
        .args(["-pidfile", &pidfile.display().to_string()])
        .args(["-qmp", &format!("unix:{},server", sock.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    wait_for(&pidfile);
    let t0 = Instant::now();
    let daemon: i32 = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no pid in the pid file"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: signalling the daemon, by the pid it wrote.
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    let mut guard = KillOnDrop(Some(caller.id()));
    let code = wait_bounded(&mut caller, &mut guard, Duration::from_secs(30));
    assert_eq!(code, Some(1));
    assert!(!sock.exists() && !pidfile.exists(), "the daemon cleaned up");
    drop(dir);
}

/// `server=off`, QEMU's default: nicvm connects to a monitor socket its harness listens on
/// (`qemu.machine` as of QEMU 7.2 passes `-chardev socket,id=mon,path=PATH`); with nothing
/// listening there, set-up fails in one line naming the option.
#[test]
fn a_monitor_connects_to_its_harness() {
    let Some(img) = image() else { return };
    let dir = temp("connect-out");
    let path = dir.0.join("qmp.sock");
    let args = |path: &Path| {
        vec![
            "-kernel".to_string(),
            img.kernel.display().to_string(),
            "-S".into(),
            "-display".into(),
            "none".into(),
            "-nic".into(),
            "none".into(),
            "-chardev".into(),
            format!("socket,id=mon,path={}", path.display()),
            "-mon".into(),
            "chardev=mon,mode=control".into(),
        ]
    };
    let o = run(&args(&path), Duration::from_secs(30));
    assert_eq!(o.code, Some(1), "{}", o.dump());
    assert!(
        o.stderr.starts_with("nicvm: -mon")
            || o.stderr.starts_with("nicvm: -chardev")
            || o.stderr.contains("cannot connect to"),
        "{}",
        o.dump()
    );
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.dump());

    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut child = nicvm_cmd()
        .args(args(&path))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    support::reaper::guest_started(child.id());
    let mut guard = KillOnDrop(Some(child.id()));
    let (s, _) = listener.accept().unwrap();
    let mut qmp = BufReader::new(s);
    assert!(qmp_line(&mut qmp, Duration::from_secs(30)).contains("\"QMP\""));
    qmp.get_mut()
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
        .unwrap();
    assert!(qmp_line(&mut qmp, Duration::from_secs(10)).contains("\"return\""));
    let status = qmp_line(&mut qmp, Duration::from_secs(10));
    assert!(status.contains("\"prelaunch\""), "{status}");
    qmp.get_mut()
        .write_all(b"{\"execute\":\"quit\"}\n")
        .unwrap();
    let code = wait_bounded(&mut child, &mut guard, Duration::from_secs(30));
    support::reaper::guest_ending(child.id());
    assert_eq!(code, Some(0));
    drop(dir);
}

/// A signal while nicvm waits for a `wait=on` client ends it cleanly (status 0, socket file
/// removed), without the guest having run.
#[test]
fn a_signal_ends_the_wait_for_a_client() {
    let Some(img) = image() else { return };
    let dir = temp("wait-signal");
    let q = dir.0.join("qmp.sock");
    let vm = spawn(
        &img,
        "",
        &[
            "-nic",
            "none",
            "-display",
            "none",
            "-qmp",
            &format!("unix:{},server", q.display()),
        ],
        Stdio::null(),
    );
    wait_for(&q);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling the child we started (not yet reaped: the Vm holds it).
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (code, out, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.ends_with("nicvm: terminating on SIGTERM\n"), "{err}");
    assert!(!out.contains("NICVM"), "the guest ran: {out}");
    assert!(!q.exists(), "the socket file is left");
    drop(dir);
}

/// Waits for `child` at most `deadline`, then terminates it; the guard is disarmed first
/// so that no signal can reach a reaped (and perhaps reused) pid.
fn wait_bounded(child: &mut Child, guard: &mut KillOnDrop, deadline: Duration) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            guard.0 = None;
            return s.code();
        }
        if t0.elapsed() > deadline {
            let _ = child.kill();
            guard.0 = None;
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ends nicvm (SIGTERM: it cleans up) if the test fails while it runs.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: signalling our own child, not yet reaped (the guard is disarmed
            // before it is).
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
}

/// `/proc/PID`'s descriptors above 2: (number, what it is, closed on exec).
fn descriptors(pid: &str) -> Vec<(u32, String, bool)> {
    let mut open = vec![];
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd: u32 = e.unwrap().file_name().to_str().unwrap().parse().unwrap();
        // Gone since the listing (the one read_dir itself had open).
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        if fd < 3 {
            continue;
        }
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap();
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        open.push((fd, target, flags & libc::O_CLOEXEC as u32 != 0));
    }
    open
}

/// Every descriptor nicvm opens for itself is closed on exec: a tap script or bridge helper it
/// runs, and a program it runs in turn, see none of them (the eventfds once leaked there).
/// Looked at in /proc on a stopped VM with three user networks (one a slirp thread), a socket
/// backend listening, QMP with a client connected, and the console on a pseudo-terminal.
/// Those this test process passes down itself (its caller's) are nicvm's inherited ones.
#[test]
fn every_descriptor_nicvm_opens_closes_on_exec() {
    let Some(img) = image() else { return };
    let dir = temp("cloexec");
    let sock = dir.join("qmp.sock");
    let listen = format!("socket,id=ns,listen=127.0.0.1:{}", free_port());
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut a: Vec<&str> = vec!["-S", "-display", "none", "-serial", "pty"];
    a.extend(THREE_NICS);
    a.extend([
        "-netdev",
        &listen,
        "-device",
        "e1000,netdev=ns",
        "-qmp",
        &qmp,
    ]);
    let passed_down: Vec<u32> = descriptors("self")
        .into_iter()
        .filter(|(_, _, cloexec)| !cloexec)
        .map(|(fd, _, _)| fd)
        .collect();
    let vm = spawn(&img, "", &a, Stdio::null());
    wait_for(&sock);
    let client = UnixStream::connect(&sock).unwrap();
    // The monitor thread has taken the client once it has sent the greeting.
    let mut greeting = String::new();
    BufReader::new(&client).read_line(&mut greeting).unwrap();
    assert!(greeting.contains("QMP"), "{greeting}");
    let open = descriptors(&vm.child.id().to_string());
    assert!(
        open.len() > 20,
        "the VM's descriptors were not there to look at: {open:?}"
    );
    let kept: Vec<_> = open
        .iter()
        .filter(|(fd, _, cloexec)| !cloexec && !passed_down.contains(fd))
        .collect();
    assert!(
        kept.is_empty(),
        "descriptors a child of nicvm would inherit: {kept:?}"
    );
}

/// Clock ticks of CPU (user + system) a process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis: state is the 3rd, utime the 14th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn set_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our child, with rlimit structs we own.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0);
    let new = libc::rlimit {
        rlim_max: old.rlim_max,
        ..new
    };
    // SAFETY: as above.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// Found by review: with every descriptor taken (a guest on a user network can make libslirp
/// open thousands of sockets), an `accept` on the monitor's, the serial console's or a stream
/// netdev's socket, or libslirp's on a `hostfwd` port, failed and the client stayed queued, so
/// each thread polled its listener in a busy loop, a core each. They now rest and try again;
/// the client is served once descriptors free up.
#[test]
fn out_of_descriptors_the_listeners_rest_instead_of_spinning() {
    let Some(img) = image() else { return };
    let dir = temp("nofile");
    let sock = dir.join("monitor.sock");
    let serial = dir.join("serial.sock");
    let stream = dir.join("stream.sock");
    let serial_opt = format!("unix:{},server=on,wait=off", serial.display());
    let stream_opt = format!(
        "stream,id=s0,server=on,addr.type=unix,addr.path={}",
        stream.display()
    );
    let port = support::ports::free_port();
    let user = format!("user,model=e1000,hostfwd=tcp:127.0.0.1:{port}-:22");
    let mut child = stopped_with_a_monitor(
        &img,
        &sock,
        &[
            "-serial",
            &serial_opt,
            "-netdev",
            &stream_opt,
            "-nic",
            &user,
        ],
    );
    wait_for(&serial);
    wait_for(&stream);
    let pid = child.id();
    // A failed assertion must not leave it running.
    let mut guard = KillOnDrop(Some(pid));
    // Set-up goes on opening descriptors after the sockets appear: wait until it is done
    // (the vCPU thread is the last thing started, parked by -S).
    let threads = || threads_of(pid);
    let t0 = Instant::now();
    while !["vcpu0", "serial", "monitor", "slirp"]
        .iter()
        .all(|n| threads().iter().any(|t| t == n))
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", threads());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The lowest free descriptor number as the limit: every number below it is taken.
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    let free = (0..).find(|n| !open.contains(n)).unwrap();
    let was = set_nofile(pid, free);
    let mut monitor = UnixStream::connect(&sock).unwrap();
    let _console = UnixStream::connect(&serial).unwrap();
    let _peer = UnixStream::connect(&stream).unwrap();
    let _forwarded = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - t0;
    set_nofile(pid, was);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    // A spinning thread takes a whole second; resting ones a few hundredths (slirp turns
    // over a hundred times before each rest, slowly on an emulated host).
    assert!(
        used * 4 < hz,
        "{used} ticks of CPU in a second ({hz} a second) while out of descriptors"
    );
    monitor
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 64];
    let n = monitor.read(&mut greeting).unwrap();
    assert!(
        String::from_utf8_lossy(&greeting[..n]).contains("monitor - type 'help'"),
        "the waiting client is served once descriptors are back: {:?}",
        String::from_utf8_lossy(&greeting[..n])
    );
    guard.0 = None;
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    support::reaper::guest_ending(pid);
    assert_eq!(child.wait().unwrap().code(), Some(0), "{err}");
    for what in [
        "monitor: cannot accept a client",
        "serial: cannot accept a client",
        "stream.sock: cannot accept a peer",
        "slirp: no file descriptor to be had",
    ] {
        let said = format!("{what} (Too many open files");
        assert_eq!(err.matches(&said).count(), 1, "{said} once in {err}");
    }
    drop(dir);
}

/// Found by review: a guest writing its console to a stdout nobody reads (a full pipe, a
/// terminal stopped with Ctrl-S) left its vCPU waiting in `write` with the serial port locked.
/// A `migrate` then waited for that lock on the monitor's thread, and every monitor client
/// with it, for ever; the console's input thread waited for it too, so Ctrl-a x typed after
/// other input was never read; and nicvm could not end, its exit waiting for Rust's stdout
/// lock, which the vCPU held (so SIGTERM did not end it either). Now the save gives up with
/// an error, input waits in the input thread, and Ctrl-a x ends nicvm.
#[test]
fn a_console_nobody_reads_hangs_neither_the_monitor_nor_the_exit() {
    let Some(img) = image() else { return };
    let dir = temp("unread");
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut child = nicvm_cmd()
        .args(boot_args(
            &img,
            "nicvm.dhcp=off nicvm.run=shell",
            &["-nic", "none", "-qmp", &qmp, "-serial", "mon:stdio"],
        ))
        .env("NICVM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(Some(child.id()));
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    // A small pipe, so that the guest fills it within a second or two.
    // SAFETY: F_SETPIPE_SZ on the pipe we hold.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&out),
            libc::F_SETPIPE_SZ,
            4096,
        )
    };
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&seen).contains("NICVM-SHELL") {
        assert!(t0.elapsed() < Duration::from_secs(240), "no shell");
        let mut buf = [0u8; 4096];
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "stdout closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(Duration::from_secs(2));
    stdin
        .write_all(b"while :; do echo flood-flood-flood-flood; done\n")
        .unwrap();
    // Nobody reads stdout from here on: the pipe fills and the guest's vCPU waits.
    std::thread::sleep(Duration::from_secs(8));
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
    lines.next().unwrap().unwrap(); // the greeting
    let mut ask = |cmd: &str| -> String {
        s.write_all(cmd.as_bytes()).unwrap();
        loop {
            let l = lines
                .next()
                .expect("connection open")
                .unwrap_or_else(|e| panic!("no answer to {cmd}: {e}"));
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return l;
            }
        }
    };
    ask(r#"{"execute":"qmp_capabilities"}"#);
    ask(r#"{"execute":"stop"}"#);
    let snap = dir.join("snap");
    let answer = ask(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"file:{}"}}}}"#,
        snap.display()
    ));
    assert!(
        answer.contains("serial port's output has been blocked"),
        "{answer}"
    );
    let status = ask(r#"{"execute":"query-status"}"#);
    assert!(
        status.contains("\"status\""),
        "the monitor still answers: {status}"
    );
    // Input for the guest waits for the port; the escape after it is still seen.
    stdin.write_all(b"echo typed\n").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    stdin.write_all(b"\x01x").unwrap();
    let code = wait_bounded(&mut child, &mut guard, Duration::from_secs(20));
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(
        code,
        Some(0),
        "ends on Ctrl-a x though stdout is full\n{err}"
    );
    drop(out);
    drop(dir);
}
