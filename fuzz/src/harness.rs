//! Running cases: one worker thread executes operations while the calling thread watches it.
//!
//! * A panic (overflow checks and debug assertions are on in the fuzz profile) is caught and
//!   reported with its location.
//! * An operation that runs longer than the hang bound is a hang: the watchdog asks the stuck
//!   thread for its backtrace (SIGUSR1), reports, and the process exits; a campaign then
//!   carries on in a new process.
//! * Heap growth within one case beyond a bound is a finding too (a guest must not make the
//!   VMM allocate without limit).
//!
//! Cases are generated from (seed, case number), so a finding can be rebuilt anywhere; the
//! operation list is also saved as JSON for `replay` and minimisation.

use crate::rng::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a fuzz target is: how to make a case, and how to run one.
pub trait Target: 'static {
    const NAME: &'static str;
    const ABOUT: &'static str;
    type Op: Serialize + DeserializeOwned + Debug + Clone + Send + 'static;
    /// A fresh case. Deterministic in `rng`.
    fn generate(rng: &mut Rng) -> Vec<Self::Op>;
    /// Runs a case from a fresh state, calling [`op`] before each operation.
    fn execute(ops: &[Self::Op]);
}

// ---- heap accounting ------------------------------------------------------------------------

/// The system allocator, counting live bytes.
pub struct CountingAlloc;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static HEAP_BASE: AtomicIsize = AtomicIsize::new(0);
/// Bytes a case may hold beyond what was live when it started.
pub static HEAP_LIMIT: AtomicUsize = AtomicUsize::new(256 << 20);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is only
// arithmetic on the sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from this allocator (the system one) with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(p, l, new) }
    }
}

fn heap_growth() -> isize {
    LIVE.load(Ordering::Relaxed) - HEAP_BASE.load(Ordering::Relaxed)
}

/// The panic payload for a case that held too much heap.
#[derive(Debug)]
struct HeapExceeded(isize);

// ---- the probe the targets call -------------------------------------------------------------

static EPOCH: OnceLock<Instant> = OnceLock::new();
/// Milliseconds since EPOCH (plus one) at which the running operation started; 0 when idle.
static OP_STARTED: AtomicU64 = AtomicU64::new(0);
static OP_INDEX: AtomicUsize = AtomicUsize::new(0);
static OPS_RUN: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Marks the start of operation `i` of the running case. Panics (as a finding) when the case
/// already holds more heap than allowed.
pub fn op(i: usize) {
    OP_INDEX.store(i, Ordering::Relaxed);
    OP_STARTED.store(now_ms(), Ordering::Relaxed);
    OPS_RUN.fetch_add(1, Ordering::Relaxed);
    let grown = heap_growth();
    if grown > HEAP_LIMIT.load(Ordering::Relaxed) as isize {
        std::panic::panic_any(HeapExceeded(grown));
    }
}

// ---- findings --------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Panic,
    Hang,
    Heap,
}

impl Kind {
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Panic => 10,
            Kind::Hang => 11,
            Kind::Heap => 12,
        }
    }
    pub fn from_exit_code(c: i32) -> Option<Kind> {
        match c {
            10 => Some(Kind::Panic),
            11 => Some(Kind::Hang),
            12 => Some(Kind::Heap),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Finding {
    pub target: String,
    pub kind: Kind,
    /// What identifies the bug: a panic's location and message, a hang's innermost frame in
    /// nicvm's crates.
    pub signature: String,
    /// The panic message or the stuck thread's backtrace.
    pub detail: String,
    pub seed: u64,
    pub case: u64,
    /// Index of the operation that failed.
    pub at_op: usize,
    pub ops: serde_json::Value,
}

static LAST_PANIC: Mutex<Option<(String, String)>> = Mutex::new(None);

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else if let Some(h) = info.payload().downcast_ref::<HeapExceeded>() {
            format!("the case holds {} MiB of heap", h.0 >> 20)
        } else {
            "panic".into()
        };
        let loc = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut g) = LAST_PANIC.lock() {
            *g = Some((loc, msg));
        }
    }));
}

