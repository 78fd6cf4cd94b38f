//! The command line, with QEMU's option names and meanings. Every error names the option it
//! came from; nothing here touches KVM, files' contents or the network.

use crate::keyval::KeyVal;
use net_backends::MacAddr;
use std::path::PathBuf;

/// A bad command line: printed as one line, `OPTION: MESSAGE`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}: {}", one_line(option), one_line(message))]
pub struct CliError {
    pub option: String,
    pub message: String,
}

/// User text as it may appear in a one-line message: control characters (a newline typed into
/// an option) escaped.
fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}

fn err<T>(option: &str, message: impl Into<String>) -> Result<T, CliError> {
    Err(CliError {
        option: option.to_string(),
        message: message.into(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
    None,
}

/// `-netdev TYPE,id=ID,...`: the backend half of a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevSpec {
    pub id: String,
    pub kind: String,
    /// Backend-specific options, `id` and the type removed.
    pub opts: KeyVal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicModel {
    Rtl8139,
    E1000,
    VirtioNetPci,
}

impl NicModel {
    fn parse(s: &str) -> Option<NicModel> {
        Some(match s {
            "rtl8139" => NicModel::Rtl8139,
            "e1000" | "e1000-82540em" => NicModel::E1000,
            "virtio-net-pci" | "virtio-net" | "virtio" => NicModel::VirtioNetPci,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            NicModel::Rtl8139 => "rtl8139",
            NicModel::E1000 => "e1000",
            NicModel::VirtioNetPci => "virtio-net-pci",
        }
    }
}

/// `-device MODEL,netdev=ID,...`: the frontend half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub model: NicModel,
    pub netdev: String,
    pub mac: MacAddr,
    pub id: Option<String>,
    /// PCI slot (`addr=`).
    pub slot: Option<u8>,
    /// rtl8139 only (`cplus=on|off`, default on): the RTL8139C+ that Linux's 8139cp drives,
    /// or a plain RTL8139C for 8139too.
    pub cplus: bool,
}

/// `-object filter-dump,id=ID,netdev=NETDEV,file=PATH[,maxlen=N]`: capture a netdev's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpSpec {
    pub id: String,
    pub netdev: String,
    pub file: PathBuf,
    pub maxlen: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mem_mib: u64,
    pub cpus: u8,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub serial: SerialTarget,
    pub name: Option<String>,
    pub netdevs: Vec<NetdevSpec>,
    pub nics: Vec<NicSpec>,
    pub dumps: Vec<DumpSpec>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Run(Box<Config>),
    Help,
    Version,
}

pub const NETDEV_TYPES: &[&str] = &["user", "tap", "vde", "socket", "stream", "dgram"];
pub const MAX_CPUS: u8 = 8;

pub const USAGE: &str = "\
usage: nicvm [options]

Boots a Linux guest under KVM with emulated NICs. Options use QEMU's names and syntax.

Machine:
  -m SIZE                guest RAM; M/G/T suffixes, plain number = MiB (default 128M)
  -smp N                 vCPUs (default 1, at most 8); also cpus=N,sockets=,cores=,threads=
  -kernel FILE           Linux kernel: ELF vmlinux (PVH entry) or bzImage
  -initrd FILE           initramfs
  -append STRING         kernel command line
  -name NAME             name shown in messages
  -serial stdio|file:PATH|none
                         where COM1 goes (default stdio)
  -nographic             accepted for QEMU compatibility (nicvm never opens a window)
  -no-reboot             a guest reboot ends nicvm (always the case)
  -enable-kvm            accepted for QEMU compatibility (KVM is always used)

Network:
  -netdev TYPE,id=ID[,...]     backend: user, tap, vde, socket, stream, dgram
  -device MODEL,netdev=ID[,mac=MAC][,id=ID][,addr=SLOT]
                               NIC: rtl8139, e1000, virtio-net-pci
                               rtl8139,cplus=off: a plain RTL8139C (Linux 8139too) instead
                               of the RTL8139C+ (8139cp)
  -nic TYPE[,model=MODEL][,mac=MAC][,...]   netdev and NIC in one option; -nic none: no NIC
  -net nic[,model=MODEL][,macaddr=MAC]  -net TYPE[,...]   legacy form; -net none: no NIC
  With no network option at all: -netdev user,id=net0 -device rtl8139,netdev=net0
  -object filter-dump,id=ID,netdev=ID,file=PATH[,maxlen=N]
                               write the netdev's frames, both ways, to a pcap file

Other:
  -h, --help             this text
  --version              version and what kind of KVM host this is

Console: when stdin is a terminal, Ctrl-a x quits, Ctrl-a h lists the escapes.
Exit status: 0 guest reboot/poweroff or user quit; 1 bad options or setup failure;
2 guest kernel panic; 3 guest crash (triple fault, emulation failure) or nicvm error.
";

fn parse_size_mib(s: &str) -> Option<u64> {
    let s = s.strip_prefix("size=").unwrap_or(s);
    let s = s.split(',').next()?;
    let (num, mult): (&str, f64) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1.0 / 1024.0),
        (i, 'm' | 'M') => (&s[..i], 1.0),
        (i, 'g' | 'G') => (&s[..i], 1024.0),
        (i, 't' | 'T') => (&s[..i], 1024.0 * 1024.0),
        (_, c) if c.is_ascii_digit() => (s, 1.0),
        _ => return None,
    };
    let v: f64 = num.parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    Some((v * mult).round() as u64)
}

