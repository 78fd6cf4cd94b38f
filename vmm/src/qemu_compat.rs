//! The parts of a QEMU command line that nicvm takes for what they mean on its one machine:
//! machine options that change nothing here (accepted with a note), the device properties QEMU
//! users pass (accepted when harmless, refused with the reason when they contradict the
//! model), and QEMU's `help` listings. docs/qemu-compat.md lists all of it.

use crate::cli::CliErrorKind;
use crate::config::{on_off, NicModel, OptionError};
use crate::cpuid::Missing;
use crate::keyval::KeyVal;

/// `help` (or `?`) as one of the comma-separated parts of an option's value.
pub fn wants_help(val: &str) -> bool {
    val.split(',').any(|p| p == "help" || p == "?")
}

fn refused(why: impl Into<String>) -> CliErrorKind {
    CliErrorKind::Refused(why.into())
}

/// An option nicvm accepts because its meaning is what nicvm does anyway; returns the note
/// said at start, or why it is refused.
pub fn machine_option(opt: &str, val: &str) -> Result<String, CliErrorKind> {
    match opt {
        "-enable-kvm" => Ok("KVM is always used".into()),
        "-snapshot" => Ok("nicvm has no disks: there is nothing to snapshot".into()),
        "-display" => {
            let kv = KeyVal::parse(val, Some("type"))?;
            match kv.first.as_deref().or(kv.get("type")) {
                // The keys of QEMU's displays that say nothing for none.
                Some("none") => keys(
                    val,
                    Some("type"),
                    &[
                        "type",
                        "gl",
                        "show-cursor",
                        "window-close",
                        "full-screen",
                        "zoom-to-fit",
                        "grab-on-hover",
                        "show-tabs",
                        "show-menubar",
                    ],
                )
                .map(|_| "nicvm never opens a window".into()),
                d => Err(refused(format!(
                    "'{}': nicvm has no display; only -display none (or -nographic)",
                    d.unwrap_or("")
                ))),
            }
        }
        "-vga" => match val {
            "none" => Ok("nicvm has no graphics card".into()),
            v => Err(refused(format!(
                "'{v}': nicvm has no graphics card; only -vga none"
            ))),
        },
        "-accel" => {
            let kv = keys(val, Some("accel"), &["thread"])?;
            accel(kv.first.as_deref().unwrap_or(""))?;
            Ok("KVM is always used".into())
        }
        "-M" | "-machine" => {
            let kv = KeyVal::parse(val, Some("type"))?;
            let ty = kv.first.as_deref().unwrap_or("pc");
            let known = ty == "pc"
                || ty == "q35"
                || ty.starts_with("pc-i440fx-")
                || ty.starts_with("pc-q35-");
            if !known {
                return Err(refused(format!(
                    "machine '{ty}': nicvm has one machine, a minimal PC; pc and q35 \
                     (and their versions) are accepted"
                )));
            }
            if let Some(k) = kv.unknown_key(&[
                "accel",
                "usb",
                "vmport",
                "dump-guest-core",
                "mem-merge",
                "kernel-irqchip",
                "kernel_irqchip",
                "acpi",
            ]) {
                return Err(OptionError::Unknown(k.into()).into());
            }
            if let Some(a) = kv.get("accel") {
                accel(a)?;
            }
            for k in ["usb", "vmport"] {
                if let Some(v) = kv.get(k) {
                    if v != "off" {
                        return Err(refused(format!("{k}={v}: nicvm's PC has no {k}")));
                    }
                }
            }
            if let Some(v) = kv.get("acpi") {
                // on or off: nicvm's PC has none either way (an on/off/auto value, though).
                if v != "auto" {
                    on_off("acpi", v)?;
                }
            }
            for k in ["kernel-irqchip", "kernel_irqchip"] {
                // split: the IOAPIC in user space; the guest sees the same IOAPIC either way.
                if let Some(v) = kv.get(k).filter(|&v| v != "split") {
                    if !on_off(k, v)? {
                        return Err(refused(format!(
                            "{k}=off: nicvm always uses KVM's in-kernel irqchip"
                        )));
                    }
                }
            }
            Ok(format!(
                "machine '{ty}' is nicvm's own minimal PC (PCI host bridge, 16550, pvpanic; \
                 no ACPI, no firmware)"
            ))
        }
        "-cpu" => cpu_option(val).map(|(note, _, _)| note),
        "-boot" => {
            let known = [
                "order",
                "once",
                "menu",
                "splash",
                "splash-time",
                "reboot-timeout",
                "strict",
            ];
            let kv = keys(val, Some("order"), &known)?;
            // As QEMU checks them: drive letters a-p, switches on/off, times in ms.
            for k in ["order", "once"] {
                if let Some(v) = kv.get(k).or(if k == "order" {
                    kv.first.as_deref()
                } else {
                    None
                }) {
                    if v.is_empty() || !v.bytes().all(|b| (b'a'..=b'p').contains(&b)) {
                        return Err(refused(format!("{k}: '{v}' is not a list of drives (a-p)")));
                    }
                }
            }
            for k in ["menu", "splash", "strict"] {
                if let Some(v) = kv.get(k) {
                    on_off(k, v)?;
                }
            }
            for k in ["splash-time", "reboot-timeout"] {
                if let Some(v) = kv.get(k).filter(|v| v.parse::<i64>().is_err()) {
                    return Err(refused(format!("{k}: '{v}' is not a number")));
                }
            }
            Ok("nicvm starts the -kernel itself (no firmware): there is no boot order".into())
        }
        "-k" => Ok("nicvm has no keyboard or display: the console is a serial line".into()),
        "-no-hpet" => Ok("nicvm's PC has no HPET".into()),
        "-no-acpi" => Ok("nicvm's PC has no ACPI".into()),
        "-mem-prealloc" => {
            Ok("guest RAM is not touched ahead: KVM maps it as the guest uses it".into())
        }
        "-uuid" => {
            let hex: String = val.chars().filter(|&c| c != '-').collect();
            let shape = val.len() == 36
                && [8, 13, 18, 23].iter().all(|&i| val.as_bytes()[i] == b'-')
                && hex.len() == 32
                && hex.chars().all(|c| c.is_ascii_hexdigit());
            if !shape {
                return Err(refused(format!("'{val}' is not a UUID")));
            }
            Ok("nicvm has no firmware tables (SMBIOS) to show the UUID in".into())
        }
        "-rtc" => {
            let kv = keys(val, None, &["base", "clock", "driftfix"])?;
            if let Some(b) = kv.get("base").filter(|&b| b != "utc") {
                return Err(refused(format!(
                    "base={b}: the guest's CMOS clock is the host's time in UTC; only base=utc"
                )));
            }
            if let Some(c) = kv.get("clock").filter(|&c| !matches!(c, "host" | "rt")) {
                return Err(refused(format!(
                    "clock={c}: the guest's CMOS clock follows the host's; clock=host or rt"
                )));
            }
            if let Some(d) = kv
                .get("driftfix")
                .filter(|&d| !matches!(d, "none" | "slew"))
            {
                return Err(refused(format!("driftfix={d}: none or slew")));
            }
            Ok("the guest's CMOS clock is the host's time in UTC".into())
        }
        "-global" if !val.contains('=') => Err(refused(format!(
            "'{val}' sets nothing (DRIVER.PROPERTY=VALUE)"
        ))),
        "-global" => {
            // Defaults for devices nicvm has not got (or has as KVM's own): a note. Anything
            // else may be meant for a NIC, whose properties go on its -device.
            let driver = match val.strip_prefix("driver=") {
                Some(rest) => rest.split(',').next(),
                None => val.split(['.', '=']).next(),
            };
            let setting = |p: &str| val.contains(p);
            match driver.unwrap_or("") {
                // KVM's PIT re-injects lost ticks: QEMU's default policy, delay.
                "kvm-pit" if !setting("delay") => Err(refused(format!(
                    "'{val}': KVM's PIT re-injects lost ticks here (lost_tick_policy=delay)"
                ))),
                "kvm-pit" => Ok(format!("{val}: KVM's PIT re-injects lost ticks, as asked")),
                "PIIX4_PM" | "ICH9-LPC" | "isa-fdc" => Ok(format!(
                    "{val}: not set: nicvm's PC has no ACPI (no S3 or S4) and no floppy"
                )),
                _ => Err(refused(format!(
                    "'{val}': -global is taken only for devices nicvm has not got; give a \
                     NIC's properties on its -device"
                ))),
            }
        }
        "-sandbox" => {
            let kv = keys(
                val,
                Some("enable"),
                &[
                    "enable",
                    "obsolete",
                    "elevateprivileges",
                    "spawn",
                    "resourcecontrol",
                ],
            )?;
            match kv.first.as_deref().or(kv.get("enable")) {
                Some("off") => Ok("nicvm has no seccomp sandbox".into()),
                v => Err(refused(format!(
                    "'{}': nicvm has no seccomp sandbox to turn on (only -sandbox off)",
                    v.unwrap_or("")
                ))),
            }
        }
        "-msg" => {
            let kv = keys(val, None, &["timestamp", "guest-name"])?;
            for k in ["timestamp", "guest-name"] {
                if let Some(v) = kv.get(k) {
                    on_off(k, v)?;
                }
            }
            Ok("nicvm's messages have neither timestamps nor the guest's name".into())
        }
        "-d" => Ok(format!(
            "{val}: QEMU's log items are not nicvm's; NICVM_LOG=debug logs what nicvm does"
        )),
        "-D" => Ok("nicvm logs to stderr (NICVM_LOG=debug for more), not to a file".into()),
        "-overcommit" => {
            let kv = keys(val, None, &["mem-lock", "cpu-pm"])?;
            for k in ["mem-lock", "cpu-pm"] {
                if let Some(v) = kv.get(k) {
                    if v != "off" {
                        return Err(refused(format!("{k}={v}: not supported; only {k}=off")));
                    }
                }
            }
            Ok("guest RAM is not locked and vCPUs exit on HLT, as asked".into())
        }
        _ => Err(CliErrorKind::UnknownOption),
    }
}

