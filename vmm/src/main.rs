//! nicvm: a minimal KVM virtual machine monitor whose reason to exist is networking.

use devices::lifecycle::{ExitReason, Lifecycle};
use nicvm::config::InheritedFds;
use nicvm::config::{Endpoint, SerialTarget};
use nicvm::host::HostKind;
use nicvm::{cli, console, daemon, monitor, say, signals, stderr, vm};
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

/// Log lines on stderr, each one line.
struct StderrLogger {
    level: log::LevelFilter,
    foreign: std::sync::Mutex<Foreign>,
}

/// Lines other crates log (virtio-queue logs what a driver does wrong, as it happens) are
/// let through a few a second: a guest must not set the pace of the host's log. nicvm's own
/// guest errors are rate-limited where they are found.
#[derive(Default)]
struct Foreign {
    window: Option<Instant>,
    shown: u32,
    dropped: u64,
}

const FOREIGN_PER_SECOND: u32 = 5;

impl Foreign {
    /// Whether a line may go out now, and how many were held back before it.
    fn admit(&mut self) -> (bool, u64) {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
        {
            self.window = Some(now);
            self.shown = 0;
        }
        if self.shown >= FOREIGN_PER_SECOND {
            self.dropped += 1;
            return (false, 0);
        }
        self.shown += 1;
        (true, std::mem::take(&mut self.dropped))
    }
}

fn ours(target: &str) -> bool {
    let krate = target.split("::").next().unwrap_or(target);
    matches!(krate, "nicvm" | "devices" | "net_backends")
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            if !ours(r.target()) {
                let (admit, dropped) = self
                    .foreign
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .admit();
                if !admit {
                    return;
                }
                if dropped > 0 {
                    stderr::note(format!(
                        "nicvm: warning: {dropped} lines from libraries held back (a few a second are shown)\n"
                    ));
                }
            }
            let level = match r.level() {
                log::Level::Warn => "warning".to_string(),
                l => l.as_str().to_lowercase(),
            };
            // A name the user gave (an interface, a path) may hold control characters.
            let text = nicvm::cli::one_line(&r.args().to_string());
            let line = format!("nicvm: {level}: {text}\n");
            match r.level() {
                log::Level::Info | log::Level::Warn => stderr::note(line),
                _ => stderr::write(&line),
            }
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("NICVM_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    let logger = Box::leak(Box::new(StderrLogger {
        level,
        foreign: Default::default(),
    }));
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

/// Reports a failure before or during set-up, in its one line (the notes set-up held back
/// are dropped); returns the exit status for it.
fn fail(msg: impl std::fmt::Display) -> i32 {
    console::restore_terminal();
    stderr::discard();
    // One line whatever the user gave: a path or value with a line break, or another
    // control character (a NUL in a JSON option), is shown escaped.
    let msg = nicvm::cli::one_line(&msg.to_string());
    let msg = shortened(msg);
    // Set-up waited for a FIFO's reader until an exit signal came: that is the news, and the
    // exit is as for a signal while the guest runs (a -daemonize caller still hears of a
    // failure: see daemon.rs).
    if let Some(sig) = signals::pending().filter(|_| nicvm::open::setup_interrupted()) {
        say!("nicvm: terminating on {sig} during set-up ({msg})");
        return 0;
    }
    say!("nicvm: {msg}");
    1
}

/// Bytes of a failure's line kept from its start and from its end: a value of 100 KB echoed
/// whole is one line, but not one a terminal shows. The option and key come first, the
/// reason last; the middle of a long value goes.
const FAILURE_HEAD: usize = 640;
const FAILURE_TAIL: usize = 256;

/// `msg` without its middle when it is longer than [`FAILURE_HEAD`] + [`FAILURE_TAIL`]
/// bytes (cut at characters' ends), saying how much was left out.
fn shortened(msg: String) -> String {
    if msg.len() <= FAILURE_HEAD + FAILURE_TAIL {
        return msg;
    }
    let mut head = FAILURE_HEAD;
    while !msg.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = msg.len() - FAILURE_TAIL;
    while !msg.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} [... {} bytes left out ...] {}",
        &msg[..head],
        tail - head,
        &msg[tail..]
    )
}