fn parse_smp(s: &str) -> Result<u8, String> {
    let kv = KeyVal::parse(s, Some("cpus")).map_err(|e| e.to_string())?;
    if let Some(k) = kv.unknown_key(&["cpus", "sockets", "cores", "threads", "maxcpus"]) {
        return Err(format!("unknown parameter '{k}'"));
    }
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("'{v}' is not a number"))
    };
    let cpus = match kv.first.as_deref().or(kv.get("cpus")) {
        Some(v) => num(v)?,
        None => {
            let mut n = 1;
            for k in ["sockets", "cores", "threads"] {
                if let Some(v) = kv.get(k) {
                    n *= num(v)?;
                }
            }
            n
        }
    };
    if cpus == 0 {
        return Err("needs at least 1 CPU".into());
    }
    if cpus > MAX_CPUS as u32 {
        return Err(format!(
            "{cpus} CPUs requested, nicvm supports at most {MAX_CPUS}"
        ));
    }
    Ok(cpus as u8)
}

/// `addr=SLOT[.FN]`, slot in hex as QEMU takes it.
fn parse_slot(s: &str) -> Option<u8> {
    let (slot, func) = s.split_once('.').unwrap_or((s, "0"));
    let slot = u8::from_str_radix(slot.trim_start_matches("0x"), 16).ok()?;
    (func == "0" && (1..32).contains(&slot)).then_some(slot)
}

struct Builder {
    mem_mib: u64,
    cpus: u8,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: String,
    serial: SerialTarget,
    name: Option<String>,
    netdevs: Vec<NetdevSpec>,
    /// (option it came from, model, raw properties)
    devices: Vec<(String, NicModel, KeyVal)>,
    no_nic: bool,
    legacy_nics: Vec<(NicModel, KeyVal)>,
    legacy_backends: Vec<(String, KeyVal)>,
    dumps: Vec<DumpSpec>,
}

fn netdev_from(option: &str, mut kv: KeyVal) -> Result<NetdevSpec, CliError> {
    let Some(kind) = kv.first.take() else {
        return err(
            option,
            format!(
                "a backend type is needed: one of {}",
                NETDEV_TYPES.join(", ")
            ),
        );
    };
    if !NETDEV_TYPES.contains(&kind.as_str()) {
        return err(
            option,
            format!(
                "unknown backend type '{kind}' (expected one of {})",
                NETDEV_TYPES.join(", ")
            ),
        );
    }
    let Some(id) = kv.remove("id") else {
        return err(option, "needs an id (id=NAME)");
    };
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return err(
            option,
            format!("'{id}' is not a valid id (letters, digits, - _ .)"),
        );
    }
    Ok(NetdevSpec { id, kind, opts: kv })
}