/// `val` as `key=value,...` (`implied` naming a leading bare word), every key one of `known`.
/// `-cpu host|max[,FEATURE...]`: the note, and the features switched off (`-NAME`,
/// `NAME=off`) or insisted on (`+NAME`, `NAME`, `NAME=on`), by QEMU's names.
pub fn cpu_option(
    val: &str,
) -> Result<(String, crate::cpuid::FeatureSwitches, Missing), CliErrorKind> {
    let mut parts = val.split(',');
    let model = parts.next().unwrap_or("");
    if !matches!(model, "host" | "max") {
        return Err(refused(format!(
            "'{model}': nicvm gives one CPU model; use host or max"
        )));
    }
    let mut ranked: Vec<(&'static str, bool, u8)> = vec![];
    let (mut check, mut enforce) = (true, false);
    for p in parts.filter(|p| !p.is_empty()) {
        // QEMU's CPU properties that are not features: what a feature switched on but
        // absent comes to, and migratable (nicvm's snapshots restore on a host of the same
        // kind; the CPUID is the host's either way).
        let (key, value) = p.split_once('=').unwrap_or((p, "on"));
        match key {
            "check" => {
                check = on_off(key, value)?;
                continue;
            }
            "enforce" => {
                enforce = on_off(key, value)?;
                continue;
            }
            "migratable" => {
                on_off(key, value)?;
                continue;
            }
            _ => {}
        }
        let (name, on) = if let Some(n) = p.strip_prefix('+') {
            (n, true)
        } else if let Some(n) = p.strip_prefix('-') {
            (n, false)
        } else if let Some((n, v)) = p.split_once('=') {
            (n, on_off(n, v)?)
        } else {
            (p, true)
        };
        let Some(f) = crate::cpuid::feature(name) else {
            return Err(refused(format!(
                "'{name}' is not a CPU feature nicvm can switch (-cpu help lists them)"
            )));
        };
        // As QEMU applies them: every `feat=on|off` (or bare `feat`) first, in order, then
        // every `+feat`, then every `-feat`; so -feat beats +feat beats feat=, whatever the
        // order they were written in.
        let rank = match p.as_bytes()[0] {
            b'+' => 1,
            b'-' => 2,
            _ => 0,
        };
        match ranked.iter_mut().find(|(n, ..)| *n == f.name) {
            Some(s) if rank >= s.2 => (s.1, s.2) = (on, rank),
            Some(_) => {}
            None => ranked.push((f.name, on, rank)),
        }
    }
    let features: crate::cpuid::FeatureSwitches =
        ranked.into_iter().map(|(n, on, _)| (n, on)).collect();
    let mut note = format!(
        "{model}: the guest sees the CPUID nicvm gives (the host's, less what an emulating \
         host cannot run)"
    );
    if !features.is_empty() {
        let list: Vec<String> = features
            .iter()
            .map(|(n, on)| format!("{}{n}", if *on { '+' } else { '-' }))
            .collect();
        note.push_str(&format!(", with {}", list.join(",")));
    }
    let missing = match (enforce, check) {
        (true, _) => Missing::Refuse,
        (false, true) => Missing::Warn,
        (false, false) => Missing::Quiet,
    };
    Ok((note, features, missing))
}

fn keys(val: &str, implied: Option<&str>, known: &[&str]) -> Result<KeyVal, CliErrorKind> {
    let kv = KeyVal::parse(val, implied)?;
    match kv.unknown_key(known) {
        Some(k) => Err(OptionError::Unknown(k.into()).into()),
        None => Ok(kv),
    }
}

/// `accel=` / `-accel`: KVM only (a `kvm:tcg` fallback list picks KVM).
fn accel(a: &str) -> Result<(), CliErrorKind> {
    if a.split(':').any(|x| x == "kvm") {
        Ok(())
    } else {
        Err(refused(format!("accel '{a}': nicvm runs only under KVM")))
    }
}

/// virtio-net's own properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioProperties {
    pub mrg_rxbuf: bool,
    pub mq: bool,
    pub ctrl_vq: bool,
    pub vectors: Option<u16>,
    /// Feature bits turned off by [`VIRTIO_OFFLOADS`] properties.
    pub withheld: u64,
    /// `host_mtu=`.
    pub mtu: Option<u16>,
}