/// Writes to stdout; a reader that went away (`nicvm -h | head -1`) is no error.
fn out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn main() {
    // First, before nicvm opens a descriptor of its own: the ones `-netdev tap,fd=N` may name.
    let inherited = InheritedFds::snapshot();
    let timing = vm::Timing {
        start: Instant::now(),
        enabled: std::env::var_os("NICVM_TIMING").is_some(),
    };
    init_logging();
    stderr::hold();
    // A panic unwinds (the release profile keeps unwinding for this): what was set up is
    // dropped on the way, and nicvm exits 3.
    let code =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || run(inherited, timing)))
            .unwrap_or(3);
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// All of nicvm but the exit: what it set up is undone (downscripts run, files removed) before
/// this returns the exit status.
fn run(inherited: std::io::Result<InheritedFds>, timing: vm::Timing) -> i32 {
    // Block SIGINT/SIGTERM/SIGHUP before any thread or child exists: a signal during set-up
    // then waits in the signalfd and ends the VM cleanly (downscripts run) once it is up.
    let signals = match signals::block_and_open() {
        Ok(s) => s,
        Err(e) => return fail(format!("signalfd: {e}")),
    };
    // Until the VM exists a panic has nothing to tear down but the terminal.
    std::panic::set_hook(Box::new(|info| {
        console::restore_terminal();
        stderr::release();
        say!("nicvm: internal error: {info}");
    }));
    let inherited = inherited.unwrap_or_else(|e| {
        log::debug!("/proc/self/fd: {e}; -netdev tap,fd= cannot be used");
        InheritedFds::default()
    });

    let action = match cli::parse_with_fds(std::env::args_os().skip(1), &inherited) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let cfg = match action {
        cli::Action::Help => {
            out(cli::USAGE);
            return 0;
        }
        cli::Action::Version => {
            out(&format!(
                "nicvm {}\nhost: {}\nlibslirp: {}\n",
                env!("CARGO_PKG_VERSION"),
                HostKind::detect().describe(),
                net_backends::slirp::version()
            ));
            return 0;
        }
        cli::Action::Listing(text) => {
            out(&text);
            return 0;
        }
        cli::Action::Run(c) => c,
    };
    for n in &cfg.notes {
        if n.warning {
            log::warn!("{}", n.text);
        } else {
            log::info!("{}", n.text);
        }
    }
    // Before anything a caller could wait for (a monitor's socket) is there.
    if let Some(name) = &cfg.process_name {
        set_process_name(name);
    }
    // As QEMU says it (such a netdev is opened and runs all the same: see `peerless`; such
    // a NIC drops what the guest sends).
    for w in cfg.no_peer_warnings() {
        stderr::note(format!("nicvm: warning: {w}\n"));
    }
    if let Err(e) = vm::validate(&cfg) {
        return fail(e);
    }
    let host = HostKind::detect();
    if host == HostKind::Emulating {
        log::info!("host is {}", host.describe());
    }

    // -daemonize: the parent waits for the child's set-up and exits with its status; the
    // child goes on (before KVM is opened: a VM belongs to the process that created it).
    let mut daemon = if cfg.daemonize {
        match daemon::fork_into_background() {
            Ok(d) => Some(d),
            Err(e) => return fail(format!("-daemonize: {e}")),
        }
    } else {
        None
    };
    let _pidfile = match &cfg.pidfile {
        Some(p) => match daemon::PidFile::create(p) {
            Ok(f) => Some(f),
            Err(e) => return fail(format!("-pidfile: {}: {e}", p.display())),
        },
        None => None,
    };

    // The monitors' sockets: a busy address is a set-up error, reported before the guest runs.
    let listening = match monitor::bind(&cfg.monitors) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };

    let lifecycle = match Lifecycle::new() {
        Ok(l) => Arc::new(l),
        Err(e) => return fail(format!("eventfd: {e}")),
    };
    if cfg.start_paused {
        lifecycle.set_paused(true);
    }
    if cfg.no_shutdown {
        lifecycle.hold_guest_shutdown();
    }
    // A panic on any thread asks the VM to end, as the guest or a signal would; the panicking
    // thread unwinds, and the main thread tears everything down (downscripts included).
    let on_panic = lifecycle.clone();
    std::panic::set_hook(Box::new(move |info| {
        console::restore_terminal();
        stderr::release();
        say!("nicvm: internal error: {info}");
        on_panic.request_exit(ExitReason::Error("internal error".into()));
    }));
    let lifecycle_for_hold = lifecycle.clone();
    let reason = {
        let mut vm = match vm::Vm::new(&cfg, host, timing, lifecycle.clone()) {
            Ok(vm) => vm,
            Err(e) => return fail(e),
        };
        let control = if cfg.monitors.is_empty() {
            None
        } else {
            match monitor::Control::new(&cfg, lifecycle, vm.monitor_parts(), vm.saver()) {
                Ok(c) => Some(c),
                Err(e) => return fail(format!("monitor: {e}")),
            }
        };
        if let Some(c) = &control {
            if let Some(m) = cfg.monitors.iter().find(|m| m.endpoint == Endpoint::Stdio) {
                // `-monitor stdio` asks for the monitor: it has the console first; a console
                // shared on purpose (`-serial mon:stdio`, a stdio -chardev for both) starts on
                // the guest's side.
                vm.set_console_monitor(c.clone(), m.option == "-monitor");
            }
        }
        // wait=on: before any monitor or serial thread accepts (they take the waiting
        // client once they run) and before the guest starts.
        let serial_at = match &cfg.serial {
            SerialTarget::Socket { at, .. } => Some(at),
            _ => None,
        };
        let mut sockets = vec![];
        for at in &cfg.wait_for {
            let fd = if serial_at == Some(at) {
                vm.serial_listener()
            } else {
                listening.fd(at)
            };
            if let Some(fd) = fd {
                sockets.push((endpoint_name(at), fd));
            }
        }
        if !sockets.is_empty() {
            // What set-up noted goes out first.
            stderr::release();
        }
        let waited_out = wait_for_clients(&sockets, &lifecycle_for_hold);
        if let Some(sig) = waited_out {
            lifecycle_for_hold.request_exit(ExitReason::User(sig.into()));
        } else if serial_at.is_some_and(|at| cfg.wait_for.contains(at)) {
            vm.accept_serial_client();
        }
        let monitor = match &control {
            Some(c) => match monitor::Monitor::start(listening, c.clone()) {
                Ok(m) => m,
                Err(e) => return fail(format!("monitor thread: {e}")),
            },
            None => None,
        };
        // Set up: what it noted goes out (before a daemon lets go of the terminal).
        stderr::release();
        if let Some(d) = daemon.take() {
            // A signal during the wait for a client ended the set-up: the caller, told
            // nothing, exits 1 (as QEMU's), since no VM runs.
            if waited_out.is_none() {
                d.set_up_done();
            }
        }
        // -no-shutdown: a guest that shut down is held; the monitors hear it and see it
        // stopped.
        let vcpus = vm.monitor_parts().vcpus;
        let mut on_held = || match &control {
            Some(c) => c.guest_held(),
            // No monitor to tell: the other vCPUs are stopped all the same.
            None => {
                nicvm::vcpu::pause_all(&lifecycle_for_hold, &vcpus, cfg.cpus.into());
            }
        };
        let reason = vm.run(&signals, &mut on_held);
        // The clients hear why (SHUTDOWN) before the monitor closes them.
        if let Some(c) = &control {
            c.shutdown_events(&reason);
        }
        drop(monitor);
        reason
        // The VM is dropped here: threads joined, backends closed, downscripts run.
    };
    console::restore_terminal();
    let name = cfg
        .name
        .as_deref()
        .map(|n| format!(" ({})", nicvm::cli::one_line(n)))
        .unwrap_or_default();
    match &reason {
        ExitReason::Reboot | ExitReason::PowerOff => {}
        ExitReason::User(why) => say!("nicvm{name}: terminating on {why}"),
        ExitReason::GuestPanic => say!("nicvm{name}: guest kernel panicked (pvpanic)"),
        ExitReason::GuestCrash(why) => say!("nicvm{name}: guest crashed: {why}"),
        ExitReason::Error(why) => say!("nicvm{name}: error: {why}"),
    }
    reason.code()
}