fn dump_from(option: &str, mut kv: KeyVal) -> Result<DumpSpec, CliError> {
    match kv.first.take().as_deref() {
        Some("filter-dump") => {}
        Some(t) => {
            return err(
                option,
                format!("unknown object type '{t}' (filter-dump is known)"),
            )
        }
        None => return err(option, "needs an object type (filter-dump)"),
    }
    let (Some(id), Some(netdev), Some(file)) =
        (kv.remove("id"), kv.remove("netdev"), kv.remove("file"))
    else {
        return err(option, "filter-dump needs id=, netdev= and file=");
    };
    let maxlen = match kv.remove("maxlen") {
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => return err(option, format!("maxlen: '{v}' is not a positive number")),
        },
        None => net_backends::pcap::DEFAULT_MAXLEN,
    };
    if let Some(q) = kv.remove("queue") {
        if q != "all" {
            return err(option, format!("queue: only 'all' is supported, not '{q}'"));
        }
    }
    if let Some(k) = kv.unknown_key(&[]) {
        return err(option, format!("unknown parameter '{k}'"));
    }
    Ok(DumpSpec {
        id,
        netdev,
        file: PathBuf::from(file),
        maxlen,
    })
}

fn model_from(option: &str, s: &str) -> Result<NicModel, CliError> {
    NicModel::parse(s).map_or_else(
        || {
            err(
                option,
                format!("unknown NIC model '{s}' (expected rtl8139, e1000 or virtio-net-pci)"),
            )
        },
        Ok,
    )
}

/// Arguments as the OS gives them; one that is not UTF-8 is an error naming the option it
/// belongs to.
fn utf8_args<I, S>(args: I) -> Result<Vec<String>, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString>,
{
    let mut out: Vec<String> = vec![];
    for a in args {
        match a.into().into_string() {
            Ok(s) => out.push(s),
            Err(bad) => {
                let option = match out.last() {
                    Some(prev) if prev.starts_with('-') => prev.clone(),
                    _ => bad.to_string_lossy().into_owned(),
                };
                return err(&option, "an argument is not valid UTF-8");
            }
        }
    }
    Ok(out)
}