/// Whether `key` is a boolean property of a netdev or NIC nicvm takes (`on|off` in the text
/// form, `true|false` in JSON, as QEMU's schema types it).
pub fn is_boolean_property(key: &str) -> bool {
    const OTHERS: [&str; 13] = [
        // -netdev user, tap, stream.
        "restrict",
        "ipv4",
        "ipv6",
        "vnet_hdr",
        "vhost",
        "vhostforce",
        "server",
        // The NICs.
        "cplus",
        "mrg_rxbuf",
        "mq",
        "ctrl_vq",
        "disable-modern",
        "multifunction",
    ];
    OTHERS.contains(&key)
        || VIRTIO_OFFLOADS.iter().any(|o| o.0 == key)
        || VIRTIO_NEVER_OFFERED.iter().any(|o| o.0 == key)
}

/// Whether QEMU's QemuOpts let a bare `KEY` (on) or `noKEY` (off) set `key`: the boolean
/// properties, and `disable-legacy` (on, off or auto). Not `server`: QEMU 7.2 reads
/// `-netdev stream` and `dgram` with its newer parser, which has no short forms.
pub fn takes_short_form(key: &str) -> bool {
    (is_boolean_property(key) && key != "server") || key == "disable-legacy"
}

/// An integer device property as QEMU's qdev reads one (strtoull's base 0): `0x` hex, a
/// leading `0` octal, else decimal.
pub fn qdev_uint(v: &str) -> Option<u64> {
    // from_str_radix takes a sign, strtoull not after its prefix.
    fn digits(d: &str) -> Option<&str> {
        d.starts_with(|c: char| c.is_ascii_alphanumeric())
            .then_some(d)
    }
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(digits(hex)?, 16).ok()
    } else if let Some(oct) = v.strip_prefix('0').filter(|o| !o.is_empty()) {
        u64::from_str_radix(digits(oct)?, 8).ok()
    } else {
        v.parse().ok()
    }
}