/// How QEMU names a server socket when it waits on it.
fn endpoint_name(at: &Endpoint) -> String {
    match at {
        Endpoint::Unix(p) => format!("unix:{},server=on", p.display()),
        Endpoint::Tcp(a) => format!("tcp:{a},server=on"),
        Endpoint::Fd { fd, .. } => format!("fd={fd},server=on"),
        Endpoint::UnixClient(p) => format!("unix:{}", p.display()),
        Endpoint::TcpClient(a) => format!("tcp:{a}"),
        Endpoint::Stdio => "stdio".into(),
    }
}

/// `wait=on` (QEMU's default for a server socket): waits, socket by socket in the order
/// given, until a client is waiting to be accepted (its monitor or serial thread accepts it
/// once they run, so nothing the guest or the monitor says is lost), saying so as QEMU
/// does. An exit signal ends the wait: its name is returned; so does an exit the VM asked
/// for meanwhile (its reason stands).
fn wait_for_clients(
    sockets: &[(String, std::os::fd::RawFd)],
    lifecycle: &Lifecycle,
) -> Option<&'static str> {
    for (name, fd) in sockets {
        say!("nicvm: waiting for connection on: {name} (wait=on)");
        loop {
            if let Some(sig) = signals::pending() {
                return Some(sig);
            }
            if lifecycle.exit_requested() {
                return Some("an error");
            }
            let mut p = libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one descriptor we own, for 100 ms (then signals are looked at).
            if unsafe { libc::poll(&mut p, 1, 100) } > 0 {
                break;
            }
        }
    }
    None
}

/// `-name ...,process=NAME`: the name `ps`, `pgrep` and `/proc/PID/comm` show, as QEMU sets
/// it (the kernel keeps 15 bytes of it). Set on the main thread, the process's own.
fn set_process_name(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which `bytes` is.
    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_crates_lines_come_a_few_a_second() {
        let mut f = Foreign::default();
        let shown = (0..100_000).filter(|_| f.admit().0).count();
        // One window, or two if the loop crossed a second.
        assert!(shown <= 2 * FOREIGN_PER_SECOND as usize, "{shown} shown");
        assert!(shown >= FOREIGN_PER_SECOND as usize);
        f.window = Some(Instant::now() - std::time::Duration::from_secs(2));
        let (admit, dropped) = f.admit();
        assert!(admit);
        assert!(dropped > 0, "the lines held back are counted");
    }

    #[test]
    fn only_other_crates_are_limited() {
        assert!(ours("devices::virtio::net"));
        assert!(ours("nicvm"));
        assert!(ours("net_backends::slirp"));
        assert!(!ours("virtio_queue::queue"));
        assert!(!ours("vm_memory::mmap"));
    }
}