pub fn parse<I, S>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString>,
{
    let args = utf8_args(args)?;
    let mut b = Builder {
        mem_mib: 128,
        cpus: 1,
        kernel: None,
        initrd: None,
        append: String::new(),
        serial: SerialTarget::Stdio,
        name: None,
        netdevs: vec![],
        devices: vec![],
        no_nic: false,
        legacy_nics: vec![],
        legacy_backends: vec![],
        dumps: vec![],
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if !arg.starts_with('-') || arg == "-" {
            return err(&arg, "unexpected argument (options start with -)");
        }
        // QEMU accepts --opt as well as -opt.
        let opt = format!("-{}", arg.trim_start_matches('-'));
        let takes_value = [
            "-m", "-smp", "-kernel", "-initrd", "-append", "-serial", "-name", "-netdev",
            "-object", "-device", "-nic", "-net",
        ]
        .contains(&opt.as_str());
        let val = if takes_value {
            match args.next() {
                Some(v) => v,
                None => return err(&opt, "needs a value"),
            }
        } else {
            String::new()
        };
        match opt.as_str() {
            "-h" | "-help" => return Ok(Action::Help),
            "-version" => return Ok(Action::Version),
            "-nographic" | "-no-reboot" | "-enable-kvm" => {}
            "-m" => {
                b.mem_mib = match parse_size_mib(&val) {
                    Some(0) => return err(&opt, "guest RAM must be larger than 0"),
                    Some(m) => m,
                    None => return err(&opt, format!("'{val}' is not a size (e.g. 256M, 1G)")),
                }
            }
            "-smp" => b.cpus = parse_smp(&val).or_else(|e| err(&opt, e.to_string()))?,
            "-kernel" => b.kernel = Some(val.into()),
            "-initrd" => b.initrd = Some(val.into()),
            "-append" => b.append = val,
            "-name" => {
                b.name = Some(
                    val.split(',')
                        .next()
                        .unwrap_or("")
                        .trim_start_matches("guest=")
                        .to_string(),
                )
            }
            "-serial" => {
                b.serial = match val.as_str() {
                    "stdio" | "mon:stdio" => SerialTarget::Stdio,
                    "none" | "null" => SerialTarget::None,
                    v => match v.strip_prefix("file:") {
                        Some(p) if !p.is_empty() => SerialTarget::File(p.into()),
                        _ => {
                            return err(
                                &opt,
                                format!("'{val}' is not supported (stdio, file:PATH, none)"),
                            )
                        }
                    },
                }
            }
            "-netdev" => {
                let kv = KeyVal::parse(&val, Some("type")).or_else(|e| err(&opt, e.to_string()))?;
                b.netdevs.push(netdev_from(&opt, kv)?);
            }
            "-object" => {
                let kv =
                    KeyVal::parse(&val, Some("qom-type")).or_else(|e| err(&opt, e.to_string()))?;
                b.dumps.push(dump_from(&opt, kv)?);
            }
            "-device" => {
                let mut kv =
                    KeyVal::parse(&val, Some("driver")).or_else(|e| err(&opt, e.to_string()))?;
                let Some(driver) = kv.first.take() else {
                    return err(&opt, "needs a device model");
                };
                let model = model_from(&opt, &driver)?;
                b.devices.push((format!("-device {driver}"), model, kv));
            }
            "-nic" => {
                let mut kv =
                    KeyVal::parse(&val, Some("type")).or_else(|e| err(&opt, e.to_string()))?;
                if kv.first.as_deref() == Some("none") {
                    b.no_nic = true;
                    continue;
                }
                let model = match kv.remove("model") {
                    Some(m) => model_from(&opt, &m)?,
                    None => NicModel::Rtl8139,
                };
                let mac = kv.remove("mac");
                let id = kv
                    .remove("id")
                    .unwrap_or_else(|| format!("__nic{}", b.netdevs.len()));
                kv.pairs.push(("id".into(), id.clone()));
                b.netdevs.push(netdev_from(&opt, kv)?);
                let mut dev = KeyVal::default();
                dev.pairs.push(("netdev".into(), id));
                if let Some(m) = mac {
                    dev.pairs.push(("mac".into(), m));
                }
                b.devices.push((opt.clone(), model, dev));
            }
            "-net" => {
                let mut kv =
                    KeyVal::parse(&val, Some("type")).or_else(|e| err(&opt, e.to_string()))?;
                match kv.first.as_deref() {
                    Some("none") => b.no_nic = true,
                    Some("nic") => {
                        kv.first = None;
                        let model = match kv.remove("model") {
                            Some(m) => model_from(&opt, &m)?,
                            None => NicModel::Rtl8139,
                        };
                        if let Some(m) = kv.remove("macaddr") {
                            kv.pairs.push(("mac".into(), m));
                        }
                        b.legacy_nics.push((model, kv));
                    }
                    Some(_) => {
                        kv.remove("vlan");
                        let name = kv.remove("name");
                        b.legacy_backends.push((name.unwrap_or_default(), kv));
                    }
                    None => return err(&opt, "needs a type (nic, user, tap, ...)"),
                }
            }
            _ => return err(&opt, "unknown option (see nicvm -h)"),
        }
    }
    b.finish()
}