/// The least MTU virtio-net's `host_mtu=` may offer (virtio 1.0, 5.1.4.1; IPv4's minimum).
const MIN_MTU: u16 = 68;

/// virtio-net-pci's offload properties as QEMU names them, each the feature bit it controls
/// (all on by default: offered where the backend can carry them).
pub const VIRTIO_OFFLOADS: [(&str, u64, &str); 10] = {
    use devices::virtio::net::*;
    [
        (
            "csum",
            VIRTIO_NET_F_CSUM,
            "checksum offload, guest to host (default: on)",
        ),
        (
            "guest_csum",
            VIRTIO_NET_F_GUEST_CSUM,
            "checksum offload, host to guest (default: on)",
        ),
        (
            "host_tso4",
            VIRTIO_NET_F_HOST_TSO4,
            "TSO over IPv4, guest to host; needs csum (default: on)",
        ),
        (
            "host_tso6",
            VIRTIO_NET_F_HOST_TSO6,
            "TSO over IPv6, guest to host; needs csum (default: on)",
        ),
        (
            "host_ecn",
            VIRTIO_NET_F_HOST_ECN,
            "TSO with ECN, guest to host; needs host_tso4 or host_tso6 (default: on)",
        ),
        (
            "host_ufo",
            VIRTIO_NET_F_HOST_UFO,
            "UDP fragmentation offload, guest to host; needs csum (default: on)",
        ),
        (
            "guest_tso4",
            VIRTIO_NET_F_GUEST_TSO4,
            "TSO over IPv4, host to guest; needs guest_csum (default: on)",
        ),
        (
            "guest_tso6",
            VIRTIO_NET_F_GUEST_TSO6,
            "TSO over IPv6, host to guest; needs guest_csum (default: on)",
        ),
        (
            "guest_ecn",
            VIRTIO_NET_F_GUEST_ECN,
            "TSO with ECN, host to guest; needs guest_tso4 or guest_tso6 (default: on)",
        ),
        (
            "guest_ufo",
            VIRTIO_NET_F_GUEST_UFO,
            "UDP fragmentation offload, host to guest; needs guest_csum (default: on)",
        ),
    ]
};

/// virtio-net-pci's properties for features nicvm never offers, taken (on or off) as QEMU
/// takes them, with no effect: which segmentation is offered, the others say; offloads are not
/// switched through the control queue; the guest is not asked to announce itself after a
/// migration.
pub const VIRTIO_NEVER_OFFERED: [(&str, &str); 3] = [
    (
        "gso",
        "accepted; the legacy any-GSO bit is never offered (QEMU's default: on)",
    ),
    (
        "ctrl_guest_offloads",
        "accepted; offloads are not switched through the control queue (QEMU's default: on)",
    ),
    (
        "guest_announce",
        "accepted; the guest is not asked to announce itself (QEMU's default: on)",
    ),
];

