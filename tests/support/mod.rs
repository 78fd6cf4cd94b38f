//! Shared by the whole-guest tests: finding nicvm and the guest image, booting a guest with a
//! deadline, and reading the machine-readable lines the guest's /init prints.
#![allow(dead_code)]

pub mod elf;
pub mod net;
pub mod ports;
pub mod reaper;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use ports::free_port;

pub fn nicvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nicvm"))
}

/// A command for this build's nicvm, with none of a developer's shell's variables that change
/// what nicvm writes to stderr; a test that wants one sets it.
pub fn nicvm_cmd() -> Command {
    let mut c = Command::new(nicvm());
    for v in NICVM_VARIABLES {
        c.env_remove(v);
    }
    c
}

/// The variables that change what nicvm writes to stderr.
pub const NICVM_VARIABLES: [&str; 3] = ["NICVM_LOG", "NICVM_TIMING", "NICVM_STATS"];

/// Writes an executable script through a child process. Written by a test process whose
/// other threads fork, it could be held open for writing by a child between its fork and
/// exec, and running it would fail with "Text file busy".
pub fn write_script(path: &std::path::Path, text: &str) {
    use std::io::Write;
    let mut sh = Command::new("sh")
        .arg("-c")
        .arg("cat > \"$0\" && chmod 755 \"$0\"")
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh");
    sh.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    assert!(sh.wait().unwrap().success(), "{}", path.display());
}

#[derive(Clone)]
pub struct Image {
    pub kernel: PathBuf,
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
}

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// nicvm's cache (the guest image, the QMP tests' python), where scripts/setup puts it:
/// $NICVM_CACHE, else $XDG_CACHE_HOME/nicvm, else ~/.cache/nicvm.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NICVM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("nicvm")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/nicvm")
        })
}