impl Builder {
    fn finish(mut self) -> Result<Action, CliError> {
        let Some(kernel) = self.kernel.take() else {
            return err("-kernel", "a kernel is required (-kernel FILE)");
        };
        // Legacy -net: NICs pair with backends in order, as on QEMU's hub.
        if !self.legacy_nics.is_empty() || !self.legacy_backends.is_empty() {
            if self.legacy_nics.len() != self.legacy_backends.len() {
                return err(
                    "-net",
                    format!(
                        "{} '-net nic' but {} backend(s): give one backend per NIC",
                        self.legacy_nics.len(),
                        self.legacy_backends.len()
                    ),
                );
            }
            for (i, ((model, mut dev), (_, mut backend))) in self
                .legacy_nics
                .drain(..)
                .zip(self.legacy_backends.drain(..))
                .enumerate()
            {
                let id = format!("__net{i}");
                backend.pairs.push(("id".into(), id.clone()));
                self.netdevs.push(netdev_from("-net", backend)?);
                dev.pairs.push(("netdev".into(), id));
                self.devices.push(("-net nic".into(), model, dev));
            }
        }
        for (i, n) in self.netdevs.iter().enumerate() {
            if self.netdevs[..i].iter().any(|m| m.id == n.id) {
                return err("-netdev", format!("duplicate id '{}'", n.id));
            }
        }
        // No network options at all: the classic default, a user-mode network behind an
        // rtl8139, as `kvm` always gave.
        if !self.no_nic && self.netdevs.is_empty() && self.devices.is_empty() {
            let user = KeyVal {
                first: Some("user".into()),
                pairs: vec![("id".into(), "net0".into())],
            };
            self.netdevs.push(netdev_from("default network", user)?);
            let mut dev = KeyVal::default();
            dev.pairs.push(("netdev".into(), "net0".into()));
            self.devices
                .push(("default network".into(), NicModel::Rtl8139, dev));
        }
        let mut nics: Vec<NicSpec> = vec![];
        let mut ids: Vec<String> = vec![];
        for (option, model, mut kv) in self.devices.drain(..) {
            let Some(netdev) = kv.remove("netdev") else {
                return err(&option, "needs netdev=ID naming a -netdev");
            };
            if !self.netdevs.iter().any(|n| n.id == netdev) {
                return err(
                    &option,
                    format!("netdev '{netdev}' is not defined by any -netdev"),
                );
            }
            if nics.iter().any(|n| n.netdev == netdev) {
                return err(
                    &option,
                    format!("netdev '{netdev}' is already used by another NIC"),
                );
            }
            let mac = match kv.remove("mac") {
                Some(m) => m
                    .parse::<MacAddr>()
                    .or_else(|e| err(&option, format!("mac: {e}")))?,
                None => MacAddr::nth_default(nics.len() as u8),
            };
            if mac.is_multicast() {
                return err(&option, format!("mac: {mac} is a multicast address"));
            }
            let slot = match kv.remove("addr") {
                Some(a) => Some(parse_slot(&a).map_or_else(
                    || err(&option, format!("addr: '{a}' is not a PCI slot (1-1f)")),
                    Ok,
                )?),
                None => None,
            };
            if let Some(s) = slot {
                if nics.iter().any(|n| n.slot == Some(s)) {
                    return err(&option, format!("addr: slot {s:x} is already taken"));
                }
            }
            let cplus = match kv.remove("cplus") {
                Some(v) if model == NicModel::Rtl8139 => {
                    crate::netdev::on_off("cplus", &v).or_else(|e| err(&option, e))?
                }
                Some(_) => return err(&option, "cplus: only rtl8139 has this property"),
                None => true,
            };
            let id = kv.remove("id");
            if let Some(id) = &id {
                if ids.contains(id) {
                    return err(&option, format!("duplicate id '{id}'"));
                }
                ids.push(id.clone());
            }
            nics.push(NicSpec {
                model,
                netdev,
                mac,
                id,
                slot,
                cplus,
            });
            if let Some((k, _)) = kv.pairs.first() {
                return err(&option, format!("unknown property '{k}'"));
            }
        }
        if self.no_nic && !nics.is_empty() {
            return err("-nic none", "conflicts with the NICs also asked for");
        }
        for d in &self.dumps {
            if !self.netdevs.iter().any(|n| n.id == d.netdev) {
                return err(
                    "-object filter-dump",
                    format!("netdev '{}' is not defined by any -netdev", d.netdev),
                );
            }
            if self
                .dumps
                .iter()
                .filter(|o| o.netdev == d.netdev || o.id == d.id)
                .count()
                > 1
            {
                return err(
                    "-object filter-dump",
                    format!("one capture per netdev and per id ('{}')", d.id),
                );
            }
        }
        Ok(Action::Run(Box::new(Config {
            mem_mib: self.mem_mib,
            cpus: self.cpus,
            kernel,
            initrd: self.initrd,
            append: self.append,
            serial: self.serial,
            name: self.name,
            netdevs: self.netdevs,
            nics,
            dumps: self.dumps,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> Result<Config, CliError> {
        match parse(s.split_whitespace().map(String::from))? {
            Action::Run(c) => Ok(*c),
            a => panic!("{a:?}"),
        }
    }

    fn option_of(s: &str) -> String {
        run(s).unwrap_err().option
    }

    #[test]
    fn errors_are_one_line_whatever_was_typed() {
        let e = parse(["-name", "a", "-bo\ngus"]).unwrap_err();
        assert_eq!(e.to_string(), "-bo\\ngus: unknown option (see nicvm -h)");
        use std::os::unix::ffi::OsStringExt;
        let bad = std::ffi::OsString::from_vec(vec![b'x', 0xff, b'\n']);
        let e = parse([std::ffi::OsString::from("-name"), bad]).unwrap_err();
        assert_eq!(e.option, "-name");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn machine_options() {
        let c = run(
            "-m 1G -smp 2 -kernel k -initrd i -append quiet -nographic -no-reboot -serial none",
        )
        .unwrap();
        assert_eq!((c.mem_mib, c.cpus), (1024, 2));
        assert_eq!(c.kernel, PathBuf::from("k"));
        assert_eq!(c.initrd, Some(PathBuf::from("i")));
        assert_eq!(c.serial, SerialTarget::None);
        assert_eq!(run("-kernel k").unwrap().mem_mib, 128);
        assert_eq!(run("-m 64 -kernel k").unwrap().mem_mib, 64);
        assert_eq!(run("--m 512M -kernel k").unwrap().mem_mib, 512);
        assert_eq!(run("-m size=2g -kernel k").unwrap().mem_mib, 2048);
        assert_eq!(run("-smp cpus=3 -kernel k").unwrap().cpus, 3);
        assert_eq!(
            run("-smp sockets=1,cores=2,threads=2 -kernel k")
                .unwrap()
                .cpus,
            4
        );
        assert_eq!(
            run("-serial file:/tmp/x -kernel k").unwrap().serial,
            SerialTarget::File("/tmp/x".into())
        );
        assert_eq!(parse(["-h".to_string()]).unwrap(), Action::Help);
        assert_eq!(parse(["--version".to_string()]).unwrap(), Action::Version);
    }

    #[test]
    fn bad_machine_options_name_the_option() {
        assert_eq!(option_of("-m 0 -kernel k"), "-m");
        assert_eq!(option_of("-m lots -kernel k"), "-m");
        assert_eq!(option_of("-smp 0 -kernel k"), "-smp");
        assert_eq!(option_of("-smp 99 -kernel k"), "-smp");
        assert_eq!(option_of("-bogus -kernel k"), "-bogus");
        assert_eq!(option_of("-m"), "-m");
        assert_eq!(option_of("-m 64"), "-kernel");
        assert_eq!(option_of("-serial tcp:1 -kernel k"), "-serial");
        assert_eq!(option_of("stray -kernel k"), "stray");
    }

    #[test]
    fn netdev_and_device() {
        let c = run("-kernel k -netdev user,id=n0,hostfwd=tcp::2222-:22 -device e1000,netdev=n0,mac=52:54:00:aa:bb:cc,addr=5 -netdev tap,id=n1,ifname=tap0 -device virtio-net-pci,netdev=n1").unwrap();
        assert_eq!(c.netdevs.len(), 2);
        assert_eq!(c.netdevs[0].kind, "user");
        assert_eq!(c.netdevs[0].opts.get("hostfwd"), Some("tcp::2222-:22"));
        assert_eq!(c.nics[0].model, NicModel::E1000);
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:aa:bb:cc");
        assert_eq!(c.nics[0].slot, Some(5));
        assert_eq!(c.nics[1].model, NicModel::VirtioNetPci);
        assert_eq!(
            c.nics[1].mac.to_string(),
            "52:54:00:12:34:57",
            "second default MAC"
        );
    }

    #[test]
    fn short_forms() {
        let c =
            run("-kernel k -nic user,model=virtio-net-pci,mac=52:54:00:00:00:01,hostfwd=tcp::1-:2")
                .unwrap();
        assert_eq!(c.netdevs[0].kind, "user");
        assert_eq!(c.netdevs[0].opts.get("hostfwd"), Some("tcp::1-:2"));
        assert_eq!(c.nics[0].model, NicModel::VirtioNetPci);
        assert_eq!(c.nics[0].netdev, c.netdevs[0].id);
        let c = run("-kernel k -net nic,model=e1000,macaddr=52:54:00:00:00:02 -net user").unwrap();
        assert_eq!(c.nics[0].model, NicModel::E1000);
        assert_eq!(c.netdevs[0].kind, "user");
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:00:00:02");
        assert!(run("-kernel k -nic none").unwrap().nics.is_empty());
        assert!(run("-kernel k -net none").unwrap().nics.is_empty());
    }

    #[test]
    fn default_network_is_user_behind_rtl8139() {
        let c = run("-kernel k").unwrap();
        assert_eq!(c.netdevs.len(), 1);
        assert_eq!(
            (c.netdevs[0].kind.as_str(), c.netdevs[0].id.as_str()),
            ("user", "net0")
        );
        assert_eq!(c.nics.len(), 1);
        assert_eq!(c.nics[0].model, NicModel::Rtl8139);
        assert!(c.nics[0].cplus);
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:12:34:56");
        assert!(run("-kernel k -nic none").unwrap().netdevs.is_empty());
        // Any network option replaces the default.
        let c = run("-kernel k -netdev user,id=u").unwrap();
        assert!(c.nics.is_empty());
    }

    #[test]
    fn filter_dump() {
        let c = run("-kernel k -object filter-dump,id=f,netdev=net0,file=/tmp/x.pcap,maxlen=128")
            .unwrap();
        assert_eq!(
            c.dumps[0].netdev, "net0",
            "the default network can be captured"
        );
        assert_eq!(c.dumps[0].maxlen, 128);
        for bad in [
            "-kernel k -object filter-dump,id=f,netdev=nope,file=x",
            "-kernel k -object filter-dump,id=f,netdev=net0",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,maxlen=0",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,queue=rx",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,bogus=1",
            "-kernel k -object memory-backend-ram,id=m",
        ] {
            assert!(option_of(bad).starts_with("-object"), "{bad}");
        }
    }

    #[test]
    fn nic_properties() {
        let c = run("-kernel k -netdev user,id=u -device rtl8139,netdev=u,cplus=off").unwrap();
        assert!(!c.nics[0].cplus);
        assert_eq!(
            option_of("-kernel k -netdev user,id=u -device rtl8139,netdev=u,cplus=maybe"),
            "-device rtl8139"
        );
        assert_eq!(
            option_of("-kernel k -netdev user,id=u -device e1000,netdev=u,cplus=on"),
            "-device e1000"
        );
        assert_eq!(
            option_of("-kernel k -netdev user,id=u -device e1000,netdev=u,speed=10"),
            "-device e1000"
        );
    }

    #[test]
    fn bad_network_options_name_the_option() {
        assert_eq!(option_of("-kernel k -netdev bogus,id=a"), "-netdev");
        assert_eq!(option_of("-kernel k -netdev user"), "-netdev");
        assert_eq!(option_of("-kernel k -netdev user,id=a,,b,x"), "-netdev");
        assert_eq!(
            option_of("-kernel k -netdev user,id=a -netdev tap,id=a"),
            "-netdev"
        );
        assert_eq!(option_of("-kernel k -device ne2k_pci,netdev=a"), "-device");
        assert_eq!(
            option_of("-kernel k -device e1000,netdev=nope"),
            "-device e1000"
        );
        assert_eq!(option_of("-kernel k -device e1000"), "-device e1000");
        assert_eq!(
            option_of("-kernel k -netdev user,id=a -device e1000,netdev=a,mac=52:54:00:zz:00:01"),
            "-device e1000"
        );
        assert_eq!(
            option_of("-kernel k -netdev user,id=a -device e1000,netdev=a,mac=01:00:5e:00:00:01"),
            "-device e1000"
        );
        assert_eq!(
            option_of(
                "-kernel k -netdev user,id=a -device e1000,netdev=a -device rtl8139,netdev=a"
            ),
            "-device rtl8139"
        );
        assert_eq!(
            option_of("-kernel k -netdev user,id=a -device e1000,netdev=a,addr=40"),
            "-device e1000"
        );
        assert_eq!(option_of("-kernel k -net nic"), "-net");
        assert_eq!(option_of("-kernel k -nic user,model=pcnet"), "-nic");
    }
}