/// The QEMU device properties nicvm takes besides its own (netdev, mac, id, addr, cplus),
/// removed from `kv`. Returns virtio-net's (defaults for the other models).
pub fn device_properties_accepted(
    model: NicModel,
    kv: &mut KeyVal,
) -> Result<VirtioProperties, CliErrorKind> {
    if let Some(b) = kv.remove("bus") {
        if b != "pci.0" && b != "pcie.0" {
            return Err(refused(format!("bus: '{b}': nicvm has one PCI bus, pci.0")));
        }
    }
    // No option ROM is loaded either way: nicvm boots the kernel itself.
    kv.remove("romfile");
    kv.remove("rombar");
    if let Some(v) = kv.remove("bootindex") {
        v.parse::<i32>().map_err(|_| CliErrorKind::NotANumber {
            key: "bootindex",
            value: v.clone(),
        })?;
    }
    if let Some(v) = kv.remove("multifunction") {
        if on_off("multifunction", &v)? {
            return Err(refused(
                "multifunction=on: nicvm's NICs are single-function devices",
            ));
        }
    }
    let virtio = model == NicModel::VirtioNetPci;
    for key in [
        "disable-legacy",
        "disable-modern",
        "mrg_rxbuf",
        "host_mtu",
        "vectors",
        "mq",
        "ctrl_vq",
    ]
    .into_iter()
    .chain(VIRTIO_OFFLOADS.iter().map(|o| o.0))
    .chain(VIRTIO_NEVER_OFFERED.iter().map(|o| o.0))
    {
        if !virtio && kv.get(key).is_some() {
            return Err(CliErrorKind::VirtioOnly { key: key.into() });
        }
    }
    if let Some(v) = kv.remove("disable-legacy") {
        if v != "auto" && !on_off("disable-legacy", &v)? {
            return Err(refused(
                "disable-legacy=off: nicvm's virtio-net is a modern (virtio 1.0) device only",
            ));
        }
    }
    if let Some(v) = kv.remove("disable-modern") {
        if on_off("disable-modern", &v)? {
            return Err(refused(
                "disable-modern=on: nicvm's virtio-net is a modern (virtio 1.0) device only",
            ));
        }
    }
    let mrg_rxbuf = match kv.remove("mrg_rxbuf") {
        Some(v) => on_off("mrg_rxbuf", &v)?,
        None => true,
    };
    // As QEMU's: 0 (its default) offers no MTU. Under 68 is refused, where QEMU offers it:
    // the virtio spec has the device offer 68 to 65535 (5.1.4.1), and Linux's virtio_net
    // drops the feature when the MTU is smaller.
    let mtu = match kv.remove("host_mtu") {
        None => None,
        Some(v) => match qdev_uint(&v).and_then(|n| u16::try_from(n).ok()).ok_or(()) {
            Ok(0) => None,
            Ok(n) if n >= MIN_MTU => Some(n),
            _ => {
                return Err(refused(format!(
                    "host_mtu={v}: an MTU from {MIN_MTU} to 65535 (0: none offered)"
                )))
            }
        },
    };
    let vectors = match kv.remove("vectors") {
        None => None,
        Some(v) => {
            let max = devices::virtio::net::MAX_VECTORS as u32;
            let n: u32 = qdev_uint(&v)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    refused(format!(
                        "vectors: '{v}' is not a number of MSI-X vectors (1 to {max})"
                    ))
                })?;
            if !(1..=max).contains(&n) {
                return Err(refused(format!(
                    "vectors={n}: nicvm's virtio-net has 1 to {max} MSI-X vectors (no INTx-only \
                     device)"
                )));
            }
            Some(n as u16)
        }
    };
    let mq = match kv.remove("mq") {
        Some(v) => on_off("mq", &v)?,
        None => false,
    };
    let ctrl_vq = match kv.remove("ctrl_vq") {
        Some(v) => on_off("ctrl_vq", &v)?,
        None => true,
    };
    let mut withheld = 0;
    for (key, bit, _) in VIRTIO_OFFLOADS {
        if let Some(v) = kv.remove(key) {
            if !on_off(key, &v)? {
                withheld |= bit;
            }
        }
    }
    for (key, _) in VIRTIO_NEVER_OFFERED {
        if let Some(v) = kv.remove(key) {
            on_off(key, &v)?;
        }
    }
    if mq && !ctrl_vq {
        return Err(refused(
            "mq=on needs ctrl_vq=on: the driver picks its queue pairs through the control queue",
        ));
    }
    Ok(VirtioProperties {
        mrg_rxbuf,
        mq,
        ctrl_vq,
        vectors,
        withheld,
        mtu,
    })
}

/// `-netdev help`.
pub fn netdev_types() -> String {
    "Available netdev backend types:\nsocket\nstream\ndgram\nuser\ntap\nbridge\nvde\n".into()
}

/// `help` (or `?`) given to an option that lists its values here as QEMU does (exit 0), when
/// QEMU lists them: `-M`/`-machine`, `-cpu`, `-accel`, `-nic`, `-chardev`, `-serial`, `-d`.
/// None for the others, and for a value that asks for something else.
pub fn option_help(opt: &str, val: &str) -> Option<String> {
    let first = val.split(',').next().unwrap_or("");
    let asked = first == "help" || first == "?";
    let text = match opt {
        "-M" | "-machine" if asked || val.split(',').any(|p| p == "type=help") => {
            "Supported machines are:\n\
             pc                   nicvm's minimal PC: PCI host bridge, LAPIC and IOAPIC, 16550, \
             i8042, CMOS (default)\n\
             q35                  the same machine (accepted, as are pc-i440fx-* and pc-q35-*)\n"
        }
        "-cpu" if asked => {
            let names: Vec<&str> = crate::cpuid::FEATURES.iter().map(|f| f.name).collect();
            return Some(format!(
                "Available CPUs:\n\
                 \x20 host    the host's CPU as KVM gives it (on an emulating KVM host, without \
                 the features its emulator cannot run)\n\
                 \x20 max     the same as host\n\n\
                 Recognized CPUID flags (-cpu host,-FLAG takes one away, +FLAG insists on it: \
                 a warning when it is not there, an error with ,enforce):\n\
                 \x20 {}\n",
                names.join(" ")
            ));
        }
        "-accel" if asked => "Accelerators supported by nicvm:\nkvm\n",
        "-nic" if asked => return Some(netdev_types()),
        "-chardev" if asked => "Available chardev backend types:\n  stdio\n  socket\n",
        "-serial" if asked => {
            "Available chardev backend types:\n  stdio\n  mon:stdio\n  none (null)\n  pty\n  \
             file:PATH\n  tcp:[HOST]:PORT[,server=on,wait=off]\n  \
             unix:PATH[,server=on,wait=off]\n  chardev:ID\n"
        }
        "-d" if asked => {
            "nicvm has none of QEMU's log items: its own log goes to stderr at the level \
             NICVM_LOG sets (error, warn, info, debug, trace; default info)\n"
        }
        _ => return None,
    };
    Some(text.into())
}