/// A panic message with its numbers blanked, so one bug hit with different values is one
/// signature.
fn generalise(msg: &str) -> String {
    let mut out = String::new();
    let mut in_num = false;
    for c in msg.chars().take(120) {
        if c.is_ascii_digit() {
            if !in_num {
                out.push('N');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
    }
    out
}

// ---- the stuck thread's backtrace -------------------------------------------------------------

static BACKTRACE: Mutex<Option<String>> = Mutex::new(None);
static BACKTRACE_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    // Not async-signal-safe (it allocates), but the process is about to report a hang and
    // exit; the watchdog stops waiting for it after a while.
    if BACKTRACE_ASKED.load(Ordering::Relaxed) {
        if let Ok(mut g) = BACKTRACE.try_lock() {
            *g = Some(std::backtrace::Backtrace::force_capture().to_string());
        }
    }
}

fn install_sigusr1() {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the handler
    // has the signature SA_SIGINFO-less handlers take.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
}

/// The module of the innermost frame of nicvm's own crates in a backtrace
/// (`devices::rtl8139::tx`): a loop spans several functions of one module, and the sample
/// lands in any of them.
fn innermost_own_module(bt: &str) -> String {
    let frame = innermost_own_frame(bt);
    let path = frame.split("::<impl").next().unwrap_or(&frame);
    let mut parts: Vec<&str> = path.split("::").collect();
    while parts.len() > 1
        && parts.last().is_some_and(|p| {
            p.starts_with(|c: char| c.is_uppercase() || c == '<') || parts.len() > 3
        })
    {
        parts.pop();
    }
    parts.join("::")
}

/// The innermost frame of nicvm's own crates in a backtrace: `devices::rtl8139::...::flush_tx`.
fn innermost_own_frame(bt: &str) -> String {
    for line in bt.lines() {
        let l = line.trim();
        let Some((_, sym)) = l.split_once(": ") else {
            continue;
        };
        if [
            "devices::",
            "net_backends::",
            "nicvm::",
            "<devices::",
            "<net_backends::",
        ]
        .iter()
        .any(|p| sym.starts_with(p))
        {
            return sym.to_string();
        }
    }
    "unknown frame".into()
}

// ---- running cases ----------------------------------------------------------------------------

/// What a worker tells the watchdog.
enum Msg {
    Finding(Box<Finding>),
    Done { cases: u64, last: u64 },
}

pub struct Campaign {
    pub seed: u64,
    pub from: u64,
    pub cases: u64,
    pub deadline: Option<SystemTime>,
    pub hang: Duration,
    pub keep_going: bool,
    pub known: Vec<String>,
    pub out: std::path::PathBuf,
}

fn case_finding<T: Target>(
    seed: u64,
    case: u64,
    ops: &[T::Op],
    kind: Kind,
    signature: String,
    detail: String,
) -> Finding {
    Finding {
        target: T::NAME.into(),
        kind,
        signature,
        detail,
        seed,
        case,
        at_op: OP_INDEX.load(Ordering::Relaxed),
        ops: serde_json::to_value(ops).expect("ops serialise"),
    }
}

/// Runs `ops`, catching a panic; `Some((kind, signature, detail))` when it failed.
fn run_caught<T: Target>(ops: &[T::Op]) -> Option<(Kind, String, String)> {
    HEAP_BASE.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| T::execute(ops)));
    OP_STARTED.store(0, Ordering::Relaxed);
    let payload = r.err()?;
    let (loc, msg) = LAST_PANIC
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .unwrap_or_default();
    if let Some(h) = payload.downcast_ref::<HeapExceeded>() {
        let sig = format!("heap: more than {} MiB held", h.0 >> 20);
        return Some((
            Kind::Heap,
            sig,
            format!("at op {}", OP_INDEX.load(Ordering::Relaxed)),
        ));
    }
    Some((
        Kind::Panic,
        format!("{loc}: {}", generalise(&msg)),
        format!("{loc}: {msg}"),
    ))
}

