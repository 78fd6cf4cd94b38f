//! What a test process leaves behind when it does not end on its own: the network namespaces
//! it made (with their taps, DHCP servers and guests) and the guests it started through this
//! module's callers (`Guest`, `run`, tests/qmp.rs's `Vm`). Each is removed by its own Drop
//! when its test ends, pass or fail; this covers the rest.
//! - SIGINT, SIGTERM, SIGHUP (Ctrl-C, `timeout`, a closed terminal): a thread removes whatever
//!   is still registered, then the process dies of the signal as it would have.
//! - SIGKILL, where nothing can run: the first namespace a later test process makes is made
//!   after it removes every `nicvm-*-PID` namespace whose process is gone.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static GUESTS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The write end of the pipe the signal handler wakes the clean-up thread through.
static WAKE: AtomicI32 = AtomicI32::new(-1);
static START: Once = Once::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding it left a list that is still whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers a namespace just made (the first call also clears what dead test processes left).
pub fn namespace_made(name: &str) {
    start();
    lock(&NAMESPACES).push(name.to_string());
}

/// Removes a namespace with everything running in it, and what its DHCP server wrote.
pub fn remove_namespace(name: &str) {
    lock(&NAMESPACES).retain(|n| n != name);
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns pids {name} | xargs -r kill -9; ip netns del {name}"
        ))
        .output();
    let _ = std::fs::remove_file(leases_path(name));
    let _ = std::fs::remove_file(dnsmasq_log_path(name));
}

/// Where the DHCP server of namespace `name` keeps its leases.
pub fn leases_path(name: &str) -> String {
    format!("/tmp/{name}.leases")
}

/// Where the DHCP server of namespace `name` logs.
pub fn dnsmasq_log_path(name: &str) -> String {
    format!("/tmp/{name}.dnsmasq.log")
}

pub fn guest_started(pid: u32) {
    start();
    lock(&GUESTS).push(pid);
}

/// Called once the guest has ended or been killed, before it is reaped (after that its pid
/// may be someone else's).
pub fn guest_ending(pid: u32) {
    lock(&GUESTS).retain(|p| *p != pid);
}

/// `try_wait` for a registered guest: its exit is seen without reaping it, the guest is
/// unregistered, then reaped, so the clean-up thread never signals a pid reused meanwhile.
pub fn try_reap(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    // SAFETY: siginfo_t is plain data that waitid fills in; WNOWAIT leaves the child
    // unreaped, WNOHANG returns at once.
    let exited = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        ) == 0
            && info.si_pid() != 0
    };
    if !exited {
        return None;
    }
    guest_ending(child.id());
    child.wait().ok()
}

/// Kills and reaps a registered guest (its Drop): killed while still registered, so a
/// signal in between still finds it.
pub fn kill_guest(child: &mut std::process::Child) {
    let _ = child.kill();
    guest_ending(child.id());
    let _ = child.wait();
}

/// The process a `nicvm-TAG-PID` namespace was named after (tests/support, scripts/nicbench).
fn owner(name: &str) -> Option<u32> {
    let (_, pid) = name.strip_prefix("nicvm-")?.rsplit_once('-')?;
    pid.parse().ok()
}

/// Removes every namespace a test process that no longer runs left behind; their names.
pub fn sweep_orphans() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return vec![];
    };
    let mut gone = vec![];
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner(&name) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing network namespace {name}: its test process ({pid}) is gone");
        remove_namespace(&name);
        gone.push(name);
    }
    gone
}

extern "C" fn on_signal(sig: libc::c_int) {
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; it reads one byte from this frame.
    unsafe { libc::write(WAKE.load(Ordering::Relaxed), (&b as *const u8).cast(), 1) };
}

/// Installs the handlers and clears what dead test processes left, once per process (the
/// first namespace or guest does it).
pub fn start() {
    START.call_once(|| {
        sweep_orphans();
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        WAKE.store(fds[1], Ordering::Relaxed);
        std::thread::spawn(move || clean_up_on_signal(fds[0]));
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction is valid (no flags, empty mask); the handler only
            // calls write(2).
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

fn clean_up_on_signal(wake: libc::c_int) {
    let mut sig = 0u8;
    // SAFETY: reads one byte into a local.
    if unsafe { libc::read(wake, (&mut sig as *mut u8).cast(), 1) } != 1 {
        return;
    }
    for &pid in lock(&GUESTS).iter() {
        // SAFETY: kill(2) on a child this process started and has not reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let names = lock(&NAMESPACES).clone();
    for name in names {
        remove_namespace(&name);
    }
    let sig = libc::c_int::from(sig);
    // SAFETY: back to the default action, then the signal again: the process ends as the
    // sender meant (its status says which signal); _exit if it somehow survives.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
        libc::_exit(128 + sig);
    }
}