/// `-action KEY=VALUE,...` as QEMU 7.2 takes it: whether a guest's shutdown is held
/// (`shutdown=pause`, `Some(true)`; `shutdown=poweroff`, `Some(false)`; not said, `None`),
/// and notes for what nicvm does otherwise than asked.
pub fn action(val: &str) -> Result<(Option<bool>, Vec<String>), CliErrorKind> {
    if val.is_empty() {
        return Ok((None, vec![])); // as QEMU: nothing asked
    }
    let kv = KeyVal::parse(val, None).map_err(CliErrorKind::from)?;
    let (mut hold, mut notes) = (None, vec![]);
    for (k, v) in &kv.pairs {
        let bad = || refused(format!("{k}: '{v}' is not one of QEMU's actions for it"));
        match (k.as_str(), v.as_str()) {
            ("shutdown", "poweroff") => hold = Some(false),
            ("shutdown", "pause") => hold = Some(true),
            ("shutdown", _) => return Err(bad()),
            ("reboot", "shutdown") => {}
            ("reboot", "reset") => notes.push(
                "reboot=reset: nicvm never reboots a guest: a reboot is a shutdown \
                 (reboot=shutdown)"
                    .to_string(),
            ),
            ("reboot", _) => return Err(bad()),
            ("panic", "shutdown" | "exit-failure") => {}
            ("panic", "pause" | "none") => {
                return Err(refused(format!(
                    "panic={v}: a guest panic ends nicvm (exit status 2), as with \
                     panic=exit-failure"
                )))
            }
            ("panic", _) => return Err(bad()),
            (
                "watchdog",
                "reset" | "shutdown" | "poweroff" | "inject-nmi" | "pause" | "debug" | "none",
            ) => notes.push(format!("watchdog={v}: nicvm's PC has no watchdog")),
            ("watchdog", _) => return Err(bad()),
            _ => return Err(CliErrorKind::from(OptionError::Unknown(k.clone()))),
        }
    }
    Ok((hold, notes))
}

/// `-nic model=help`, `-net nic,model=help`.
pub fn nic_models() -> String {
    "Supported NIC models:\ne1000\nrtl8139\nvirtio-net-pci\n".into()
}

/// `-device help`: the devices `-device` takes (nicvm's NICs), in QEMU's format.
pub fn device_list() -> String {
    "Network devices:\n\
     name \"e1000\", bus PCI, alias \"e1000-82540em\", desc \"Intel Gigabit Ethernet\"\n\
     name \"rtl8139\", bus PCI\n\
     name \"virtio-net-pci\", bus PCI, alias \"virtio-net\"\n"
        .into()
}