/// Watches the worker until it finishes; on a hang (or runaway heap) reports and exits.
fn watch(
    rx: mpsc::Receiver<Msg>,
    worker: libc::pthread_t,
    hang: Duration,
    on_stuck: impl Fn(Kind, String, String),
    mut on_msg: impl FnMut(Msg) -> bool,
) {
    let limit = HEAP_LIMIT.load(Ordering::Relaxed) as isize;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(m) => {
                if !on_msg(m) {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let started = OP_STARTED.load(Ordering::Relaxed);
        let running = started != 0 && now_ms().saturating_sub(started) > hang.as_millis() as u64;
        let heap = started != 0 && heap_growth() > limit.saturating_mul(2);
        if !running && !heap {
            continue;
        }
        BACKTRACE_ASKED.store(true, Ordering::Relaxed);
        // SAFETY: `worker` is the live worker thread's id (it never exits while an operation
        // is running); SIGUSR1 has our handler.
        unsafe { libc::pthread_kill(worker, libc::SIGUSR1) };
        let t0 = Instant::now();
        let bt = loop {
            if let Some(b) = BACKTRACE.lock().ok().and_then(|mut g| g.take()) {
                break b;
            }
            if t0.elapsed() > Duration::from_secs(3) {
                break "(the stuck thread did not answer for its backtrace)".to_string();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let frame = innermost_own_module(&bt);
        if heap {
            on_stuck(
                Kind::Heap,
                format!("heap: runaway allocation in {frame}"),
                bt,
            );
        } else {
            on_stuck(
                Kind::Hang,
                format!("hang: operation over {} ms in {frame}", hang.as_millis()),
                bt,
            );
        }
        std::process::exit(Kind::Hang.exit_code());
    }
}

fn spawn_worker<F: FnOnce(mpsc::Sender<Msg>) + Send + 'static>(
    f: F,
) -> (mpsc::Receiver<Msg>, libc::pthread_t) {
    let (tx, rx) = mpsc::channel();
    let (tid_tx, tid_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-worker".into())
        .stack_size(16 << 20)
        .spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            let _ = tid_tx.send(unsafe { libc::pthread_self() });
            f(tx)
        })
        .expect("spawn the worker");
    (rx, tid_rx.recv().expect("worker id"))
}

fn write_finding(dir: &Path, f: &Finding) -> std::path::PathBuf {
    let _ = std::fs::create_dir_all(dir);
    let p = dir.join(format!("{}-{:?}-case{}.json", f.target, f.kind, f.case).to_lowercase());
    let _ = std::fs::write(&p, serde_json::to_vec_pretty(f).unwrap());
    p
}

/// A campaign in this process: cases `from..` until the case count or the deadline, one line
/// per finding on stdout (`FOUND <file>`), `DONE cases=N last=K ops=M` at the end. A hang
/// ends the process with [`Kind::exit_code`]; the parent continues after it.
pub fn campaign<T: Target>(c: Campaign) -> ! {
    install_panic_hook();
    install_sigusr1();
    let (seed, from, cases, deadline, keep_going) =
        (c.seed, c.from, c.cases, c.deadline, c.keep_going);
    let known = c.known.clone();
    let (rx, tid) = spawn_worker(move |tx| {
        let mut seen = known;
        let mut done = 0;
        let mut last = from;
        for case in from..from.saturating_add(cases) {
            if deadline.is_some_and(|d| SystemTime::now() >= d) {
                break;
            }
            CURRENT_CASE.store(case, Ordering::Relaxed);
            last = case;
            let ops = match std::panic::catch_unwind(|| T::generate(&mut Rng::for_case(seed, case)))
            {
                Ok(ops) => ops,
                Err(_) => {
                    let (loc, msg) = LAST_PANIC
                        .lock()
                        .ok()
                        .and_then(|mut g| g.take())
                        .unwrap_or_default();
                    eprintln!(
                        "nicvm-fuzz: the generator itself failed on case {case}: {loc}: {msg}"
                    );
                    std::process::exit(3);
                }
            };
            done += 1;
            if let Some((kind, sig, detail)) = run_caught::<T>(&ops) {
                if seen.contains(&sig) {
                    continue;
                }
                seen.push(sig.clone());
                let f = case_finding::<T>(seed, case, &ops, kind, sig, detail);
                let _ = tx.send(Msg::Finding(Box::new(f)));
                if !keep_going {
                    break;
                }
            }
        }
        let _ = tx.send(Msg::Done { cases: done, last });
    });
    let out = c.out.clone();
    let hang = c.hang;
    let mut result = 0;
    watch(
        rx,
        tid,
        hang,
        |kind, sig, detail| {
            let case = CURRENT_CASE.load(Ordering::Relaxed);
            let ops = T::generate(&mut Rng::for_case(seed, case));
            let f = case_finding::<T>(seed, case, &ops, kind, sig, detail);
            let p = write_finding(&out, &f);
            println!("FOUND {}", p.display());
            println!(
                "DONE cases={} last={case} ops={}",
                case - from + 1,
                OPS_RUN.load(Ordering::Relaxed)
            );
            let _ = std::io::stdout().flush();
            std::process::exit(kind.exit_code());
        },
        |m| match m {
            Msg::Finding(f) => {
                let p = write_finding(&out, &f);
                println!("FOUND {}", p.display());
                let _ = std::io::stdout().flush();
                result = 1;
                true
            }
            Msg::Done { cases, last } => {
                println!(
                    "DONE cases={cases} last={last} ops={}",
                    OPS_RUN.load(Ordering::Relaxed)
                );
                false
            }
        },
    );
    let _ = std::io::stdout().flush();
    std::process::exit(result);
}

static CURRENT_CASE: AtomicU64 = AtomicU64::new(0);

/// Runs the operations saved in a finding file once; prints `FINDING <kind> <signature>` and
/// exits with the kind's code when they fail, exits 0 when they pass.
pub fn replay<T: Target>(file: &Path, hang: Duration, verbose: bool) -> ! {
    install_panic_hook();
    install_sigusr1();
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| {
        eprintln!("nicvm-fuzz: {}: {e}", file.display());
        std::process::exit(2)
    });
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        eprintln!("nicvm-fuzz: {}: {e}", file.display());
        std::process::exit(2)
    });
    let ops_value = value.get("ops").cloned().unwrap_or(value);
    let ops: Vec<T::Op> = serde_json::from_value(ops_value).unwrap_or_else(|e| {
        eprintln!(
            "nicvm-fuzz: {}: not {} operations: {e}",
            file.display(),
            T::NAME
        );
        std::process::exit(2)
    });
    if verbose {
        for (i, o) in ops.iter().enumerate() {
            eprintln!("{i:4}: {o:?}");
        }
    }
    let (rx, tid) = spawn_worker(move |tx| {
        let r = run_caught::<T>(&ops);
        if let Some((kind, sig, detail)) = r {
            let f = Finding {
                target: T::NAME.into(),
                kind,
                signature: sig,
                detail,
                seed: 0,
                case: 0,
                at_op: OP_INDEX.load(Ordering::Relaxed),
                ops: serde_json::Value::Null,
            };
            let _ = tx.send(Msg::Finding(Box::new(f)));
        }
        let _ = tx.send(Msg::Done { cases: 1, last: 0 });
    });
    let mut code = 0;
    watch(
        rx,
        tid,
        hang,
        |kind, sig, detail| {
            if verbose {
                eprintln!("{detail}");
            }
            println!("FINDING {} {sig}", serde_json::to_string(&kind).unwrap());
            let _ = std::io::stdout().flush();
            std::process::exit(kind.exit_code());
        },
        |m| {
            if let Msg::Finding(f) = m {
                if verbose {
                    eprintln!("{}", f.detail);
                }
                println!(
                    "FINDING {} {}",
                    serde_json::to_string(&f.kind).unwrap(),
                    f.signature
                );
                code = f.kind.exit_code();
            }
            false
        },
    );
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Seconds since the Unix epoch, for deadlines passed between processes.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
