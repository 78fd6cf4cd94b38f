//! Whole-guest boots of the project's guest image: the init line, memory and CPUs as asked,
//! the command line, the CPU features the guest sees, and every way a guest can end.

mod support;
use support::*;

fn emulating_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn mem_kb(o: &Outcome) -> u64 {
    let boot = o
        .line("BOOT")
        .unwrap_or_else(|| panic!("no BOOT line\n{}", o.dump()));
    boot["memtotal_kb"].parse().unwrap()
}

#[test]
fn boots_to_init_and_reboots_cleanly() {
    let Some(img) = image() else { return };
    let o = boot(
        &img,
        "nicvm.run=cpuflags,exit nicvm.marker=x,y=z",
        &["-m", "64"],
    );
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(o.line("READY").is_some(), "{}", o.dump());
    assert!(o.line("EXIT").is_some(), "{}", o.dump());
    // -m 64: MemTotal is RAM less the kernel's own reservations.
    let kb = mem_kb(&o);
    assert!(
        (40_000..=65_536).contains(&kb),
        "MemTotal {kb} kB for -m 64\n{}",
        o.dump()
    );
    assert_eq!(o.line("BOOT").unwrap()["cpus"], "1");
    let cmdline = o.line("CMDLINE").unwrap()["_"].clone();
    assert!(cmdline.contains("nicvm.marker=x,y=z"), "{cmdline}");
    // No NIC was asked for.
    assert!(o.lines("NIC").is_empty(), "{}", o.dump());
    if emulating_host() {
        let cpu = o.line("CPU").unwrap();
        assert_eq!(
            cpu["unsafe-flags"], "none",
            "the guest must not see features the emulator cannot run"
        );
    }
}

#[test]
fn two_cpus_and_512m_then_poweroff() {
    let Some(img) = image() else { return };
    let o = boot(&img, "nicvm.run=poweroff", &["-m", "512", "-smp", "2"]);
    assert_eq!(o.code, Some(0), "poweroff is an orderly exit\n{}", o.dump());
    assert_eq!(o.line("BOOT").unwrap()["cpus"], "2", "{}", o.dump());
    let kb = mem_kb(&o);
    assert!(
        (480_000..=524_288).contains(&kb),
        "MemTotal {kb} kB for -m 512"
    );
    assert!(o.line("EXIT").is_some());
}

#[test]
fn guest_panic_is_a_failure_with_the_reason() {
    let Some(img) = image() else { return };
    let o = boot(&img, "nicvm.run=panic", &["-m", "64"]);
    assert_eq!(o.code, Some(2), "{}", o.dump());
    assert!(o.stdout.contains("Kernel panic"), "{}", o.dump());
    assert!(o.stderr.contains("guest kernel panicked"), "{}", o.dump());
}