/// The guest image built by guest-images/build, or None (test skipped loudly) when this
/// machine cannot boot guests. In CI a missing KVM or image fails the test instead.
pub fn image() -> Option<Image> {
    let dir = std::env::var_os("NICVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("guest"));
    let img = Image {
        kernel: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initrd: dir.join("initramfs.cpio"),
    };
    let problem = if !kvm_usable() {
        Some("/dev/kvm is not usable".to_string())
    } else if !img.kernel.exists() || !img.initrd.exists() {
        Some(format!(
            "no guest image in {} (run guest-images/build)",
            dir.display()
        ))
    } else {
        None
    };
    match problem {
        None => Some(img),
        Some(p) if in_ci() => panic!("CI must boot guests, but {p}"),
        Some(p) => {
            eprintln!("\n!!!!!! SKIPPING GUEST TEST: {p} !!!!!!\n");
            None
        }
    }
}

/// Whether this machine has a usable /dev/kvm (tests that build a VM need it).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether KVM can run a VM here, for tests that boot their own tiny kernel (no guest image):
/// false (test skipped loudly) without it; in CI a missing KVM fails the test instead.
pub fn kvm() -> bool {
    if kvm_usable() {
        return true;
    }
    if in_ci() {
        panic!("CI must run VMs, but /dev/kvm is not usable");
    }
    eprintln!("\n!!!!!! SKIPPING VM TEST: /dev/kvm is not usable !!!!!!\n");
    false
}

pub struct Outcome {
    /// None when the deadline passed and nicvm was killed.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// The first `NICVM-<tag>` line's key=value fields (plus "_" for the rest of the line).
    pub fn line(&self, tag: &str) -> Option<HashMap<String, String>> {
        self.lines(tag).into_iter().next()
    }

    pub fn lines(&self, tag: &str) -> Vec<HashMap<String, String>> {
        let prefix = format!("NICVM-{tag}");
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
            .map(fields)
            .collect()
    }

    pub fn dump(&self) -> String {
        format!(
            "exit {:?} after {:.1}s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// Generous: a boot costs 10-20 s on an emulating host, more when two run at once.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(240);

/// Runs nicvm with `args` (stdin closed), killing it at the deadline.
pub fn run(args: &[String], deadline: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = nicvm_cmd()
        .args(args)
        .env("NICVM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nicvm");
    reaper::guest_started(child.id());
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let code = loop {
        if let Some(status) = reaper::try_reap(&mut child) {
            break status.code();
        }
        if start.elapsed() > deadline {
            reaper::kill_guest(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        code,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// Boots the project's guest: `-kernel vmlinux -initrd ... -append "console=ttyS0 quiet <append>"`
/// plus `extra` options.
pub fn boot(img: &Image, append: &str, extra: &[&str]) -> Outcome {
    run(&boot_args(img, append, extra), BOOT_DEADLINE)
}

/// The arguments [`boot`] runs nicvm with.
pub fn boot_args(img: &Image, append: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-kernel".into(),
        img.kernel.display().to_string(),
        "-initrd".into(),
        img.initrd.display().to_string(),
        "-append".into(),
        format!("console=ttyS0 quiet {append}"),
        "-nographic".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A CPU feature (by QEMU's name) KVM never offers a guest on this machine: the other
/// vendor's virtualization (SVM on an Intel CPU, VMX on an AMD one).
pub fn feature_kvm_cannot_offer() -> &'static str {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let intel = info
        .lines()
        .any(|l| l.starts_with("vendor_id") && l.contains("GenuineIntel"));
    if intel {
        "svm"
    } else {
        "vmx"
    }
}

pub fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// The xorshift64 byte stream the guest's xfer helper sends; tests send it too.
pub fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, 64-bit: the checksum the guest's xfer helper reports.
pub fn fnv1a64(d: &[u8]) -> String {
    let h = d.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Connects, retrying for a minute while the peer (a booting guest) is not there yet.
pub fn connect_retry(addr: &str) -> std::net::TcpStream {
    let start = Instant::now();
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if start.elapsed() > Duration::from_secs(60) => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// `key=value` fields of a NICVM line's rest, plus "_" for the whole rest. A kernel message
/// the console printed into the line before its end (`[   16.943283] reboot: ...`: printk
/// writes to the UART while the tail of a program's line still waits in the tty's buffer)
/// is cut off.
pub fn fields(rest: &str) -> HashMap<String, String> {
    let rest = &rest[..kernel_message_at(rest).unwrap_or(rest.len())];
    let mut m: HashMap<String, String> = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.insert("_".into(), rest.trim().to_string());
    m
}

/// Where a kernel message's timestamp (`[` spaces, seconds `.` fraction `]`) begins in `line`.
fn kernel_message_at(line: &str) -> Option<usize> {
    line.match_indices('[').map(|(i, _)| i).find(|&i| {
        let stamp = line[i + 1..].trim_start_matches(' ');
        let Some((secs, rest)) = stamp.split_once('.') else {
            return false;
        };
        let frac = rest.split_once(']').map(|(f, _)| f);
        !secs.is_empty()
            && secs.bytes().all(|b| b.is_ascii_digit())
            && frac.is_some_and(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Reads from an HMP socket until the prompt; returns what came before it.
pub fn hmp_read(r: &mut impl Read) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"(qemu) ") {
        match r.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => got.push(byte[0]),
            // No prompt within the socket's timeout: the answer would be taken for the
            // next command's (a slow `migrate` once was, on nested KVM under TCG).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "no HMP prompt in time ({e}); so far: {:?}",
                    String::from_utf8_lossy(&got)
                )
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&got)
        .trim_end_matches("(qemu) ")
        .replace('\r', "")
}

pub fn hmp<S: Read + std::io::Write>(r: &mut std::io::BufReader<S>, cmd: &str) -> String {
    r.get_mut()
        .write_all(format!("{cmd}\n").as_bytes())
        .unwrap();
    hmp_read(r)
}
