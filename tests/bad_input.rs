//! Bad user input: one line naming the option, a non-zero exit, and no guest started.
//! These run without KVM or a guest image.

mod support;
use std::time::Duration;
use support::*;

fn expect_error(a: &[&str], option: &str) {
    let o = run(&args(a), Duration::from_secs(30));
    assert_eq!(
        o.code,
        Some(1),
        "{a:?} should fail with status 1\n{}",
        o.dump()
    );
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| !l.contains(": info: "))
        .collect();
    assert_eq!(lines.len(), 1, "{a:?} should print one line\n{}", o.dump());
    assert!(
        lines[0].starts_with(&format!("nicvm: {option}")),
        "{a:?}: the error names {option}: {}",
        lines[0]
    );
    assert!(
        o.stdout.is_empty(),
        "no guest output for {a:?}\n{}",
        o.dump()
    );
}

fn kernel() -> String {
    // Any existing file gets past the -kernel check; the errors below come first or instead.
    std::env::current_exe().unwrap().display().to_string()
}

#[test]
fn an_argument_that_is_not_utf8() {
    use std::os::unix::ffi::OsStringExt;
    let o = std::process::Command::new(nicvm())
        .arg("-name")
        .arg(std::ffi::OsString::from_vec(vec![b'v', 0xff, b'\n', b'm']))
        .args(["-kernel", &kernel()])
        .output()
        .expect("run nicvm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("nicvm: -name: "), "{err}");
}

#[test]
fn missing_kernel_file() {
    expect_error(&["-kernel", "/nonexistent/vmlinux"], "-kernel");
}

#[test]
fn no_kernel_at_all() {
    expect_error(&["-m", "64"], "-kernel");
}

#[test]
fn unreadable_initrd() {
    let k = kernel();
    expect_error(
        &["-kernel", &k, "-initrd", "/nonexistent/initrd"],
        "-initrd",
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let junk = std::env::temp_dir().join(format!("nicvm-junk-{}", std::process::id()));
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let j = junk.display().to_string();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        expect_error(&["-kernel", &j], "-kernel");
    }
    std::fs::remove_file(junk).unwrap();
}

#[test]
fn zero_memory() {
    let k = kernel();
    expect_error(&["-m", "0", "-kernel", &k], "-m");
}

#[test]
fn more_memory_than_the_host() {
    let k = kernel();
    expect_error(&["-m", "1T", "-kernel", &k], "-m");
}

#[test]
fn zero_cpus() {
    let k = kernel();
    expect_error(&["-smp", "0", "-kernel", &k], "-smp");
}

#[test]
fn unknown_option() {
    let k = kernel();
    expect_error(&["-kernel", &k, "-frobnicate"], "-frobnicate");
}

#[test]
fn malformed_netdev() {
    let k = kernel();
    expect_error(&["-kernel", &k, "-netdev", "user,id"], "-netdev");
    expect_error(
        &["-kernel", &k, "-netdev", "carrier-pigeon,id=n0"],
        "-netdev",
    );
    expect_error(&["-kernel", &k, "-netdev", "user"], "-netdev");
    expect_error(
        &["-kernel", &k, "-netdev", "user,id=a", "-netdev", "tap,id=a"],
        "-netdev",
    );
}

#[test]
fn help_and_version() {
    let o = run(&args(&["--help"]), Duration::from_secs(10));
    assert_eq!(o.code, Some(0));
    assert!(o.stdout.contains("-netdev TYPE,id=ID"));
    let o = run(&args(&["--version"]), Duration::from_secs(10));
    assert_eq!(o.code, Some(0));
    assert!(o.stdout.starts_with("nicvm "));
    assert!(o.stdout.contains("host: "), "{}", o.stdout);
}
