//! Network namespaces a test makes for itself, and guests whose console is read as it runs.
//! Everything a test creates lives in its own namespace and goes away with it (Drop), also
//! when the test fails.
#![allow(dead_code)]

use super::{fields, nicvm, reaper, Image, Outcome};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The part of [`Guest::thread_cpu_shares`] that is nicvm's own work: all threads but the vCPUs.
pub fn own_share(shares: &[(String, f64)]) -> f64 {
    shares
        .iter()
        .filter(|(n, _)| !n.starts_with("vcpu"))
        .map(|(_, s)| s)
        .sum()
}

pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

fn sh_status(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

impl Netns {
    /// A fresh namespace named after the test (`tag`) and this process, with lo up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("nicvm-{tag}-{}", std::process::id());
        let _ = sh_status(&format!("ip netns del {name} 2>/dev/null"));
        let o = sh_status(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        assert!(
            o.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        reaper::namespace_made(&name);
        Netns {
            name,
            children: vec![],
        }
    }

    /// Runs a shell command inside the namespace; panics with its output on failure.
    pub fn sh(&self, cmd: &str) -> String {
        let o = self.try_sh(cmd);
        assert!(
            o.status.success(),
            "in {}: {cmd}\n{}{}",
            self.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The namespace's links (with counters), queueing disciplines (per tap queue), neighbours
    /// and TCP sockets, for a failure message.
    pub fn diag(&self) -> String {
        let o = self.try_sh("ip -s link; tc -s qdisc; ip neigh; ss -tani");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    pub fn try_sh(&self, cmd: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .expect("ip netns exec")
    }

    /// A DHCP server on `iface` handing out `range` (start,end); `hosts` are `mac,ip` pins.
    pub fn dnsmasq(&mut self, iface: &str, range: (&str, &str), hosts: &[&str]) {
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            self.name.clone(),
            "dnsmasq".into(),
            "--no-daemon".into(),
            format!("--interface={iface}"),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            format!("--dhcp-range={},{},255.255.255.0,1h", range.0, range.1),
            "--port=0".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            format!("--dhcp-leasefile={}", reaper::leases_path(&self.name)),
            "--pid-file=".into(),
            "--log-dhcp".into(),
            format!("--log-facility={}", self.dnsmasq_log_path()),
            // No ping of an address before offering it: that costs seconds of a guest's
            // DHCP time, and only the test's own guests are on the segment.
            "--no-ping".into(),
        ];
        args.extend(hosts.iter().map(|h| format!("--dhcp-host={h}")));
        let c = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq");
        self.children.push(c);
        std::thread::sleep(Duration::from_millis(300));
    }

    fn dnsmasq_log_path(&self) -> String {
        reaper::dnsmasq_log_path(&self.name)
    }

    /// What the namespace's dnsmasq logged of its DHCP exchanges so far (for a failure
    /// message: whether the guest's DISCOVER reached it and an OFFER went out).
    pub fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.dnsmasq_log_path()).unwrap_or_else(|e| format!("({e})"))
    }

    /// Starts a long-running helper inside the namespace, killed with it.
    pub fn spawn_kept(&mut self, argv: &[&str]) {
        let c = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in netns");
        self.children.push(c);
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Sends `len` bytes to `to` in one datagram that may not be fragmented on the way (the
    /// host's side), and whether it came back intact within 60 s.
    pub fn udp_echo_whole(&self, to: String, len: usize) -> bool {
        self.within(move || {
            let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            use std::os::fd::AsRawFd;
            let pmtu: libc::c_int = libc::IP_PMTUDISC_DO;
            // SAFETY: IP_MTU_DISCOVER reads one int from the pointer, on a socket we own.
            let rc = unsafe {
                libc::setsockopt(
                    u.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    &pmtu as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(
                rc,
                0,
                "IP_MTU_DISCOVER: {}",
                std::io::Error::last_os_error()
            );
            u.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            u.send_to(&msg, &to)
                .unwrap_or_else(|e| panic!("{len} bytes unfragmented to {to}: {e}"));
            let mut b = vec![0u8; len + 1];
            matches!(u.recv_from(&mut b), Ok((n, _)) if b[..n] == msg[..])
        })
    }

    /// Sends one datagram from each of `n` sockets (a flow each, which a multiqueue tap
    /// spreads over its queues by hash) from the namespace to `to`; how many came back
    /// intact within 60 s each.
    pub fn udp_flows(&self, to: String, n: usize) -> usize {
        self.within(move || {
            (0..n)
                .filter(|i| {
                    let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    u.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                        .unwrap();
                    let msg = format!("flow {i}");
                    u.send_to(msg.as_bytes(), &to).unwrap();
                    let mut b = [0u8; 64];
                    matches!(u.recv_from(&mut b), Ok((n, _)) if &b[..n] == msg.as_bytes())
                })
                .count()
        })
    }

    /// Runs `f` on a thread that has entered the namespace (sockets made there live in it).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace fd we hold, for this thread only.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in netns")
    }

    /// Starts nicvm inside the namespace, booting the project's guest.
    pub fn guest(&self, img: &Image, append: &str, extra: &[&str], env: &[(&str, &str)]) -> Guest {
        self.guest_via(&[], img, append, extra, env)
    }

    /// As `guest`, through `launcher`: a command that ends by running the rest of its
    /// arguments (nicvm's command line), as libvirt starts QEMU with descriptors it opened.
    pub fn guest_via(
        &self,
        launcher: &[&str],
        img: &Image,
        append: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Guest {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(launcher)
            .arg(nicvm())
            .args(["-kernel", &img.kernel.display().to_string()])
            .args(["-initrd", &img.initrd.display().to_string()])
            .args(["-append", &format!("console=ttyS0 quiet {append}")])
            .arg("-nographic")
            .args(extra)
            .env("NICVM_LOG", "warn")
            .env_remove("NICVM_TIMING")
            .env_remove("NICVM_STATS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Guest::spawn(cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // With anything else still running in there (a guest left behind by a failed test).
        reaper::remove_namespace(&self.name);
    }
}

/// A running nicvm whose console lines can be awaited one by one.
pub struct Guest {
    child: Child,
    /// Console lines, each with when it arrived (since the spawn).
    lines: Receiver<(Duration, String)>,
    seen: Vec<String>,
    seen_at: Vec<Duration>,
    stderr: Option<std::thread::JoinHandle<String>>,
    start: Instant,
    /// When the console last printed a line.
    last: Instant,
}

/// A guest that prints nothing for this long is stuck. The longest quiet step is an 8 MiB
/// transfer, about 2 minutes with the slowest NIC on an emulating host.
pub const GUEST_STALL: Duration = Duration::from_secs(300);
/// And one that runs this long in all is stuck too.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(900);

impl Guest {
    /// Sends `data` to the guest's `recv:` step through a loopback port nicvm forwards to it,
    /// and checks that every byte arrived (the guest's RECV line: count and hash).
    pub fn receive_through(&mut self, port: u16, data: &[u8]) {
        use std::io::Write;
        let mut s = super::connect_retry(&format!("127.0.0.1:{port}"));
        s.write_all(data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let recv = self.wait_line("RECV");
        assert_eq!(recv["bytes"], data.len().to_string());
        assert_eq!(recv["fnv1a64"], super::fnv1a64(data));
    }

    pub fn spawn(mut cmd: Command) -> Guest {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nicvm");
        reaper::guest_started(child.id());
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx
                    .send((t0.elapsed(), l.trim_end_matches('\r').to_string()))
                    .is_err()
                {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Guest {
            child,
            lines: rx,
            seen: vec![],
            seen_at: vec![],
            stderr: Some(stderr),
            start: Instant::now(),
            last: Instant::now(),
        }
    }

    /// Spawns nicvm as `make` builds it for a loopback TCP port it is to forward
    /// (`hostfwd=tcp:`), from [`super::free_port`], and returns it with the port once nicvm
    /// itself listens there. The port is free when chosen, but something may take it before
    /// nicvm binds it (once in CI, with no taker found): nicvm then exits at once saying its
    /// hostfwd cannot listen, and it is started again on another port, five times at most.
    pub fn spawn_on_free_port(mut make: impl FnMut(u16) -> Command) -> (Guest, u16) {
        let mut taken = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let mut g = Guest::spawn(make(port));
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                if reaper::try_reap(&mut g.child).is_some() {
                    let stderr = g.stop_for_stderr();
                    if stderr.contains("hostfwd: cannot listen on tcp") {
                        eprintln!("a port was taken before nicvm bound it; another one");
                        taken = stderr;
                        break;
                    }
                    panic!("nicvm exited before it listened on port {port}: {stderr}");
                }
                if tcp_listener_of(g.pid(), port) {
                    return (g, port);
                }
                assert!(
                    Instant::now() < until,
                    "nicvm did not listen on port {port} in 60 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("five ports in a row were taken before nicvm bound them; the last time:\n{taken}");
    }

    /// How long the guest may still take before it counts as stuck.
    fn time_left(&self) -> Duration {
        let quiet = GUEST_STALL.saturating_sub(self.last.elapsed());
        quiet.min(GUEST_DEADLINE.saturating_sub(self.start.elapsed()))
    }

    /// Waits for the guest's `NICVM-QUEUES` line and checks that its NIC had `pairs` RX and
    /// TX queues in use; returns the line's fields (its per-queue interrupts among them).
    pub fn wait_queue_pairs(&mut self, pairs: usize) -> HashMap<String, String> {
        let q = self.wait_line("QUEUES");
        let want = pairs.to_string();
        assert_eq!(
            (q["rx"].as_str(), q["tx"].as_str()),
            (want.as_str(), want.as_str()),
            "{}",
            q["_"]
        );
        q
    }

    /// Waits for the next `NICVM-<tag>` line; panics with the console so far when the guest
    /// is stuck (see [`GUEST_STALL`]).
    pub fn wait_line(&mut self, tag: &str) -> HashMap<String, String> {
        self.wait_line_or(tag, String::new)
    }

    /// [`Guest::wait_line`], with `host` (what the host side looked like then) in the panic
    /// message when the guest is stuck, and nicvm's warnings.
    pub fn wait_line_or(
        &mut self,
        tag: &str,
        host: impl FnOnce() -> String,
    ) -> HashMap<String, String> {
        if let Some(f) = self.next_line(tag, GUEST_DEADLINE) {
            return f;
        }
        let host = host();
        let console = self.console_now();
        panic!(
            "no NICVM-{tag} line; console so far:\n{console}\ntimeline:\n{}\nhost:\n{host}\n\
             nicvm's stderr:\n{}",
            self.timeline(),
            self.stop_for_stderr()
        );
    }

    /// The next `NICVM-<tag>` line's fields, waiting at most `limit` (and no longer than the
    /// guest may take, see [`GUEST_STALL`]); None when none came.
    pub fn next_line(&mut self, tag: &str, limit: Duration) -> Option<HashMap<String, String>> {
        let prefix = format!("NICVM-{tag}");
        let end = Instant::now() + limit;
        loop {
            let wait = self
                .time_left()
                .min(end.saturating_duration_since(Instant::now()));
            let (t, l) = self.lines.recv_timeout(wait).ok()?;
            self.last = Instant::now();
            self.keep(t, l.clone());
            if let Some(rest) = l.strip_prefix(&prefix) {
                if rest.is_empty() || rest.starts_with(' ') {
                    return Some(fields(rest));
                }
            }
        }
    }

    /// The names of nicvm's threads now (`vcpu0`, `io`, `io1`, ...).
    pub fn thread_names(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid());
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
            .map(|n| n.trim_end().to_string())
            .collect();
        names.sort();
        names
    }

    /// The share of one core each nicvm thread used over `period`, measured now, by thread
    /// name (`vcpu0`, `io`, `slirp`, ...). Threads that exist at only one end are left out.
    pub fn thread_cpu_shares(&self, period: Duration) -> Vec<(String, f64)> {
        let sample = || -> HashMap<String, (String, u64)> {
            let dir = format!("/proc/{}/task", self.pid());
            let mut out = HashMap::new();
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    continue;
                };
                let (head, tail) = stat.rsplit_once(')').unwrap();
                let name = head.split_once('(').unwrap().1.to_string();
                let f: Vec<&str> = tail.split_whitespace().collect();
                let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
                out.insert(e.file_name().to_string_lossy().into_owned(), (name, ticks));
            }
            out
        };
        let (t0, before) = (Instant::now(), sample());
        std::thread::sleep(period);
        let after = sample();
        let secs = t0.elapsed().as_secs_f64();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let mut shares: Vec<(String, f64)> = after
            .iter()
            .filter_map(|(tid, (name, t1))| {
                let (_, t0) = before.get(tid)?;
                Some((name.clone(), (t1 - t0) as f64 / hz / secs))
            })
            .collect();
        shares.sort_by(|a, b| a.0.cmp(&b.0));
        shares
    }

    /// The share of one core nicvm's own threads used over `period`: everything but the vCPUs,
    /// whose time is the guest's. A spinning I/O, slirp or monitor thread shows here whatever
    /// the guest does; `(own, all threads listed)`.
    pub fn host_cpu_share(&self, period: Duration) -> (f64, String) {
        let shares = self.thread_cpu_shares(period);
        let own = own_share(&shares);
        let listed = shares
            .iter()
            .map(|(n, s)| format!("{n} {:.1}%", s * 100.0))
            .collect::<Vec<_>>()
            .join(", ");
        (own, listed)
    }

    fn keep(&mut self, at: Duration, line: String) {
        self.seen.push(line);
        self.seen_at.push(at);
    }

    /// The `NICVM-` lines so far, each with the second it arrived at: where a slow run spent
    /// its time.
    pub fn timeline(&self) -> String {
        self.seen
            .iter()
            .zip(&self.seen_at)
            .filter(|(l, _)| l.starts_with("NICVM-"))
            .map(|(l, t)| format!("{:8.2} {}", t.as_secs_f64(), l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The console lines awaited so far.
    pub fn console(&self) -> String {
        self.seen.join("\n")
    }

    /// nicvm's descriptors as the kernel sees them, for a failure message: for the event
    /// loop's epoll fd which fds it watches and for what (`tfd: N events: HEX`), for each
    /// eventfd its unread count (a kick nobody took), for each tap queue its interface;
    /// and each thread's state and kernel stack.
    pub fn proc_diag(pid: u32) -> String {
        let mut out = String::new();
        let mut fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        fds.sort_by_key(|e| e.file_name().to_string_lossy().parse::<u32>().unwrap_or(0));
        for e in fds {
            let name = e.file_name().to_string_lossy().into_owned();
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{name}")).unwrap_or_default();
            let keep: Vec<&str> = info
                .lines()
                .filter(|l| {
                    l.starts_with("tfd:") || l.starts_with("eventfd-count") || l.starts_with("iff:")
                })
                .collect();
            out += &format!("fd {name} -> {} {}\n", target.display(), keep.join(" | "));
        }
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
            out += &format!(
                "thread {} ({}): {}\n{}",
                t.file_name().to_string_lossy(),
                comm.trim(),
                state.unwrap_or("?"),
                stack
            );
        }
        out
    }

    /// Stops nicvm and returns what it wrote to stderr (its warnings), for a failure message.
    /// (A process nicvm started may still hold stderr open: a few seconds for it at most.)
    pub fn stop_for_stderr(&mut self) -> String {
        reaper::kill_guest(&mut self.child);
        let Some(t) = self.stderr.take() else {
            return String::new();
        };
        let until = Instant::now() + Duration::from_secs(5);
        while !t.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if t.is_finished() {
            t.join().unwrap_or_default()
        } else {
            "(still open: a process nicvm started holds it)".into()
        }
    }

    /// [`Guest::console`] with every line the guest has printed by now.
    pub fn console_now(&mut self) -> String {
        while let Ok((t, l)) = self.lines.try_recv() {
            self.keep(t, l);
        }
        self.console()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for nicvm to exit (killing it when stuck) and returns everything.
    pub fn finish(mut self) -> Outcome {
        let mut hung = None;
        let code = loop {
            if let Some(s) = reaper::try_reap(&mut self.child) {
                break s.code();
            }
            while let Ok((t, l)) = self.lines.try_recv() {
                self.last = Instant::now();
                self.keep(t, l);
            }
            if self.time_left().is_zero() {
                hung = Some(Guest::hang_diag(self.child.id()));
                reaper::kill_guest(&mut self.child);
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok((t, l)) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.keep(t, l);
        }
        let mut stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        if let Some(d) = hung {
            stderr += &format!("\n--- nicvm did not exit; before it was killed ---\n{d}");
        }
        Outcome {
            code,
            stdout: self.console(),
            stderr,
            elapsed: self.start.elapsed(),
        }
    }

    /// What a nicvm that does not exit is doing: [`Guest::proc_diag`], and each thread's
    /// backtrace from gdb where gdb is installed.
    fn hang_diag(pid: u32) -> String {
        let mut out = Guest::proc_diag(pid);
        let bt = Command::new("timeout")
            .args(["60", "gdb", "-p", &pid.to_string(), "-batch", "-nx"])
            .args(["-ex", "set pagination off", "-ex", "thread apply all bt"])
            .stdin(Stdio::null())
            .output();
        match bt {
            Ok(o) if o.status.success() => out += &String::from_utf8_lossy(&o.stdout),
            Ok(o) => {
                out += &format!(
                    "(gdb: {} {})\n",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                )
            }
            Err(e) => out += &format!("(no gdb: {e})\n"),
        }
        out
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        reaper::kill_guest(&mut self.child);
    }
}

pub const MIB8: usize = 8 << 20;

/// Listens on `host_ip:5002` in `ns` for the guest's `send:HOST:5002:8` step; returns what
/// arrived once the guest closes.
pub fn receive_from_guest(ns: &Netns, host_ip: &str) -> std::thread::JoinHandle<Vec<u8>> {
    let addr = format!("{host_ip}:5002");
    let listener = ns.within(move || std::net::TcpListener::bind(&addr).expect("bind"));
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = Vec::with_capacity(MIB8);
        s.read_to_end(&mut got).expect("read from the guest");
        got
    })
}

/// The two halves of the bulk test, with the guest running
/// `recv:5001,send:HOST:5002:8`: 8 MiB host -> guest (checksum the guest reports), then
/// 8 MiB guest -> host (byte-exact against the xorshift64 stream).
pub fn exchange_8mib(
    ns: &Netns,
    g: &mut Guest,
    guest_ip: &str,
    receiver: std::thread::JoinHandle<Vec<u8>>,
) {
    use std::io::Write;
    g.wait_line("LISTEN");
    let data = super::pseudo_random(MIB8);
    let addr = format!("{guest_ip}:5001");
    let mut s = ns.within(move || super::connect_retry(&addr));
    // A guest that stops reading fails the test instead of hanging it.
    s.set_write_timeout(Some(Duration::from_secs(240))).unwrap();
    s.write_all(&data).expect("send to guest");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // A stuck transfer: the namespace's per-queue counters say which tap queue stopped.
    let pid = g.pid();
    let recv = g.wait_line_or("RECV", || {
        format!("{}\nnicvm:\n{}", ns.diag(), Guest::proc_diag(pid))
    });
    assert_eq!(recv["bytes"], MIB8.to_string());
    assert_eq!(
        recv["fnv1a64"],
        super::fnv1a64(&data),
        "host -> guest checksum"
    );
    drop(s);

    let sent = g.wait_line("SENT");
    if sent["result"] != "ok" {
        // The guest prints what its network looked like (NICVM-DIAG lines, the last one
        // "end") after the failure; a minute for them at most.
        let until = Instant::now() + Duration::from_secs(60);
        while let Some(d) = g.next_line("DIAG", until.saturating_duration_since(Instant::now())) {
            if d["_"] == "end" {
                break;
            }
        }
        let console = g.console_now();
        panic!(
            "guest -> host send failed: {}\nhost: {}\nconsole:\n{console}\ntimeline:\n{}\n\
             nicvm's stderr:\n{}",
            sent["_"],
            ns.diag(),
            g.timeline(),
            g.stop_for_stderr()
        );
    }
    let got = receiver.join().unwrap();
    assert_eq!(sent["bytes"], MIB8.to_string());
    assert_eq!(
        super::fnv1a64(&got),
        sent["fnv1a64"],
        "guest -> host checksum"
    );
    assert!(
        got == data,
        "guest -> host bytes differ from the xorshift64 stream"
    );
}

/// A `vde_switch` (daemonized, plugged into a tap it creates in the namespace) that is
/// killed, with its directory, when dropped.
pub struct VdeSwitch {
    pub dir: std::path::PathBuf,
    netns: String,
    tap: String,
}

impl VdeSwitch {
    pub fn start(ns: &Netns, tag: &str, tap: &str) -> VdeSwitch {
        let dir = std::env::temp_dir().join(format!("nicvm-vde-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sw = VdeSwitch {
            dir,
            netns: ns.name.clone(),
            tap: tap.into(),
        };
        sw.run();
        sw
    }

    /// The switch's control directory, for `-netdev vde,sock=`.
    pub fn sock(&self) -> std::path::PathBuf {
        self.dir.join("switch")
    }

    fn pidfile(&self) -> std::path::PathBuf {
        self.dir.join("switch.pid")
    }

    /// Starts (or restarts) the switch with the same socket and tap.
    pub fn run(&self) {
        let _ = std::fs::remove_file(self.pidfile());
        let o = Command::new("ip")
            .args(["netns", "exec", &self.netns, "vde_switch", "-s"])
            .arg(self.sock())
            .args(["-t", &self.tap, "-d", "-p"])
            .arg(self.pidfile())
            .stdin(Stdio::null())
            .output()
            .expect("vde_switch (scripts/setup installs vde2)");
        assert!(
            o.status.success(),
            "vde_switch: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // The switch writes its pidfile before it creates its tap. Its control socket's file
        // appears at bind, a moment before it listens: up is when a connection is accepted.
        let listening = || std::os::unix::net::UnixStream::connect(self.sock().join("ctl")).is_ok();
        let tap_exists = || {
            Command::new("ip")
                .args(["-n", &self.netns, "link", "show", &self.tap])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let t0 = Instant::now();
        while !(self.pidfile().exists() && listening() && tap_exists()) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "vde_switch did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.pidfile()) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for VdeSwitch {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether process `pid` has a TCP socket of this network namespace listening on 127.0.0.1
/// or any address at `port` (/proc/net/tcp and the process's fds: looked at, not connected
/// to, so a guest behind a forward sees nothing; and another program's listener on that port
/// is not taken for nicvm's).
pub fn tcp_listener_of(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && want.iter().any(|w| f[1] == w) && f[3] == "0A")
                .then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}