/// `-device MODEL,help`: its properties, in QEMU's format.
pub fn device_properties(model: NicModel) -> String {
    let mut props: Vec<(&str, &str, &str)> = vec![
        (
            "addr",
            "int32",
            "Slot and optional function (0 only), example: 06.0 or 06 (default: the first slot the board leaves free)",
        ),
        (
            "bootindex",
            "int32",
            "accepted; nicvm boots the kernel directly",
        ),
        ("bus", "str", "pci.0 (nicvm has one PCI bus)"),
        (
            "id",
            "str",
            "the device's name (QMP set_link, query-rx-filter)",
        ),
        (
            "mac",
            "str",
            "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56",
        ),
        ("netdev", "str", "ID of a netdev to use as a backend"),
        ("romfile", "str", "accepted; no option ROM is loaded"),
    ];
    match model {
        NicModel::Rtl8139 { .. } => props.push((
            "cplus",
            "bool",
            "on: an RTL8139C+ (Linux 8139cp); off: an RTL8139C (8139too) (default: on)",
        )),
        NicModel::E1000 => {}
        NicModel::VirtioNetPci => {
            props.extend([
                (
                    "disable-legacy",
                    "OnOffAuto",
                    "on only: a modern (virtio 1.0) device",
                ),
                ("disable-modern", "bool", "off only"),
                (
                    "host_mtu",
                    "uint16",
                    "the guest's MTU (68-65535), offered as VIRTIO_NET_F_MTU (default 0: none)",
                ),
                (
                    "mq",
                    "bool",
                    "on: a queue pair per queue of -netdev tap,queues=N (default: off)",
                ),
                (
                    "ctrl_vq",
                    "bool",
                    "the control queue: RX mode, MAC tables (default: on)",
                ),
                ("mrg_rxbuf", "bool", "on/off (default: on)"),
                (
                    "vectors",
                    "uint32",
                    "MSI-X vectors, 1-128 (default: 2 per queue pair + 2)",
                ),
            ]);
            props.extend(
                VIRTIO_OFFLOADS
                    .iter()
                    .map(|&(k, _, what)| (k, "bool", what)),
            );
            props.extend(
                VIRTIO_NEVER_OFFERED
                    .iter()
                    .map(|&(k, what)| (k, "bool", what)),
            );
        }
    }
    props.sort();
    let mut out = format!("{} options:\n", model.name());
    for (name, ty, what) in props {
        out.push_str(&format!("  {:<22} - {what}\n", format!("{name}=<{ty}>")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_features_by_qemus_names() {
        let (_, f, missing) =
            cpu_option("host,-arch-capabilities,+avx,sse4_1=off,sse4.2,-avx").unwrap();
        assert_eq!(
            f,
            [
                ("arch-capabilities", false),
                ("avx", false),
                ("sse4.1", false),
                ("sse4.2", true),
            ]
        );
        // QEMU's precedence, whatever the order: -feat, then +feat, then feat=on|off.
        for (val, want) in [
            ("host,-avx,+avx", false),
            ("host,+avx,-avx", false),
            ("host,+avx,avx=off", true),
            ("host,avx=off,+avx", true),
            ("host,avx=off,avx", true),
            ("host,avx,avx=off", false),
            ("host,-avx,avx=on", false),
        ] {
            let (_, f, _) = cpu_option(val).unwrap();
            assert_eq!(f, [("avx", want)], "{val}");
        }
        assert_eq!(missing, Missing::Warn, "QEMU's default: check");
        let (note, f, _) = cpu_option("max").unwrap();
        assert!(f.is_empty() && note.starts_with("max: "), "{note}");
        // CPU properties that are not features.
        for (val, want) in [
            ("host,enforce", Missing::Refuse),
            ("host,+avx,enforce=on,check=off", Missing::Refuse),
            ("host,check=off", Missing::Quiet),
            ("host,check,migratable=no", Missing::Warn),
            ("max,enforce=off,migratable=on", Missing::Warn),
        ] {
            let (_, f, missing) = cpu_option(val).unwrap();
            assert_eq!(missing, want, "{val}");
            assert!(f.len() <= 1, "{val}: {f:?}");
        }
        for bad in ["host,enforce=maybe", "host,check=2"] {
            assert!(cpu_option(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_options_accepted_and_refused() {
        for (opt, val) in [
            ("-display", "none"),
            ("-vga", "none"),
            ("-M", "pc"),
            ("-machine", "q35,accel=kvm"),
            ("-machine", "type=pc-q35-8.2,accel=kvm:tcg,usb=off"),
            ("-accel", "kvm"),
            ("-cpu", "host"),
            ("-cpu", "max"),
            ("-snapshot", ""),
            ("-enable-kvm", ""),
            ("-M", "q35,accel=kvm,kernel-irqchip=split"),
            ("-boot", "c"),
            ("-boot", "order=n,menu=off"),
            ("-k", "en-us"),
            ("-no-hpet", ""),
            ("-no-acpi", ""),
            ("-mem-prealloc", ""),
            ("-machine", "pc,acpi=off"),
            ("-M", "q35,acpi=on,usb=off"),
            ("-uuid", "12345678-9abc-def0-1234-56789abcdef0"),
            ("-rtc", "base=utc"),
            ("-rtc", "base=utc,clock=host,driftfix=slew"),
            ("-global", "kvm-pit.lost_tick_policy=delay"),
            ("-global", "driver=ICH9-LPC,property=disable_s3,value=1"),
            ("-global", "PIIX4_PM.disable_s4=1"),
            ("-sandbox", "off"),
            ("-sandbox", "off,obsolete=deny"),
            ("-display", "type=none"),
            ("-display", "none,gl=off,show-cursor=on"),
            ("-msg", "timestamp=on"),
            ("-d", "guest_errors"),
            ("-D", "/tmp/qemu.log"),
            ("-overcommit", "mem-lock=off"),
        ] {
            assert!(machine_option(opt, val).is_ok(), "{opt} {val}");
        }
        for (opt, val) in [
            ("-display", "gtk"),
            ("-vga", "std"),
            ("-M", "microvm"),
            ("-machine", "q35,accel=tcg"),
            ("-machine", "pc,bogus=1"),
            ("-machine", "pc,acpi=maybe"),
            ("-accel", "tcg"),
            ("-cpu", "qemu64"),
            ("-cpu", "host,+bogus"),
            ("-cpu", "host,pmu=off"),
            ("-cpu", "host,avx=maybe"),
            ("-boot", "order=c,bogus=1"),
            ("-boot", "zz"),
            ("-boot", "order=xyz"),
            ("-boot", "menu=maybe"),
            ("-msg", "timestamp=banana"),
            ("-global", "PIIX4_PM.foo"),
            ("-uuid", "not-a-uuid"),
            ("-rtc", "base=localtime"),
            ("-rtc", "clock=vm"),
            ("-global", "e1000.mac=52:54:00:12:34:56"),
            ("-global", "kvm-pit.lost_tick_policy=discard"),
            ("-sandbox", "on"),
            ("-sandbox", "off,foo=bar"),
            ("-display", "none,foo=bar"),
            ("-overcommit", "mem-lock=on"),
            ("-msg", "colour=on"),
        ] {
            let e = machine_option(opt, val).unwrap_err().to_string();
            assert!(!e.contains('\n') && !e.is_empty(), "{opt} {val}: {e}");
        }
    }

    #[test]
    fn device_properties_qemu_users_pass() {
        let kv = |s: &str| KeyVal::parse(s, None).unwrap();
        let v = NicModel::VirtioNetPci;
        let mut k = kv("romfile=,bus=pci.0,bootindex=1,disable-legacy=on,mrg_rxbuf=off,host_mtu=1500,vectors=4,mq=off");
        let p = device_properties_accepted(v, &mut k).unwrap();
        assert!(!p.mrg_rxbuf && !p.mq && p.ctrl_vq && p.vectors == Some(4));
        assert!(k.pairs.is_empty(), "{k:?}");
        let p = device_properties_accepted(v, &mut kv("mq=on,vectors=10,ctrl_vq=on")).unwrap();
        assert!(p.mq && p.vectors == Some(10));
        assert_eq!(p.mtu, None, "no MTU offered unless asked for");
        for (mtu, offered) in [
            ("9000", Some(9000)),
            ("68", Some(68)),
            ("0", None),
            ("0x100", Some(256)),
            ("0104", Some(68)),
            ("+9000", Some(9000)),
        ] {
            let p = device_properties_accepted(v, &mut kv(&format!("host_mtu={mtu}"))).unwrap();
            assert_eq!(p.mtu, offered, "host_mtu={mtu}");
        }
        assert!(
            !device_properties_accepted(v, &mut kv("ctrl_vq=off"))
                .unwrap()
                .ctrl_vq
        );
        for bad in [
            "bus=pci.1",
            "bootindex=x",
            "disable-legacy=off",
            "disable-modern=on",
            "host_mtu=67",
            "host_mtu=0x+100",
            "host_mtu=0+104",
            "host_mtu=0x",
            "host_mtu=65536",
            "host_mtu=x",
            "vectors=0",
            "vectors=129",
            "mq=on,ctrl_vq=off",
            "ctrl_vq=maybe",
        ] {
            assert!(
                device_properties_accepted(v, &mut kv(bad)).is_err(),
                "{bad}"
            );
        }
        let e = device_properties_accepted(NicModel::E1000, &mut kv("mrg_rxbuf=on"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "mrg_rxbuf: only virtio-net-pci has this property");
        assert!(
            device_properties_accepted(NicModel::E1000, &mut kv("romfile=efi-e1000.rom"))
                .unwrap()
                .mrg_rxbuf
        );
    }

    #[test]
    fn virtio_offload_properties_withhold_their_features() {
        use devices::virtio::net::*;
        let kv = |s: &str| KeyVal::parse(s, None).unwrap();
        let v = NicModel::VirtioNetPci;
        assert_eq!(
            device_properties_accepted(v, &mut kv("mq=off"))
                .unwrap()
                .withheld,
            0,
            "every offload on by default"
        );
        let mut k = kv(
            "csum=on,host_tso4=off,guest_tso6=off,guest_ufo=on,host_ecn=off,gso=off,\
                        ctrl_guest_offloads=off,guest_announce=on",
        );
        let p = device_properties_accepted(v, &mut k).unwrap();
        assert_eq!(
            p.withheld,
            VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_HOST_ECN
        );
        assert!(k.pairs.is_empty(), "{k:?}");
        let off: Vec<String> = VIRTIO_OFFLOADS
            .iter()
            .map(|o| format!("{}=off", o.0))
            .collect();
        let p = device_properties_accepted(v, &mut kv(&off.join(","))).unwrap();
        assert_eq!(p.withheld.count_ones(), 10);
        let e = device_properties_accepted(v, &mut kv("host_tso6=maybe"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("host_tso6"), "{e}");
        assert!(device_properties_accepted(v, &mut kv("gso=2")).is_err());
        let e = device_properties_accepted(NicModel::E1000, &mut kv("guest_csum=off"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "guest_csum: only virtio-net-pci has this property");
    }

    #[test]
    fn listings() {
        assert!(wants_help("help") && wants_help("e1000,help") && wants_help("?"));
        assert!(!wants_help("e1000,netdev=help1"));
        assert!(device_properties(NicModel::Rtl8139 { cplus: true }).contains("cplus=<bool>"));
        assert!(device_list().contains("virtio-net-pci"));
        assert!(netdev_types().lines().any(|l| l == "tap"));
        assert!(nic_models().lines().any(|l| l == "e1000"));
    }
}
