//! The command line, with QEMU's option names and meanings, turned into a checked
//! [`Config`]. Every error names the option it came from; nothing here touches KVM, files'
//! contents or the network (host names in socket addresses are resolved).

use crate::config::netdev::{self as netdev_opts, HeaderError};
use crate::config::{
    on_off, Backend, BridgeOptions, Config, DumpConfig, Endpoint, InheritedFds, MonitorConfig,
    MonitorMode, NetdevConfig, NicConfig, NicModel, Note, OptionError, SaveOn, SerialTarget,
    TapDevice, TapOptions, Topology,
};
use crate::keyval::{is_json, KeyVal, KeyValError};
use crate::qemu_compat;
use net_backends::mac::ParseMacError;
use net_backends::slirp::SlirpOptions;
use net_backends::MacAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// A bad command line: printed as one line, `OPTION: MESSAGE`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", one_line(option), one_line(&error.to_string()))]
pub struct CliError {
    /// The option as messages name it (`-m`, `-netdev tap,id=n0`, `-device e1000`).
    pub option: String,
    #[source]
    pub error: CliErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum CliErrorKind {
    #[error(transparent)]
    Syntax(#[from] KeyValError),
    #[error(transparent)]
    Netdev(#[from] HeaderError),
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("unexpected argument (options start with -)")]
    Unexpected,
    #[error("needs a value")]
    NeedsValue,
    #[error("unknown option (see nicvm -h)")]
    UnknownOption,
    #[error("an argument is not valid UTF-8")]
    NotUtf8,
    #[error("guest RAM must be at least 1 MiB")]
    NoRam,
    #[error("'{0}' is not a size (e.g. 256M, 1G)")]
    BadSize(String),
    #[error("'{0}' is more guest RAM than an x86-64 guest can address")]
    TooMuchRam(String),
    #[error("{key}: '{value}' is not a number")]
    NotANumber { key: &'static str, value: String },
    #[error("needs at least 1 CPU")]
    NoCpu,
    #[error("{0} CPUs requested, nicvm supports at most {MAX_CPUS}")]
    TooManyCpus(u32),
    #[error("'{0}' is not supported (stdio, mon:stdio, file:PATH, unix:PATH,server=on, tcp:HOST:PORT,server=on, pty, chardev:ID, none)")]
    BadSerial(String),
    #[error("a kernel is required (-kernel FILE)")]
    NoKernel,
    #[error("needs a device model")]
    NoModel,
    #[error("unknown NIC model '{0}' (expected rtl8139, e1000 or virtio-net-pci)")]
    UnknownModel(String),
    #[error("needs a type (nic, user, tap, ...)")]
    NoNetType,
    #[error("{vlan}{nics} '-net nic' but {backends} backend(s) (-net dump not counted): give one backend per NIC")]
    NetCount {
        vlan: String,
        nics: usize,
        backends: usize,
    },
    #[error("netdev= and vlan= cannot both be given")]
    NetdevAndVlan,
    #[error("vlan: '{0}' is not a hub number (0, 1, ...)")]
    BadVlan(String),
    #[error("no backend on {0} to capture")]
    DumpWithoutBackend(String),
    #[error("{0}")]
    Refused(String),
    #[error("{key}: only virtio-net-pci has this property")]
    VirtioOnly { key: String },
    #[error("duplicate id '{0}'")]
    DuplicateId(String),
    #[error("netdev '{0}' is not defined by any -netdev")]
    UndefinedNetdev(String),
    #[error("netdev '{0}' is already used by another NIC")]
    NetdevInUse(String),
    #[error("mac: {0}")]
    Mac(#[from] ParseMacError),
    #[error("mac: {0} is a multicast address")]
    MulticastMac(MacAddr),
    #[error("addr: '{0}' is not a PCI slot (1-1f, with function 0 if any: 3, 0x3, 03.0)")]
    BadSlot(String),
    #[error(
        "addr: '{0}': function {1}: nicvm's NICs are single-function devices, in function 0 \
         of their slot (a guest looks for a device in function 0 first)"
    )]
    SlotFunction(String, u8),
    #[error("addr: slot {0:x} is already taken")]
    SlotTaken(u8),
    #[error(
        "no free PCI slot for NIC {0} (counting -nic, then -net nic, then -device; slots \
         QEMU's board holds are passed over, and one stays for nicvm's pvpanic)"
    )]
    NoFreeSlot(usize),
    #[error("cplus: only rtl8139 has this property")]
    CplusNotRtl8139,
    #[error("unknown property '{0}'")]
    UnknownProperty(String),
    #[error("unknown object type '{0}' (filter-dump is known)")]
    UnknownObject(String),
    #[error("needs an object type (filter-dump)")]
    NoObjectType,
    #[error("filter-dump needs id=, netdev= and file=")]
    DumpNeeds,
    #[error("maxlen: '{0}' is not a number of bytes from 1 to 4294967295")]
    BadMaxlen(String),
    #[error("queue: only 'all' is supported, not '{0}'")]
    BadQueue(String),
    #[error("chardev '{0}' is not defined by any -chardev")]
    UndefinedChardev(String),
    #[error("'{0}' is not supported (unix:PATH or tcp:HOST:PORT, with server=on; -monitor and -serial also take stdio)")]
    BadChardev(String),
    #[error(
        "netdev '{netdev}' is captured twice ('{first}' and '{second}'): one capture per netdev"
    )]
    DuplicateDump {
        netdev: String,
        first: String,
        second: String,
    },
}

/// `s`, or its first `max` characters and "..." when it is longer.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// User text as it may appear in a one-line message: control characters (a newline typed into
/// an option) escaped.
pub fn one_line(s: &str) -> String {
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

/// QEMU's rule for the ids of netdevs and devices: a letter, then letters, digits, '-', '.'
/// or '_'.
fn is_id(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn not_an_id(id: String) -> OptionError {
    OptionError::NotA {
        key: "id".into(),
        value: id,
        what: "an id (a letter, then letters, digits, '-', '.' or '_')",
    }
}

/// A `-net` option's hub (vlan=; 0 when not given) as a number: `vlan=01` is hub 1.
fn take_vlan(option: &str, kv: &mut KeyVal) -> Result<String, CliError> {
    match kv.take_last("vlan") {
        None => Ok("0".into()),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => Ok(n.to_string()),
            _ => err(option, CliErrorKind::BadVlan(v)),
        },
    }
}

fn err<T>(option: &str, error: impl Into<CliErrorKind>) -> Result<T, CliError> {
    Err(CliError {
        option: option.to_string(),
        error: error.into(),
    })
}

#[derive(Debug)]
pub enum Action {
    Run(Box<Config>),
    Help,
    Version,
    /// `-device help`, `-netdev help`, ...: the text to print (exit 0).
    Listing(String),
}

/// `-save-on console=TEXT,file=PATH` (`,,` for a comma in TEXT).
fn parse_save_on(val: &str) -> Result<SaveOn, CliErrorKind> {
    let kv = KeyVal::parse(val, None)?;
    let bad = |what: &str| Err(CliErrorKind::Refused(what.into()));
    if kv.first.is_some() {
        return bad("expected console=TEXT,file=PATH");
    }
    if let Some(k) = kv.unknown_key(&["console", "file"]) {
        return Err(CliErrorKind::UnknownProperty(k.into()));
    }
    match (kv.get("console"), kv.get("file")) {
        (Some(""), _) => bad("console= must not be empty"),
        (Some(c), Some(f)) if !f.is_empty() => Ok(SaveOn {
            console: c.into(),
            file: f.into(),
        }),
        _ => bad("needs console=TEXT and file=PATH"),
    }
}

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
  -serial stdio|mon:stdio|file:PATH|unix:PATH,server=on,wait=off|tcp:HOST:PORT,server=on,...
          |pty|chardev:ID|none
                         where COM1 goes (default stdio); mon:stdio shares the console
                         with the human monitor (Ctrl-a c switches)
  -nographic             as QEMU: the console is mon:stdio unless -monitor, -qmp, -mon,
                         -nodefaults or -serial stdio say otherwise; with -serial elsewhere
                         stdio is the monitor's alone (no window ever)
  -no-reboot             a guest reboot ends nicvm (always the case)
  -no-shutdown           a guest power-off or reboot stops the guest instead of ending
                         nicvm (QMP/HMP quit ends it); also -action shutdown=pause
  -daemonize             run in the background once set up (set-up errors still reach
                         the caller and the exit status)
  -pidfile FILE          write nicvm's pid to FILE (removed at exit)
  -S                     start the guest stopped (QMP cont starts it)

Snapshots (see docs/snapshots.md):
  -incoming file:PATH    start from a snapshot instead of booting (same -m, -smp and
                         NICs as when it was saved; backends are opened anew)
  -save-on console=TEXT,file=PATH
                         when the guest writes TEXT on its console: stop it, write a
                         snapshot to PATH and exit 0 (QMP: stop, migrate file:PATH)
  Accepted with a note, as they change nothing here: -enable-kvm, -accel kvm,
  -M/-machine pc|q35[,accel=kvm], -cpu host|max, -display none, -vga none, -nodefaults
  (no default NIC), -snapshot (there are no disks), -boot, -k, -rtc base=utc, -no-hpet,
  -uuid, -msg, -d, -D, -sandbox off, -overcommit mem-lock=off, -global for the PIT and
  power management. See docs/qemu-compat.md.

Network:
  -netdev TYPE,id=ID[,...]     backend: user, tap, vde, socket, stream, dgram, bridge
  -device MODEL,netdev=ID[,mac=MAC][,id=ID][,addr=SLOT]
                               NIC: rtl8139, e1000, virtio-net-pci
                               rtl8139,cplus=off: a plain RTL8139C (Linux 8139too) instead
                               of the RTL8139C+ (8139cp)
  -nic [TYPE][,model=MODEL][,mac=MAC][,...]   netdev and NIC in one option (TYPE defaults
                               to user); -nic none: no default NIC
  -net nic[,model=MODEL][,macaddr=MAC][,vlan=N]  -net TYPE[,vlan=N][,...]  legacy form,
                               NICs paired with backends per vlan; -net none: no default NIC
  -netdev help, -device help, -device MODEL,help, -nic model=help   what there is
                               (also -nic help, -M help, -cpu help, -chardev help, ...)
  With no network option at all: -netdev user,id=net0 -device rtl8139,netdev=net0
  -object filter-dump,id=ID,netdev=ID,file=PATH[,maxlen=N]
                               write the netdev's frames, both ways, to a pcap file

Monitors (server=on: nicvm listens; with wait=on, QEMU's default, the guest starts once a
client has connected. server=off: nicvm connects. fd=N: a socket it inherited):
  -qmp unix:PATH,server=on,wait=off | tcp:[HOST]:PORT,server=on,wait=off
                               QMP, QEMU's JSON monitor (several clients)
  -monitor unix:...|tcp:...|stdio
                               the human monitor (HMP)
  -chardev socket,id=ID,path=PATH|host=H,port=P|fd=N[,server=on,wait=off]  -chardev stdio,id=ID
  -mon chardev=ID[,mode=control|readline]

Other:
  -h, --help             this text
  --version              version and what kind of KVM host this is

Console: when stdin is a terminal, Ctrl-a x quits, Ctrl-a h lists the escapes (not with
the monitor alone there, as with -nographic -serial file:...: Ctrl-C quits).
Exit status: 0 guest reboot/poweroff, user or monitor quit, SIGINT/TERM/HUP/USR1;
1 bad options or setup failure;
2 guest kernel panic; 3 guest crash (triple fault, emulation failure) or nicvm error.
";

/// `-m [size=]SIZE[,slots=N][,maxmem=SIZE]`: the RAM in MiB (`default` without a size).
/// Memory hotplug's `slots` and `maxmem` are checked as QEMU checks them and change nothing
/// (nicvm has no hotplug).
fn parse_mem(val: &str, default: u64) -> Result<u64, CliErrorKind> {
    let kv = KeyVal::parse(val, Some("size"))?;
    if let Some(k) = kv.unknown_key(&["size", "slots", "maxmem"]) {
        return Err(OptionError::Unknown(k.into()).into());
    }
    let size = kv.first.as_deref().or(kv.get("size"));
    let mib = match size.map(|s| (s, parse_size_mib(s))) {
        None => Some(default),
        Some((_, m)) => m,
    };
    let size = size.unwrap_or("");
    let mib = match mib {
        Some(0) => return Err(CliErrorKind::NoRam),
        // Beyond what an x86-64 guest can address (52-bit physical addresses).
        Some(m) if m >= 1 << 32 => return Err(CliErrorKind::TooMuchRam(size.into())),
        Some(m) => m,
        None => return Err(CliErrorKind::BadSize(size.into())),
    };
    if let Some(n) = kv.get("slots") {
        n.parse::<u32>().map_err(|_| CliErrorKind::NotANumber {
            key: "slots",
            value: n.into(),
        })?;
    }
    if let Some(m) = kv.get("maxmem") {
        match parse_size_mib(m) {
            Some(max) if max >= mib => {}
            Some(_) => {
                return Err(CliErrorKind::Refused(format!(
                    "maxmem={m} is less than the initial {mib} MiB"
                )))
            }
            None => return Err(CliErrorKind::BadSize(m.into())),
        }
    }
    Ok(mib)
}

fn parse_size_mib(s: &str) -> Option<u64> {
    let (num, mult): (&str, f64) = match s.char_indices().last()? {
        (i, 'b' | 'B') => (&s[..i], 1.0 / (1024.0 * 1024.0)),
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

/// `-smp [cpus=]N[,sockets=S][,dies=1][,cores=C][,threads=T][,maxcpus=M]`, checked as QEMU
/// checks it: the topology's product must be the CPU count (parameters left out are
/// computed), and maxcpus can only be the CPU count (no CPU hotplug).
fn parse_smp(s: &str) -> Result<(u8, Topology), CliErrorKind> {
    let kv = KeyVal::parse(s, Some("cpus"))?;
    if let Some(k) = kv.unknown_key(&["cpus", "sockets", "dies", "cores", "threads", "maxcpus"]) {
        return Err(OptionError::Unknown(k.into()).into());
    }
    let num = |key: &'static str, v: &str| {
        v.parse::<u32>().map_err(|_| CliErrorKind::NotANumber {
            key,
            value: v.into(),
        })
    };
    let opt = |k: &'static str| kv.get(k).map(|v| num(k, v)).transpose();
    let topo = [
        opt("sockets")?,
        opt("dies")?,
        opt("cores")?,
        opt("threads")?,
    ];
    if topo.contains(&Some(0)) {
        return Err(CliErrorKind::Refused(
            "sockets, dies, cores and threads must be at least 1".into(),
        ));
    }
    let product = topo
        .iter()
        .fold(1u32, |n, t| n.saturating_mul(t.unwrap_or(1)));
    let given = match kv.first.as_deref().or(kv.get("cpus")) {
        Some(v) => Some(num("cpus", v)?),
        None => None,
    };
    let maxcpus = opt("maxcpus")?;
    let cpus = given.or(maxcpus).unwrap_or(product);
    if let Some(m) = maxcpus {
        if m != cpus {
            return Err(CliErrorKind::Refused(format!(
                "maxcpus={m} differs from the {cpus} CPUs: nicvm has no CPU hotplug"
            )));
        }
    }
    if cpus != 0 && topo.iter().any(Option::is_some) {
        // sockets, cores and threads all given: nothing left to compute (dies defaults to 1).
        let all_given = topo[0].is_some() && topo[2].is_some() && topo[3].is_some();
        let fits = if all_given {
            product == cpus
        } else {
            cpus % product == 0
        };
        if !fits {
            return Err(CliErrorKind::Refused(format!(
                "the topology (sockets x dies x cores x threads = {product}) does not match \
                 {cpus} CPUs"
            )));
        }
    }
    if cpus == 0 {
        return Err(CliErrorKind::NoCpu);
    }
    if cpus > MAX_CPUS as u32 {
        return Err(CliErrorKind::TooManyCpus(cpus));
    }
    // What was left out, as QEMU computes it for its x86 machines since 6.2 (cores before
    // sockets); checked above to divide the CPU count.
    let [sockets, dies, cores, threads] = topo;
    let dies = dies.unwrap_or(1);
    let (sockets, cores, threads) = match (sockets, cores) {
        (s, None) => {
            let (s, t) = (s.unwrap_or(1), threads.unwrap_or(1));
            (s, cpus / (s * dies * t), t)
        }
        (None, Some(c)) => {
            let t = threads.unwrap_or(1);
            (cpus / (dies * c * t), c, t)
        }
        // Threads left out come last: what the rest leaves of the CPU count.
        (Some(s), Some(c)) => (s, c, threads.unwrap_or(cpus / (s * dies * c))),
    };
    let t = |n: u32| n.clamp(1, MAX_CPUS as u32) as u8;
    Ok((
        cpus as u8,
        Topology {
            sockets: t(sockets),
            dies: t(dies),
            cores: t(cores),
            threads: t(threads),
        },
    ))
}

/// `addr=SLOT[.FN]`, each in hex (`0x` allowed) as QEMU takes them. Function 0 only: a NIC
/// in another function of an empty slot is one Linux never finds (it looks at function 0
/// first), and nicvm has no multifunction devices to fill function 0.
fn parse_slot(s: &str) -> Result<u8, CliErrorKind> {
    let hex = |t: &str| {
        let t = t.strip_prefix("0x").unwrap_or(t);
        u8::from_str_radix(t, 16)
            .ok()
            .filter(|_| !t.starts_with('+'))
    };
    let (slot, func) = s.split_once('.').unwrap_or((s, "0"));
    match (hex(slot), hex(func)) {
        (Some(slot), Some(0)) if (1..32).contains(&slot) => Ok(slot),
        (Some(slot), Some(f @ 1..=7)) if (1..32).contains(&slot) => {
            Err(CliErrorKind::SlotFunction(s.to_string(), f))
        }
        _ => Err(CliErrorKind::BadSlot(s.to_string())),
    }
}

struct Builder<'a> {
    fds: &'a InheritedFds,
    mem_mib: u64,
    cpus: u8,
    topology: Topology,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: String,
    serial: SerialTarget,
    name: Option<String>,
    netdevs: Vec<NetdevConfig>,
    /// (option it came from, model, raw properties)
    /// The NICs: the option that made each, its model and properties, and where it came on
    /// the command line (QEMU's creation order depends on it).
    devices: Vec<(String, NicModel, KeyVal, usize)>,
    no_nic: bool,
    /// `-net nic` and `-net TYPE` / `-net dump`, each with its vlan (hub) number.
    legacy_nics: Vec<(NicModel, KeyVal, String, usize)>,
    legacy_backends: Vec<(KeyVal, String)>,
    legacy_dumps: Vec<(KeyVal, String)>,
    dumps: Vec<DumpConfig>,
    daemonize: bool,
    pidfile: Option<PathBuf>,
    /// `-nodefaults`: no default NIC, and no serial console unless `-serial` says.
    nodefaults: bool,
    /// `-M q35` (or a pc-q35-* version): QEMU's board holds other PCI slots than pc's.
    q35: bool,
    /// QEMU's board has a VGA card in a PCI slot (not after `-vga none` or `-nodefaults`).
    vga: bool,
    /// `-nographic`: as in QEMU, the console on stdio is `mon:stdio` unless a `-serial` or
    /// a monitor option says otherwise.
    nographic: bool,
    /// `-cpu host,...`'s feature switches (the last -cpu wins, as in QEMU).
    cpu_features: Vec<(&'static str, bool)>,
    cpu_missing: crate::cpuid::Missing,
    /// `-monitor`, `-qmp` or `-mon` given (`none` included): no default monitor.
    monitor_given: bool,
    serial_given: bool,
    notes: Vec<Note>,
    monitors: Vec<MonitorConfig>,
    /// `-chardev` ids and where they listen.
    /// Each `-chardev`: its id, where, and whether it speaks telnet.
    chardevs: Vec<(String, Endpoint, bool)>,
    /// Sockets given with `wait=on`, QEMU's default for a server (see `Config::wait_for`).
    waiting: Vec<Endpoint>,
    /// `-mon chardev=ID` given before its `-chardev`: (option, ID, mode, pretty).
    mon_later: Vec<(String, String, MonitorMode, bool)>,
    start_paused: bool,
    /// `-no-shutdown`, `-action shutdown=pause`.
    no_shutdown: bool,
    /// `-name ...,process=NAME`.
    process_name: Option<String>,
    incoming: Option<PathBuf>,
    save_on: Option<SaveOn>,
    /// `-serial chardev:ID`.
    serial_chardev: Option<String>,
    /// `-chardev stdio,signal=on|off`.
    stdio_signal: Option<bool>,
}

/// A netdev from `origin` (`-netdev`, `-nic`, `-net`), every option checked. Errors in its
/// type or id name `origin`; errors in its options name the netdev (`-netdev tap,id=n0`;
/// `-nic user` when the id is not the user's).
fn netdev_config(
    origin: &str,
    mut kv: KeyVal,
    fds: &InheritedFds,
    user_id: bool,
) -> Result<NetdevConfig, CliError> {
    let (ty, id) = netdev_opts::header(&mut kv, origin == "-netdev").or_else(|e| err(origin, e))?;
    // QEMU's rule for ids; it also keeps the ids nicvm makes for -nic and -net apart.
    if user_id && !is_id(&id) {
        return err(origin, not_an_id(id));
    }
    let option = if user_id {
        format!("{origin} {},id={id}", ty.name())
    } else {
        format!("{origin} {}", ty.name())
    };
    let backend = netdev_opts::backend(ty, &id, &kv, fds).or_else(|e| err(&option, e))?;
    Ok(NetdevConfig {
        id,
        option,
        backend,
        hub: None,
    })
}

fn dump_from(option: &str, mut kv: KeyVal) -> Result<DumpConfig, CliError> {
    // As QEMU sets an object's properties: the last value of each stands.
    kv.keep_last();
    match kv.first.take() {
        Some(t) if t == "filter-dump" => {}
        Some(t) => return err(option, CliErrorKind::UnknownObject(t)),
        None => return err(option, CliErrorKind::NoObjectType),
    }
    let (Some(id), Some(netdev), Some(file)) =
        (kv.remove("id"), kv.remove("netdev"), kv.remove("file"))
    else {
        return err(option, CliErrorKind::DumpNeeds);
    };
    let maxlen = match kv.remove("maxlen") {
        Some(v) => match qemu_compat::qdev_uint(&v).map(u32::try_from) {
            Some(Ok(n)) if n > 0 => n,
            _ => return err(option, CliErrorKind::BadMaxlen(v)),
        },
        None => net_backends::pcap::DEFAULT_MAXLEN,
    };
    // QEMU's netfilter properties, at the values a capture has here (it sees both directions
    // of the netdev, as the last filter, and is on).
    for (key, only) in [("status", "on"), ("position", "tail"), ("insert", "behind")] {
        if let Some(v) = kv.remove(key) {
            if v != only {
                return err(
                    option,
                    CliErrorKind::Refused(format!(
                        "{key}={v}: a capture here is {key}={only} (the one netfilter nicvm has)"
                    )),
                );
            }
        }
    }
    if let Some(q) = kv.remove("queue") {
        if q != "all" {
            return err(option, CliErrorKind::BadQueue(q));
        }
    }
    if let Some(k) = kv.unknown_key(&[]) {
        return err(option, OptionError::Unknown(k.into()));
    }
    Ok(DumpConfig {
        option: "-object filter-dump",
        id,
        netdev,
        file: PathBuf::from(file),
        maxlen,
    })
}

fn model_from(option: &str, s: &str) -> Result<NicModel, CliError> {
    NicModel::parse(s).map_or_else(|| err(option, CliErrorKind::UnknownModel(s.into())), Ok)
}

/// The options that take a value (the next argument).
pub const VALUE_OPTIONS: &[&str] = &[
    "-m",
    "-smp",
    "-kernel",
    "-initrd",
    "-append",
    "-serial",
    "-name",
    "-netdev",
    "-object",
    "-device",
    "-nic",
    "-net",
    "-pidfile",
    "-action",
    "-display",
    "-vga",
    "-M",
    "-machine",
    "-accel",
    "-cpu",
    "-qmp",
    "-monitor",
    "-chardev",
    "-mon",
    "-incoming",
    "-save-on",
    "-boot",
    "-k",
    "-uuid",
    "-rtc",
    "-global",
    "-sandbox",
    "-msg",
    "-d",
    "-D",
    "-overcommit",
];

/// Whether `opt` (as `-name`) takes the next argument as its value.
fn takes_value(opt: &str) -> bool {
    VALUE_OPTIONS.contains(&opt)
}

/// Arguments as the OS gives them; one that is not UTF-8 is an error naming the option it
/// belongs to.
fn utf8_args<I, S>(args: I) -> Result<Vec<String>, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString>,
{
    let mut out: Vec<String> = vec![];
    // The argument now read is the value of the option before it.
    let mut is_value = false;
    for a in args {
        match a.into().into_string() {
            Ok(s) => {
                is_value = !is_value
                    && s.starts_with('-')
                    && takes_value(&format!("-{}", s.trim_start_matches('-')));
                out.push(s);
            }
            Err(bad) => {
                // The option whose value it is, or the option (or stray word) itself.
                let option = match out.last() {
                    Some(prev) if is_value => prev.clone(),
                    _ => bad.to_string_lossy().into_owned(),
                };
                return err(&option, CliErrorKind::NotUtf8);
            }
        }
    }
    Ok(out)
}

/// [`parse_with_fds`] for a process that inherited no descriptor a `-netdev tap,fd=` could
/// name (every `fd=` is refused).
pub fn parse<I, S>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString>,
{
    parse_with_fds(args, &InheritedFds::default())
}

/// Parses and checks the whole command line. `fds`: the descriptors nicvm inherited, which
/// `-netdev tap,fd=N` may name.
pub fn parse_with_fds<I, S>(args: I, fds: &InheritedFds) -> Result<Action, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString>,
{
    let args = utf8_args(args)?;
    let mut b = Builder {
        fds,
        mem_mib: 128,
        cpus: 1,
        topology: Topology::default(),
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
        legacy_dumps: vec![],
        dumps: vec![],
        daemonize: false,
        pidfile: None,
        nodefaults: false,
        q35: false,
        vga: true,
        nographic: false,
        cpu_features: vec![],
        cpu_missing: Default::default(),
        monitor_given: false,
        serial_given: false,
        notes: vec![],
        monitors: vec![],
        chardevs: vec![],
        waiting: vec![],
        mon_later: vec![],
        start_paused: false,
        no_shutdown: false,
        process_name: None,
        incoming: None,
        save_on: None,
        serial_chardev: None,
        stdio_signal: None,
    };
    let mut args = args.into_iter();
    let mut seq = 0usize;
    while let Some(arg) = args.next() {
        seq += 1;
        if !arg.starts_with('-') || arg == "-" {
            return err(&arg, CliErrorKind::Unexpected);
        }
        // QEMU accepts --opt as well as -opt.
        let opt = format!("-{}", arg.trim_start_matches('-'));
        let takes_value = takes_value(&opt);
        let val = if takes_value {
            match args.next() {
                Some(v) => v,
                None => return err(&opt, CliErrorKind::NeedsValue),
            }
        } else {
            String::new()
        };
        if let Some(text) = qemu_compat::option_help(&opt, &val) {
            return Ok(Action::Listing(text));
        }
        // As QEMU: -netdev, -device and -object (below) read JSON; these two do not.
        if ["-chardev", "-nic"].contains(&opt.as_str()) && is_json(&val) {
            return err(
                &opt,
                CliErrorKind::Refused(
                    "the JSON form is taken by -netdev, -device and -object, as in QEMU: \
                     give TYPE,KEY=VALUE,..."
                        .into(),
                ),
            );
        }
        match opt.as_str() {
            "-h" | "-help" => return Ok(Action::Help),
            "-version" => return Ok(Action::Version),
            "-nographic" => b.nographic = true,
            // nicvm reads no configuration file: QEMU's -no-user-config asks for nothing.
            "-no-reboot" | "-no-user-config" => {}
            // As QEMU's: the guest's power-off stops it, held, instead of ending nicvm.
            "-no-shutdown" => b.no_shutdown = true,
            "-action" => {
                let (hold, notes) = qemu_compat::action(&val).or_else(|e| err(&opt, e))?;
                if let Some(hold) = hold {
                    b.no_shutdown = hold;
                }
                for n in notes {
                    b.note(&opt, &n);
                }
            }
            "-S" => b.start_paused = true,
            "-incoming" => match val.strip_prefix("file:") {
                Some(p) if !p.is_empty() && !p.contains(',') => b.incoming = Some(p.into()),
                _ => {
                    return err(
                        &opt,
                        CliErrorKind::Refused(format!(
                            "'{}' is not supported: nicvm restores from file:PATH",
                            one_line(&val)
                        )),
                    )
                }
            },
            "-save-on" => b.save_on = Some(parse_save_on(&val).or_else(|e| err(&opt, e))?),
            "-qmp" | "-monitor" => {
                b.monitor_given = true;
                let mode = if opt == "-qmp" {
                    MonitorMode::Control
                } else {
                    MonitorMode::Readline
                };
                if val == "none" {
                    continue;
                }
                let (endpoint, wait, telnet) = chardev_spec(&val).or_else(|e| err(&opt, e))?;
                if wait {
                    b.waiting.push(endpoint.clone());
                }
                if telnet {
                    b.note(&opt, MONITOR_TELNET_NOTE);
                }
                b.add_monitor(&opt, mode, endpoint, false, telnet)?;
            }
            "-chardev" => {
                let (id, endpoint, wait, telnet) =
                    chardev_option(&val, b.fds).or_else(|e| err(&opt, e))?;
                if wait {
                    b.waiting.push(endpoint.clone());
                }
                if b.chardevs.iter().any(|(i, ..)| *i == id) {
                    return err(&opt, CliErrorKind::DuplicateId(id));
                }
                if let Endpoint::Fd { fd, .. } = endpoint {
                    if b.chardevs
                        .iter()
                        .any(|(_, e, _)| matches!(e, Endpoint::Fd { fd: f, .. } if *f == fd))
                    {
                        return err(&opt, OptionError::FdTwice("fd", fd));
                    }
                }
                if endpoint == Endpoint::Stdio {
                    // signal=on|off (checked by chardev_option): whether Ctrl-C ends nicvm.
                    let kv = KeyVal::parse(&val, Some("backend")).or_else(|e| err(&opt, e))?;
                    if let Some(v) = kv.get("signal") {
                        b.stdio_signal = Some(on_off("signal", v).or_else(|e| err(&opt, e))?);
                    }
                }
                b.chardevs.push((id, endpoint, telnet));
            }
            "-mon" => {
                b.monitor_given = true;
                let mut kv = KeyVal::parse(&val, Some("chardev")).or_else(|e| err(&opt, e))?;
                let chardev = kv.first.take().or_else(|| kv.remove("chardev"));
                let Some(chardev) = chardev else {
                    return err(
                        &opt,
                        OptionError::Needs {
                            key: None,
                            what: "chardev=ID".into(),
                        },
                    );
                };
                let mode = match kv.remove("mode").as_deref() {
                    None | Some("readline") => MonitorMode::Readline,
                    Some("control") => MonitorMode::Control,
                    Some(m) => {
                        return err(
                            &opt,
                            OptionError::NotA {
                                key: "mode".into(),
                                value: m.into(),
                                what: "readline or control",
                            },
                        )
                    }
                };
                let pretty = match kv.remove("pretty") {
                    Some(v) => on_off("pretty", &v).or_else(|e| err(&opt, e))?,
                    None => false,
                };
                if pretty && mode == MonitorMode::Readline {
                    return err(
                        &opt,
                        CliErrorKind::Refused(
                            "'pretty' is not compatible with HMP monitors".into(),
                        ),
                    );
                }
                kv.remove("id");
                if let Some(k) = kv.unknown_key(&[]) {
                    return err(&opt, OptionError::Unknown(k.into()));
                }
                // As QEMU: the -chardev may come later on the line.
                if !b.monitor_on_chardev(&opt, &chardev, mode, pretty)? {
                    b.mon_later.push((opt.clone(), chardev, mode, pretty));
                }
            }
            "-daemonize" => b.daemonize = true,
            "-pidfile" => {
                if val.is_empty() {
                    return err(&opt, CliErrorKind::NeedsValue);
                }
                b.pidfile = Some(val.into());
            }
            "-nodefaults" => {
                b.nodefaults = true;
                b.vga = false;
                b.note(
                    &opt,
                    "no default NIC, and no serial console unless -serial gives one (as QEMU)",
                );
            }
            "-cpu" => {
                let (note, features, missing) =
                    qemu_compat::cpu_option(&val).or_else(|e| err(&opt, e))?;
                b.note(&opt, &note);
                b.cpu_features = features;
                b.cpu_missing = missing;
            }
            "-enable-kvm" | "-display" | "-vga" | "-M" | "-machine" | "-accel" | "-snapshot"
            | "-boot" | "-k" | "-no-hpet" | "-no-acpi" | "-mem-prealloc" | "-uuid" | "-rtc"
            | "-global" | "-sandbox" | "-msg" | "-d" | "-D" | "-overcommit" => {
                let note = qemu_compat::machine_option(&opt, &val).or_else(|e| err(&opt, e))?;
                b.note(&opt, &note);
                match opt.as_str() {
                    // Only -vga none is taken.
                    "-vga" => b.vga = false,
                    "-M" | "-machine" => {
                        if let Some(ty) = KeyVal::parse(&val, Some("type"))
                            .ok()
                            .and_then(|kv| kv.first)
                        {
                            b.q35 = ty == "q35" || ty.starts_with("pc-q35-");
                        }
                    }
                    _ => {}
                }
            }
            "-m" => {
                b.mem_mib = parse_mem(&val, b.mem_mib).or_else(|e| err(&opt, e))?;
                if val.contains("slots=") || val.contains("maxmem=") {
                    b.note(
                        &opt,
                        "slots=/maxmem=: nicvm has no memory hotplug; the guest has the initial \
                         size only, as a QEMU guest has until a DIMM is plugged in",
                    );
                }
            }
            "-smp" => (b.cpus, b.topology) = parse_smp(&val).or_else(|e| err(&opt, e))?,
            "-kernel" => b.kernel = Some(val.into()),
            "-initrd" => b.initrd = Some(val.into()),
            "-append" => b.append = val,
            "-name" if val.is_empty() => b.name = None,
            "-name" => {
                let kv = KeyVal::parse(&val, Some("guest")).or_else(|e| err(&opt, e))?;
                if let Some(k) = kv.unknown_key(&["guest", "process", "debug-threads"]) {
                    return err(&opt, OptionError::Unknown(k.into()));
                }
                if let Some(v) = kv.get("debug-threads") {
                    on_off("debug-threads", v).or_else(|e| err(&opt, e))?;
                }
                // An empty name is none, as QEMU's query-name has it.
                let guest = kv.first.as_deref().or(kv.get("guest"));
                b.name = guest.filter(|g| !g.is_empty()).map(String::from);
                // As QEMU: the process's name (what ps and pgrep show), at most 15 bytes.
                b.process_name = kv.get("process").map(String::from);
            }
            "-serial" => {
                if b.serial_given {
                    // QEMU makes each further -serial COM2, COM3...: nicvm has COM1 only.
                    return err(
                        &opt,
                        CliErrorKind::Refused(
                            "given twice: nicvm has one serial port (COM1); QEMU would make \
                             this one COM2"
                                .into(),
                        ),
                    );
                }
                b.serial_given = true;
                if val == "mon:stdio" {
                    b.add_monitor(&opt, MonitorMode::Readline, Endpoint::Stdio, false, false)?;
                }
                b.serial_chardev = None;
                b.serial = match val.as_str() {
                    "stdio" | "mon:stdio" => SerialTarget::Stdio,
                    "none" | "null" => SerialTarget::None,
                    "pty" => SerialTarget::Pty,
                    v if ["unix:", "tcp:", "telnet:"]
                        .iter()
                        .any(|p| v.starts_with(p)) =>
                    {
                        let (at, wait, telnet) = chardev_spec(v).or_else(|e| err(&opt, e))?;
                        if wait {
                            b.waiting.push(at.clone());
                        }
                        SerialTarget::Socket { at, telnet }
                    }
                    v if v.starts_with("chardev:") => {
                        // Resolved once every -chardev is known.
                        b.serial_chardev = Some(v["chardev:".len()..].to_string());
                        SerialTarget::None
                    }
                    v => match v.strip_prefix("file:") {
                        Some(p) if !p.is_empty() => SerialTarget::File(p.into()),
                        _ => return err(&opt, CliErrorKind::BadSerial(val)),
                    },
                }
            }
            "-netdev" => {
                if !is_json(&val) && qemu_compat::wants_help(&val) {
                    return Ok(Action::Listing(qemu_compat::netdev_types()));
                }
                let kv = b.qemu_opts(&opt, &val, "type")?;
                b.netdevs.push(netdev_config(&opt, kv, b.fds, true)?);
            }
            "-object" => {
                let kv = KeyVal::parse_option(&val, "qom-type").or_else(|e| err(&opt, e))?;
                b.dumps.push(dump_from(&opt, kv)?);
            }
            "-device" => {
                if !is_json(&val) && qemu_compat::wants_help(&val) {
                    let driver = val.split(',').next().unwrap_or("");
                    let driver = driver.strip_prefix("driver=").unwrap_or(driver);
                    if driver == "help" || driver == "?" {
                        return Ok(Action::Listing(qemu_compat::device_list()));
                    }
                    let model = model_from(&opt, driver)?;
                    return Ok(Action::Listing(qemu_compat::device_properties(model)));
                }
                let mut kv = b.qemu_opts(&opt, &val, "driver")?;
                let Some(driver) = kv.first.take() else {
                    return err(&opt, CliErrorKind::NoModel);
                };
                let model = model_from(&opt, &driver)?;
                kv.keep_last_but_first_id();
                b.devices
                    .push((format!("-device {driver}"), model, kv, seq));
            }
            "-nic" => {
                let mut kv = b.qemu_opts(&opt, &val, "type")?;
                if kv.first.as_deref() == Some("none") {
                    b.no_nic = true;
                    continue;
                }
                if kv.get("model").is_some_and(|m| m == "help" || m == "?") {
                    return Ok(Action::Listing(qemu_compat::nic_models()));
                }
                // As in QEMU, a -nic without a type is user-mode networking.
                if kv.first.is_none() {
                    kv.first = Some("user".into());
                }
                let model = nic_model(&opt, &mut kv)?;
                // As QEMU: the last mac= given.
                let mac = kv.take_last("mac");
                let user_id = kv.get("id").is_some();
                if !user_id {
                    kv.pairs
                        .push(("id".into(), format!("__nic{}", b.netdevs.len())));
                }
                let nd = netdev_config(&opt, kv, b.fds, user_id)?;
                let mut dev = KeyVal::default();
                dev.pairs.push(("netdev".into(), nd.id.clone()));
                if let Some(m) = mac {
                    dev.pairs.push(("mac".into(), m));
                }
                b.netdevs.push(nd);
                b.devices.push((opt.clone(), model, dev, seq));
            }
            "-net" => {
                let mut kv = b.qemu_opts(&opt, &val, "type")?;
                match kv.first.as_deref() {
                    Some("none") => b.no_nic = true,
                    Some("nic") => {
                        kv.first = None;
                        if kv.get("model").is_some_and(|m| m == "help" || m == "?") {
                            return Ok(Action::Listing(qemu_compat::nic_models()));
                        }
                        let model = nic_model("-net nic", &mut kv)?;
                        kv.take_last("name");
                        kv.keep_last_but_first_id();
                        // QEMU's -net nic takes these alone (vlan= as QEMU did before 3.0,
                        // name= too), not a device's other properties.
                        let nic_keys = ["netdev", "macaddr", "addr", "vectors", "id", "vlan"];
                        if let Some(k) = kv.unknown_key(&nic_keys) {
                            return err(&opt, OptionError::Unknown(k.into()));
                        }
                        if let Some(m) = kv.remove("macaddr") {
                            kv.pairs.push(("mac".into(), m));
                        }
                        // As QEMU: vectors= is virtio-net's, and ignored on another model.
                        if model != NicModel::VirtioNetPci {
                            kv.remove("vectors");
                        }
                        if kv.get("netdev").is_some() {
                            // As QEMU: a NIC on a -netdev, outside the vlans (hubs).
                            if kv.get("vlan").is_some() {
                                return err(&opt, CliErrorKind::NetdevAndVlan);
                            }
                            b.devices.push(("-net nic".into(), model, kv, seq));
                        } else {
                            let vlan = take_vlan(&opt, &mut kv)?;
                            b.legacy_nics.push((model, kv, vlan, seq));
                        }
                    }
                    Some("dump") => {
                        let vlan = take_vlan(&opt, &mut kv)?;
                        kv.keep_last();
                        b.legacy_dumps.push((kv, vlan));
                    }
                    // An unknown type is said as such, not later as a NIC without a backend.
                    Some(t) if netdev_opts::NetdevType::parse(t).is_none() => {
                        return err(&opt, HeaderError::UnknownType(t.into()));
                    }
                    Some(_) => {
                        let vlan = take_vlan(&opt, &mut kv)?;
                        kv.take_last("name");
                        b.legacy_backends.push((kv, vlan));
                    }
                    None => return err(&opt, CliErrorKind::NoNetType),
                }
            }
            _ => return err(&opt, CliErrorKind::UnknownOption),
        }
    }
    b.finish()
}

impl Builder<'_> {
    fn finish(mut self) -> Result<Action, CliError> {
        // A restored guest does not boot: its kernel is in the snapshot.
        let kernel = match (self.kernel.take(), &self.incoming) {
            (Some(k), _) => k,
            (None, Some(_)) => PathBuf::new(),
            (None, None) => return err("-kernel", CliErrorKind::NoKernel),
        };
        self.legacy_net()?;
        for (i, n) in self.netdevs.iter().enumerate() {
            if self.netdevs[..i].iter().any(|m| m.id == n.id) {
                return err(&n.option, CliErrorKind::DuplicateId(n.id.clone()));
            }
        }
        check_tap_fds(&self.netdevs)?;
        // No network options at all: the classic default, a user-mode network behind an
        // rtl8139, as `kvm` always gave. As in QEMU, a -device NIC without netdev= is no
        // network option: it comes beside the default network, without a peer. (One that
        // names a netdev when there is none is an error below, not a NIC on the default's.)
        let default_network = !self.no_nic
            && !self.nodefaults
            && self.netdevs.is_empty()
            && !self
                .devices
                .iter()
                .any(|(_, _, kv, _)| kv.get("netdev").is_some());
        if default_network {
            self.netdevs.push(NetdevConfig {
                id: "net0".into(),
                option: "-netdev user,id=net0".into(),
                backend: Backend::User(SlirpOptions::default()),
                // As QEMU's default network (-net nic -net user): on hub 0.
                hub: Some(0),
            });
            let mut dev = KeyVal::default();
            dev.pairs.push(("netdev".into(), "net0".into()));
            self.devices.push((
                "default network".into(),
                NicModel::Rtl8139 { cplus: true },
                dev,
                0,
            ));
        }
        // As QEMU: the NICs of -nic, then of -net nic, are made with the machine, the -device
        // ones after it, so they take the first free slots and default MACs in that order
        // (each kind in command-line order).
        self.devices.sort_by_key(|(option, _, _, seq)| {
            let kind = if option.starts_with("-nic") {
                0
            } else if option == "-net nic" {
                1
            } else {
                2
            };
            (kind, *seq)
        });
        let mut nics: Vec<NicConfig> = vec![];
        let mut ids: Vec<String> = vec![];
        // The addresses given with mac=: a NIC without one never gets one of them.
        let given: Vec<MacAddr> = self
            .devices
            .iter()
            .filter_map(|(_, _, kv, _)| kv.get("mac")?.parse().ok())
            .collect();
        let mut options = vec![];
        for (option, model, kv, _) in self.devices.drain(..) {
            let nic = nic_config(&option, model, kv, &self.netdevs, &nics, &given, &mut ids)?;
            nics.push(nic);
            options.push(option);
        }
        let board_slots = crate::config::board_slots(self.q35, self.vga);
        if let Err(i) = crate::config::nic_slots(&nics, board_slots) {
            return err(&options[i], CliErrorKind::NoFreeSlot(i + 1));
        }
        for d in &self.dumps {
            let Some(nd) = self.netdevs.iter().find(|n| n.id == d.netdev) else {
                return err(
                    "-object filter-dump",
                    CliErrorKind::UndefinedNetdev(d.netdev.clone()),
                );
            };
            if nd.backend.queues() > 1 {
                return err(
                    d.option,
                    CliErrorKind::Refused(format!(
                        "its netdev has {} queues: nicvm captures single-queue netdevs only",
                        nd.backend.queues()
                    )),
                );
            }
        }
        // Each against those before it, so that the message names the later one.
        for (i, d) in self.dumps.iter().enumerate() {
            for o in &self.dumps[..i] {
                let kind = if o.id == d.id {
                    CliErrorKind::DuplicateId(d.id.clone())
                } else if o.netdev == d.netdev {
                    CliErrorKind::DuplicateDump {
                        netdev: d.netdev.clone(),
                        first: o.id.clone(),
                        second: d.id.clone(),
                    }
                } else {
                    continue;
                };
                return err(d.option, kind);
            }
        }
        for n in &mut self.netdevs {
            if let Backend::User(o) = &mut n.backend {
                // As libslirp (and so QEMU): a search domain DHCP cannot carry is left out.
                for d in o
                    .dnssearch
                    .iter()
                    .filter(|d| !crate::config::slirp::domain_ok(d))
                {
                    self.notes.push(Note {
                        warning: true,
                        text: format!(
                            "{}: dnssearch: '{}' is not a domain name DHCP can carry (labels \
                             of 1-63 characters between dots, 253 in all); left out",
                            n.option,
                            one_line(&cut(d, 80))
                        ),
                    });
                }
                o.dnssearch.retain(|d| crate::config::slirp::domain_ok(d));
            }
        }
        for n in &self.netdevs {
            if let Backend::Tap(TapOptions { vhost: true, .. })
            | Backend::Bridge(BridgeOptions { vhost: true, .. }) = n.backend
            {
                self.notes.push(Note {
                    warning: true,
                    text: format!(
                        "{}: vhost-net asked for (vhost=on, vhostforce=on, vhostfd= or \
                         vhostfds=): nicvm has none; frames go through its own I/O thread",
                        n.option
                    ),
                });
            }
        }
        if self.daemonize && self.nographic && !self.nodefaults {
            // As QEMU: a daemon has no stdio for -nographic's console and monitor (with
            // -nodefaults there are none to give).
            return err(
                "-daemonize",
                CliErrorKind::Refused(
                    "-nographic cannot be used with -daemonize (as in QEMU; -display none \
                     gives no window either)"
                        .into(),
                ),
            );
        }
        for (opt, id, mode, pretty) in std::mem::take(&mut self.mon_later) {
            if !self.monitor_on_chardev(&opt, &id, mode, pretty)? {
                return err(&opt, CliErrorKind::UndefinedChardev(id));
            }
        }
        let mut serial = std::mem::replace(&mut self.serial, SerialTarget::None);
        if let Some(id) = self.serial_chardev.take() {
            match self.chardevs.iter().find(|(i, ..)| *i == id) {
                Some((_, Endpoint::Stdio, _)) => serial = SerialTarget::Stdio,
                Some((_, e, telnet)) => {
                    serial = SerialTarget::Socket {
                        at: e.clone(),
                        telnet: *telnet,
                    }
                }
                None => return err("-serial", CliErrorKind::UndefinedChardev(id)),
            }
        }
        // QEMU's -nographic: the default monitor is on stdio unless -nodefaults or a monitor
        // option says otherwise. With the default serial port it shares stdio (mon:stdio:
        // Ctrl-a c for the monitor, Ctrl-a x to quit, on a pipe too); a -serial elsewhere
        // leaves stdio to the monitor alone. An explicit `-serial stdio` (which QEMU refuses
        // next to -nographic) keeps stdio the guest's. (A daemon was refused above.)
        let guest_has_stdio = self.serial_given && serial == SerialTarget::Stdio;
        if self.nographic && !self.nodefaults && !guest_has_stdio && !self.monitor_given {
            self.add_monitor(
                "-nographic",
                MonitorMode::Readline,
                Endpoint::Stdio,
                false,
                false,
            )?;
        }
        if let SerialTarget::Socket { at, .. } = &serial {
            if self.monitors.iter().any(|m| m.endpoint == *at) {
                return err(
                    "-serial",
                    CliErrorKind::Refused("a monitor already listens there".into()),
                );
            }
        }
        if self.nodefaults && !self.serial_given {
            serial = SerialTarget::None;
        }
        if self.daemonize && serial == SerialTarget::Stdio {
            if self.serial_given {
                return err(
                    "-daemonize",
                    CliErrorKind::Refused(
                        "the serial console cannot be stdio in the background \
                         (-serial file:PATH or none)"
                            .into(),
                    ),
                );
            }
            // As QEMU's default serial console without a display: nowhere.
            serial = SerialTarget::None;
        }
        if self.daemonize {
            if let Some(m) = self.monitors.iter().find(|m| m.endpoint == Endpoint::Stdio) {
                return err(
                    &m.option,
                    CliErrorKind::Refused(
                        "a monitor cannot be on stdio with -daemonize (as in QEMU); \
                         use unix:PATH,server=on,wait=off"
                            .into(),
                    ),
                );
            }
        }
        // QEMU's stdio chardev lets Ctrl-C through (signal=on) unless it is mon:stdio, as
        // -nographic's default console is, or a -chardev stdio says signal=off.
        let stdio_monitor = self.monitors.iter().any(|m| m.endpoint == Endpoint::Stdio);
        let plain = if stdio_monitor {
            serial != SerialTarget::Stdio
        } else {
            serial == SerialTarget::Stdio && (self.serial_given || self.nographic)
        };
        let stdio_signals = self.stdio_signal.unwrap_or(plain);
        // The sockets nicvm listens on (a -chardev no monitor or serial port uses is not
        // opened), each once, in the order given.
        let mut wait_for: Vec<Endpoint> = vec![];
        for e in self.waiting {
            let used = self.monitors.iter().any(|m| m.endpoint == e)
                || matches!(&serial, SerialTarget::Socket { at, .. } if *at == e);
            if used && !wait_for.contains(&e) {
                wait_for.push(e);
            }
        }
        Ok(Action::Run(Box::new(Config {
            mem_mib: self.mem_mib,
            cpus: self.cpus,
            topology: self.topology,
            cpu_features: self.cpu_features,
            cpu_missing: self.cpu_missing,
            kernel,
            initrd: self.initrd,
            append: self.append,
            serial,
            stdio_signals,
            name: self.name,
            netdevs: self.netdevs,
            nics,
            dumps: self.dumps,
            daemonize: self.daemonize,
            pidfile: self.pidfile,
            notes: self.notes,
            monitors: self.monitors,
            start_paused: self.start_paused,
            no_shutdown: self.no_shutdown,
            process_name: self.process_name,
            incoming: self.incoming,
            save_on: self.save_on,
            board_slots,
            default_network,
            wait_for,
        })))
    }

    /// A `-mon` on the `-chardev` with this `id`; false when there is none (yet).
    fn monitor_on_chardev(
        &mut self,
        option: &str,
        id: &str,
        mode: MonitorMode,
        pretty: bool,
    ) -> Result<bool, CliError> {
        let Some((_, endpoint, telnet)) = self.chardevs.iter().find(|(i, ..)| i == id) else {
            return Ok(false);
        };
        let (endpoint, telnet) = (endpoint.clone(), *telnet);
        if telnet {
            self.note(option, MONITOR_TELNET_NOTE);
        }
        self.add_monitor(option, mode, endpoint, pretty, telnet)?;
        Ok(true)
    }

    fn add_monitor(
        &mut self,
        option: &str,
        mode: MonitorMode,
        endpoint: Endpoint,
        pretty: bool,
        telnet: bool,
    ) -> Result<(), CliError> {
        if mode == MonitorMode::Control && endpoint == Endpoint::Stdio {
            return err(
                option,
                CliErrorKind::Refused(
                    "QMP on stdio is not supported by nicvm (use unix:PATH or tcp:HOST:PORT)"
                        .into(),
                ),
            );
        }
        if self.monitors.iter().any(|m| m.endpoint == endpoint) {
            if endpoint == Endpoint::Stdio {
                // -monitor stdio and -serial mon:stdio: one monitor on the console.
                return Ok(());
            }
            return err(
                option,
                CliErrorKind::Refused("another monitor already listens there".into()),
            );
        }
        self.monitors.push(MonitorConfig {
            mode,
            endpoint,
            pretty,
            telnet,
            option: option.to_string(),
        });
        Ok(())
    }

    /// The value of `-netdev`, `-device`, `-nic` or `-net`, which QEMU reads with its
    /// QemuOpts: short-form booleans are taken (each with QEMU's deprecation warning), and
    /// `-netdev` and `-device` may be JSON.
    fn qemu_opts(&mut self, opt: &str, val: &str, implied: &str) -> Result<KeyVal, CliError> {
        if is_json(val) && (opt == "-netdev" || opt == "-device") {
            return KeyVal::from_json(val, implied).or_else(|e| err(opt, e));
        }
        let (kv, short_forms) =
            KeyVal::parse_flags(val, Some(implied), &qemu_compat::takes_short_form)
                .or_else(|e| err(opt, e))?;
        for (word, long) in short_forms {
            self.notes.push(Note {
                warning: true,
                text: format!(
                    "{opt} {}: short-form boolean option '{word}' deprecated; use {long} \
                     instead (as QEMU says)",
                    one_line(&cut(val, 80))
                ),
            });
        }
        Ok(kv)
    }

    fn note(&mut self, option: &str, text: &str) {
        self.notes.push(Note {
            warning: false,
            text: format!("{option}: {text}"),
        });
    }

    /// Legacy `-net`: per vlan (QEMU's hub), NICs pair with backends in order; a `-net dump`
    /// captures its vlan's backend.
    fn legacy_net(&mut self) -> Result<(), CliError> {
        let mut vlans: Vec<String> = vec![];
        for v in self
            .legacy_nics
            .iter()
            .map(|n| &n.2)
            .chain(self.legacy_backends.iter().map(|b| &b.1))
        {
            if !vlans.contains(v) {
                vlans.push(v.clone());
            }
        }
        let explicit = vlans.len() > 1 || vlans.iter().any(|v| v != "0");
        let mut nics = std::mem::take(&mut self.legacy_nics);
        let mut backends = std::mem::take(&mut self.legacy_backends);
        let mut n = 0;
        // The netdev of each vlan's first backend, which a -net dump of that vlan captures.
        let mut first_on: Vec<(String, String)> = vec![];
        for vlan in &vlans {
            let (vn, rest): (Vec<_>, Vec<_>) = nics.into_iter().partition(|x| &x.2 == vlan);
            nics = rest;
            let (vb, rest): (Vec<_>, Vec<_>) = backends.into_iter().partition(|x| &x.1 == vlan);
            backends = rest;
            if vn.len() != vb.len() {
                return err(
                    "-net",
                    CliErrorKind::NetCount {
                        vlan: if explicit {
                            format!("vlan {vlan}: ")
                        } else {
                            String::new()
                        },
                        nics: vn.len(),
                        backends: vb.len(),
                    },
                );
            }
            for ((model, mut dev, _, seq), (mut backend, _)) in vn.into_iter().zip(vb) {
                // As QEMU: the backend is named by its id= (the first given), else by its
                // hub port, hubNportM (one no -netdev has taken).
                let mut nd = match backend.take_first("id") {
                    Some(id) => {
                        backend.pairs.push(("id".into(), id));
                        netdev_config("-net", backend, self.fds, true)?
                    }
                    None => {
                        let id = (n..)
                            .map(|m| format!("hub{vlan}port{m}"))
                            .find(|id| !self.netdevs.iter().any(|nd| nd.id == *id))
                            .expect("a free hub port name");
                        backend.pairs.push(("id".into(), id));
                        netdev_config("-net", backend, self.fds, false)?
                    }
                };
                n += 1;
                nd.hub = vlan.parse().ok();
                dev.pairs.push(("netdev".into(), nd.id.clone()));
                if !first_on.iter().any(|(v, _)| v == vlan) {
                    first_on.push((vlan.clone(), nd.id.clone()));
                }
                self.netdevs.push(nd);
                self.devices.push(("-net nic".into(), model, dev, seq));
            }
        }
        for (i, (mut kv, vlan)) in std::mem::take(&mut self.legacy_dumps)
            .into_iter()
            .enumerate()
        {
            let Some(netdev) = first_on
                .iter()
                .find(|(v, _)| *v == vlan)
                .map(|(_, id)| id.clone())
            else {
                return err(
                    "-net dump",
                    CliErrorKind::DumpWithoutBackend(format!("vlan {vlan}")),
                );
            };
            let file = kv
                .remove("file")
                .unwrap_or_else(|| format!("qemu-vlan{vlan}.pcap"));
            let maxlen = match kv.remove("len") {
                Some(v) => match v.parse::<u32>() {
                    Ok(n) if n > 0 => n,
                    _ => return err("-net dump", CliErrorKind::BadMaxlen(v)),
                },
                None => net_backends::pcap::DEFAULT_MAXLEN,
            };
            kv.take_last("name");
            if let Some(k) = kv.unknown_key(&[]) {
                return err("-net dump", OptionError::Unknown(k.into()));
            }
            self.dumps.push(DumpConfig {
                option: "-net dump",
                id: format!("dump{i}"),
                netdev,
                file: PathBuf::from(file),
                maxlen,
            });
        }
        Ok(())
    }
}

/// A character device as `-qmp`/`-monitor`/`-serial` take it: `unix:PATH[,server=on]
/// [,wait=off]`, `tcp:[HOST]:PORT[,...]`, `telnet:[HOST]:PORT[,...]`, `stdio`. QEMU's bare
/// `server` and `nowait` are understood. Returns where to listen, whether to wait for a
/// client before the guest starts (`wait=on`, QEMU's default), and whether the socket is to
/// speak telnet.
fn chardev_spec(spec: &str) -> Result<(Endpoint, bool, bool), CliErrorKind> {
    if spec == "stdio" {
        return Ok((Endpoint::Stdio, false, false));
    }
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or("");
    let mut server = false;
    let mut wait = None;
    let mut telnet = false;
    for p in parts {
        match p.split_once('=') {
            None if p == "server" => server = true,
            None if p == "nowait" => wait = Some(false),
            None if p == "nodelay" => {}
            None if p == "telnet" => telnet = true,
            Some(("server", v)) => server = on_off("server", v)?,
            Some(("wait", v)) => wait = Some(on_off("wait", v)?),
            Some(("telnet", v)) => telnet = on_off("telnet", v)?,
            Some(("nodelay" | "ipv4" | "ipv6", _)) => {}
            Some((k, _)) => return Err(OptionError::Unknown(k.into()).into()),
            None => return Err(KeyValError::NeedsValue(p.into()).into()),
        }
    }
    let endpoint = if let Some(path) = head.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(CliErrorKind::BadChardev(spec.into()));
        }
        let path = unix_socket_path(path)?;
        if server {
            Endpoint::Unix(path)
        } else {
            Endpoint::UnixClient(path)
        }
    } else if let Some(hp) = head.strip_prefix("tcp:") {
        let a = tcp_addr(hp)?;
        if server {
            Endpoint::Tcp(a)
        } else {
            Endpoint::TcpClient(a)
        }
    } else if let Some(hp) = head.strip_prefix("telnet:") {
        telnet = true;
        Endpoint::Tcp(tcp_addr(hp)?)
    } else {
        return Err(CliErrorKind::BadChardev(spec.into()));
    };
    if telnet && !server {
        return Err(telnet_client());
    }
    if wait.is_some() && !server {
        return Err(wait_client());
    }
    Ok((endpoint, wait.unwrap_or(true) && server, telnet))
}

/// `wait=` without `server=on`, in QEMU's words.
fn wait_client() -> CliErrorKind {
    CliErrorKind::Refused("'wait' option is incompatible with socket in client connect mode".into())
}

/// `telnet` without `server=on`: nicvm speaks telnet as a server only.
fn telnet_client() -> CliErrorKind {
    CliErrorKind::Refused("telnet needs server=on (nicvm speaks telnet as a server only)".into())
}

/// What `telnet` is on a monitor: the serial port negotiates (see `serial_io.rs`); a
/// monitor reads lines, which a telnet client sends in its line mode, with its own echo: it
/// only takes the client's telnet commands out of its input.
const MONITOR_TELNET_NOTE: &str =
    "telnet: a monitor does not negotiate (a telnet client keeps its line mode and local \
     echo); the client's telnet commands are taken out of its input";

/// A path a Unix socket can be bound at: the kernel's `sun_path` holds 107 bytes and a NUL
/// (a longer one would be cut, and the socket found under another name).
fn unix_socket_path(path: &str) -> Result<PathBuf, CliErrorKind> {
    const SUN_PATH_MAX: usize = 107;
    if path.len() > SUN_PATH_MAX {
        return Err(CliErrorKind::Refused(format!(
            "the socket path is {} bytes; a Unix socket's path holds at most {SUN_PATH_MAX}",
            path.len()
        )));
    }
    Ok(path.into())
}

fn tcp_addr(hp: &str) -> Result<std::net::SocketAddr, CliErrorKind> {
    use std::net::ToSocketAddrs;
    let (host, port) = hp
        .rsplit_once(':')
        .ok_or_else(|| CliErrorKind::BadChardev(format!("tcp:{hp}")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let port: u16 = port.parse().map_err(|_| CliErrorKind::NotANumber {
        key: "port",
        value: port.into(),
    })?;
    match (host, port).to_socket_addrs() {
        Ok(mut a) => a
            .next()
            .ok_or_else(|| CliErrorKind::Refused(format!("'{host}' has no address"))),
        Err(e) => Err(CliErrorKind::Refused(format!(
            "cannot resolve '{}': {e}",
            one_line(host)
        ))),
    }
}

/// `-chardev socket,id=ID,path=PATH|host=H,port=P,server=on,wait=off` or `-chardev stdio,id=ID`.
fn chardev_option(
    val: &str,
    fds: &InheritedFds,
) -> Result<(String, Endpoint, bool, bool), CliErrorKind> {
    // QEMU's bare `server` and `nowait` words.
    let fixed: Vec<String> = val
        .split(',')
        .map(|p| match p {
            "server" => "server=on".to_string(),
            "nowait" => "wait=off".to_string(),
            p => p.to_string(),
        })
        .collect();
    let mut kv = KeyVal::parse(&fixed.join(","), Some("backend"))?;
    let Some(id) = kv.remove("id") else {
        return Err(OptionError::Needs {
            key: None,
            what: "id=".into(),
        }
        .into());
    };
    match kv.first.as_deref() {
        Some("stdio") => {
            if let Some(v) = kv.remove("signal") {
                on_off("signal", &v)?;
            }
            kv.remove("mux");
            if let Some(k) = kv.unknown_key(&[]) {
                return Err(OptionError::Unknown(k.into()).into());
            }
            Ok((id, Endpoint::Stdio, false, false))
        }
        Some("socket") => {
            if let Some(k) = kv.unknown_key(&[
                "path", "host", "port", "fd", "server", "wait", "nodelay", "ipv4", "ipv6", "telnet",
            ]) {
                return Err(OptionError::Unknown(k.into()).into());
            }
            let server = kv.get("server").map(|v| on_off("server", v)).transpose()?;
            let wait = kv.get("wait").map(|v| on_off("wait", v)).transpose()?;
            let telnet = kv.get("telnet").map(|v| on_off("telnet", v)).transpose()?;
            let server = server.unwrap_or(false);
            let endpoint = match (kv.get("path"), kv.get("port"), kv.get("fd")) {
                (Some(p), None, None) if !p.is_empty() => {
                    let p = unix_socket_path(p)?;
                    if server {
                        Endpoint::Unix(p)
                    } else {
                        Endpoint::UnixClient(p)
                    }
                }
                (None, Some(port), None) => {
                    let a = tcp_addr(&format!("{}:{port}", kv.get("host").unwrap_or("")))?;
                    if server {
                        Endpoint::Tcp(a)
                    } else {
                        Endpoint::TcpClient(a)
                    }
                }
                (None, None, Some(v)) => {
                    let fd = crate::config::netdev::inherited_fds("fd", v, fds)?[0];
                    Endpoint::Fd {
                        fd,
                        listening: server,
                    }
                }
                _ => {
                    return Err(OptionError::Needs {
                        key: None,
                        what: "path=, port= or fd= (one of them)".into(),
                    }
                    .into())
                }
            };
            let telnet = telnet == Some(true);
            if telnet && !server {
                return Err(telnet_client());
            }
            if wait.is_some() && !server {
                return Err(wait_client());
            }
            Ok((id, endpoint, wait.unwrap_or(true) && server, telnet))
        }
        Some(b) => Err(CliErrorKind::Refused(format!(
            "backend '{b}' is not supported: nicvm's -chardev is socket or stdio (for a \
             monitor or -serial chardev:ID); -serial takes file:PATH, pty and none itself"
        ))),
        None => Err(CliErrorKind::NoModel),
    }
}

/// `model=` of a `-nic` or `-net nic` (rtl8139 when not given); the last one when given
/// more than once, as QEMU takes it.
fn nic_model(option: &str, kv: &mut KeyVal) -> Result<NicModel, CliError> {
    match kv.take_last("model") {
        Some(m) => model_from(option, &m),
        None => Ok(NicModel::Rtl8139 { cplus: true }),
    }
}

/// A `tap,fd=N` (or `fds=`) descriptor belongs to one netdev: the second to name it is
/// refused.
fn check_tap_fds(netdevs: &[NetdevConfig]) -> Result<(), CliError> {
    let mut owners: Vec<(RawFd, &str)> = vec![];
    for n in netdevs {
        let Backend::Tap(TapOptions {
            device: TapDevice::Fds { fds, .. },
            ..
        }) = &n.backend
        else {
            continue;
        };
        for fd in fds {
            if let Some((_, by)) = owners.iter().find(|(f, _)| f == fd) {
                return err(
                    &n.option,
                    OptionError::FdTaken {
                        fd: *fd,
                        by: by.to_string(),
                    },
                );
            }
            owners.push((*fd, &n.option));
        }
    }
    Ok(())
}

/// One NIC's properties, checked against the netdevs and the NICs before it.
fn nic_config(
    option: &str,
    model: NicModel,
    mut kv: KeyVal,
    netdevs: &[NetdevConfig],
    earlier: &[NicConfig],
    given: &[MacAddr],
    ids: &mut Vec<String>,
) -> Result<NicConfig, CliError> {
    // None: a NIC without a peer, as QEMU makes for a -device given no netdev=.
    let netdev = kv.remove("netdev");
    if let Some(netdev) = &netdev {
        if !netdevs.iter().any(|n| &n.id == netdev) {
            return err(option, CliErrorKind::UndefinedNetdev(netdev.clone()));
        }
        if earlier.iter().any(|n| n.is_on(netdev)) {
            return err(option, CliErrorKind::NetdevInUse(netdev.clone()));
        }
    }
    let asked = match kv.remove("mac") {
        Some(m) => Some(m.parse::<MacAddr>().or_else(|e| err(option, e))?),
        None => None,
    };
    let mac = match asked {
        // As QEMU, 00:00:00:00:00:00 is "not set" (a NIC cannot be reached at it).
        Some(m) if m != MacAddr::default() => m,
        // As QEMU: the first of 52:54:00:12:34:56, :57, ... that no NIC has (QEMU looks only
        // at the NICs before; every mac= given is known here).
        _ => (0..=u8::MAX)
            .map(MacAddr::nth_default)
            .find(|m| !given.contains(m) && !earlier.iter().any(|n| n.mac == *m))
            .unwrap_or(MacAddr::nth_default(earlier.len() as u8)),
    };
    if mac.is_multicast() {
        return err(option, CliErrorKind::MulticastMac(mac));
    }
    let slot = match kv.remove("addr") {
        Some(a) => Some(parse_slot(&a).or_else(|e| err(option, e))?),
        None => None,
    };
    if let Some(s) = slot {
        if earlier.iter().any(|n| n.slot == Some(s)) {
            return err(option, CliErrorKind::SlotTaken(s));
        }
    }
    let model = match (model, kv.remove("cplus")) {
        (NicModel::Rtl8139 { .. }, Some(v)) => NicModel::Rtl8139 {
            cplus: on_off("cplus", &v).or_else(|e| err(option, e))?,
        },
        (_, Some(_)) => return err(option, CliErrorKind::CplusNotRtl8139),
        (m, None) => m,
    };
    let virtio =
        qemu_compat::device_properties_accepted(model, &mut kv).or_else(|e| err(option, e))?;
    let queues = netdevs
        .iter()
        .find(|n| netdev.as_ref() == Some(&n.id))
        .map_or(1, |n| n.backend.queues());
    if queues > 1 && model != NicModel::VirtioNetPci {
        return err(
            option,
            CliErrorKind::Refused(format!(
                "its netdev has {queues} queues (queues={queues}): only virtio-net-pci has more \
                 than one"
            )),
        );
    }
    let id = kv.remove("id");
    if let Some(id) = &id {
        if !is_id(id) {
            return err(option, not_an_id(id.clone()));
        }
        if ids.contains(id) {
            return err(option, CliErrorKind::DuplicateId(id.clone()));
        }
        ids.push(id.clone());
    }
    if let Some((k, _)) = kv.pairs.first() {
        return err(option, CliErrorKind::UnknownProperty(k.clone()));
    }
    Ok(NicConfig {
        from_device: option.starts_with("-device"),
        model,
        netdev,
        mac,
        id,
        slot,
        mrg_rxbuf: virtio.mrg_rxbuf,
        mq: virtio.mq,
        ctrl_vq: virtio.ctrl_vq,
        vectors: virtio.vectors,
        withheld: virtio.withheld,
        mtu: virtio.mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> Result<Config, CliError> {
        run_with(s, &InheritedFds::default())
    }

    fn run_with(s: &str, fds: &InheritedFds) -> Result<Config, CliError> {
        match parse_with_fds(s.split_whitespace().map(String::from), fds)? {
            Action::Run(c) => Ok(*c),
            a => panic!("{a:?}"),
        }
    }

    fn hostfwd(n: &NetdevConfig) -> Vec<net_backends::slirp::HostFwd> {
        match &n.backend {
            Backend::User(o) => o.hostfwd.clone(),
            b => panic!("{b:?}"),
        }
    }

    fn option_of(s: &str) -> String {
        run(s).unwrap_err().option
    }

    #[test]
    fn snapshot_options() {
        let c = run("-incoming file:/tmp/g.snap -nic user,model=e1000").unwrap();
        assert_eq!(c.incoming, Some(PathBuf::from("/tmp/g.snap")));
        // No -kernel needed to restore: the kernel is in the snapshot.
        assert_eq!(c.kernel, PathBuf::new());
        assert_eq!(option_of("-m 64"), "-kernel");
        let c = run("-kernel k -save-on console=NICVM-DHCP,,x,file=/tmp/s").unwrap();
        assert_eq!(
            c.save_on,
            Some(SaveOn {
                console: "NICVM-DHCP,x".into(),
                file: "/tmp/s".into()
            })
        );
        for bad in [
            "-incoming tcp:0:4444",
            "-incoming defer",
            "-incoming file:",
            "-incoming file:/x,offset=4",
        ] {
            assert_eq!(option_of(&format!("-kernel k {bad}")), "-incoming", "{bad}");
        }
        for bad in [
            "-save-on console=x",
            "-save-on file=/x",
            "-save-on console=,file=/x",
            "-save-on console=x,file=/x,when=now",
            "-save-on x",
        ] {
            assert_eq!(option_of(&format!("-kernel k {bad}")), "-save-on", "{bad}");
        }
    }

    #[test]
    fn errors_are_one_line_whatever_was_typed() {
        let e = parse(["-name", "a", "-bo\ngus"]).unwrap_err();
        assert_eq!(e.to_string(), "-bo\\ngus: unknown option (see nicvm -h)");
        use std::os::unix::ffi::OsStringExt;
        let bad = std::ffi::OsString::from_vec(vec![b'x', 0xff, b'\n']);
        let e = parse([std::ffi::OsString::from("-name"), bad.clone()]).unwrap_err();
        assert_eq!(e.option, "-name");
        assert!(!e.to_string().contains('\n'));
        // After an option without a value, the bad argument is named itself (a review found
        // -enable-kvm blamed).
        let e = parse([std::ffi::OsString::from("-enable-kvm"), bad]).unwrap_err();
        assert_eq!(e.option, "x\u{fffd}\n");
        assert!(!e.to_string().contains('\n'), "{e}");
        // A value that reads like an option (d of -boot d, -m of -append -m) is a value.
        for before in [&["-boot", "d"][..], &["-append", "-m"], &["-name", "x"]] {
            let mut a: Vec<std::ffi::OsString> = before.iter().map(|s| s.into()).collect();
            a.push(std::ffi::OsString::from_vec(vec![b'y', 0xff]));
            assert_eq!(
                parse(a).unwrap_err().option,
                "y\u{fffd}",
                "after {before:?}"
            );
        }
        let bad_opt = std::ffi::OsString::from_vec(vec![b'-', 0xff]);
        let e = parse([std::ffi::OsString::from("-S"), bad_opt]).unwrap_err();
        assert_eq!(e.option, "-\u{fffd}");
        assert_eq!(e.to_string(), "-\u{fffd}: an argument is not valid UTF-8");
    }

    #[test]
    fn machine_options() {
        let c = run(
            "-m 1G -smp 2 -kernel k -initrd i -append quiet -nographic -no-reboot -serial none \
             -no-user-config",
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
        assert_eq!(run("-m 134217728B -kernel k").unwrap().mem_mib, 128);
        assert_eq!(run("-smp cpus=3 -kernel k").unwrap().cpus, 3);
        // -nographic has no stdio to give a daemon.
        let e = run("-kernel k -nographic -daemonize -serial none").unwrap_err();
        assert_eq!(e.option, "-daemonize");
        assert!(e
            .to_string()
            .contains("-nographic cannot be used with -daemonize"));
        assert!(run("-kernel k -nographic -daemonize -nodefaults").is_ok());
        // -cpu: the switches and what a feature not there comes to (the last -cpu wins).
        let c = run("-cpu host,-avx -cpu max,-pcid,+x2apic,enforce -kernel k").unwrap();
        assert_eq!(c.cpu_features, [("pcid", false), ("x2apic", true)]);
        assert_eq!(c.cpu_missing, crate::cpuid::Missing::Refuse);
        assert_eq!(
            run("-kernel k").unwrap().cpu_missing,
            crate::cpuid::Missing::Warn
        );
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
        assert!(matches!(parse(["-h".to_string()]).unwrap(), Action::Help));
        assert!(matches!(
            parse(["--version".to_string()]).unwrap(),
            Action::Version
        ));
    }

    #[test]
    fn bad_machine_options_name_the_option() {
        assert_eq!(option_of("-m 0 -kernel k"), "-m");
        assert_eq!(option_of("-m lots -kernel k"), "-m");
        let e = run("-m 99999999999999999999 -kernel k")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "-m: '99999999999999999999' is more guest RAM than an x86-64 guest can address"
        );
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
        assert_eq!(c.netdevs[0].backend.kind(), "user");
        assert_eq!(hostfwd(&c.netdevs[0]), ["tcp::2222-:22".parse().unwrap()]);
        assert_eq!(c.netdevs[1].option, "-netdev tap,id=n1");
        let Backend::Tap(t) = &c.netdevs[1].backend else {
            panic!()
        };
        assert_eq!(t.device, TapDevice::Ifname(Some("tap0".into())));
        assert_eq!(c.nics[0].model, NicModel::E1000);
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:aa:bb:cc");
        assert_eq!(c.nics[0].slot, Some(5));
        assert_eq!(c.nics[1].model, NicModel::VirtioNetPci);
        assert_eq!(
            c.nics[1].mac.to_string(),
            "52:54:00:12:34:56",
            "the first free default address, as QEMU (the first NIC's is its own)"
        );
        assert!(c.nics.iter().all(|n| n.from_device));
        let c = run("-kernel k -netdev user,id=n1 -device e1000,netdev=n1 -nic user").unwrap();
        let from: Vec<bool> = c.nics.iter().map(|n| n.from_device).collect();
        assert_eq!(from, [false, true], "-nic made first, with the board");
    }

    /// `addr=` as QEMU writes a devfn: a hex slot, maybe `0x`, maybe with its function; any
    /// function but 0 is refused, saying why.
    #[test]
    fn addr_is_a_slot_with_function_0() {
        for (addr, slot) in [
            ("5", 5),
            ("0x5", 5),
            ("05.0", 5),
            ("0x1f.0x0", 31),
            ("a", 10),
        ] {
            let line = format!("-kernel k -netdev user,id=n -device e1000,netdev=n,addr={addr}");
            assert_eq!(run(&line).unwrap().nics[0].slot, Some(slot), "{addr}");
        }
        for (addr, says) in [
            ("3.1", "function 1: nicvm's NICs are single-function"),
            ("0x3.0x7", "function 7"),
            ("3.8", "is not a PCI slot"),
            ("0", "is not a PCI slot"),
            ("20", "is not a PCI slot"),
            ("+3", "is not a PCI slot"),
            ("3.", "is not a PCI slot"),
            ("0x", "is not a PCI slot"),
        ] {
            let line = format!("-kernel k -netdev user,id=n -device e1000,netdev=n,addr={addr}");
            let e = run(&line).unwrap_err().to_string();
            assert!(
                e.starts_with("-device e1000: addr:") && e.contains(says),
                "{addr}: {e}"
            );
        }
    }

    /// A NIC without `addr=` takes the first slot the board leaves free; when none is left (or only the
    /// pvpanic's), the NIC that finds none is named, before anything is opened.
    #[test]
    fn pci_slots_run_out_naming_the_nic_that_finds_none() {
        let nics = |n: usize, extra: &str| {
            let mut line = String::from("-kernel k");
            for i in 0..n {
                line += &format!(" -netdev user,id=n{i} -device e1000,netdev=n{i},id=d{i}");
            }
            line + extra
        };
        let c = run(&nics(29, "")).unwrap();
        assert_eq!(
            crate::config::nic_slots(&c.nics, c.board_slots).unwrap(),
            (3..32).collect::<Vec<u8>>()
        );
        let e = run(&nics(30, "")).unwrap_err().to_string();
        assert!(
            e.starts_with("-device e1000: no free PCI slot for NIC 30 "),
            "{e}"
        );
        // Slots 1 and 2 only by addr=; one of the 31 stays for the pvpanic.
        let two = " -netdev user,id=a -device e1000,netdev=a,addr=1 \
                   -netdev user,id=b -device e1000,netdev=b,addr=2";
        let e = run(&nics(29, two)).unwrap_err().to_string();
        assert!(
            e.starts_with("-device e1000: no free PCI slot for NIC 31 "),
            "{e}"
        );
        let one = " -netdev user,id=a -device e1000,netdev=a,addr=2";
        let c = run(&nics(29, one)).unwrap();
        let slots = crate::config::nic_slots(&c.nics, c.board_slots).unwrap();
        assert_eq!(slots[..29], (3..32).collect::<Vec<u8>>());
        assert_eq!(slots[29], 2);
        // Where QEMU's board would put them: after its VGA card's slot, in it without one,
        // and on q35 never in the ICH9's 1f.
        for (board, first) in [
            ("-nodefaults", 2),
            ("-vga none", 2),
            ("-M pc-i440fx-7.2 -vga none", 2),
            ("-M q35", 2),
            ("-machine type=pc-q35-8.2,accel=kvm", 2),
            ("-M q35 -vga none", 1),
            ("-M q35 -nodefaults", 1),
            ("-M q35 -M pc", 3),
        ] {
            let c = run(&format!("{} {board}", nics(3, ""))).unwrap();
            let slots = crate::config::nic_slots(&c.nics, c.board_slots).unwrap();
            assert_eq!(slots, [first, first + 1, first + 2], "{board}");
        }
        let c = run(&format!("{} -M q35", nics(29, ""))).unwrap();
        let slots = crate::config::nic_slots(&c.nics, c.board_slots).unwrap();
        assert_eq!(
            slots,
            (2..31).collect::<Vec<u8>>(),
            "q35 leaves 1f to the ICH9"
        );
        let e = run(&format!("{} -M q35", nics(30, ""))).unwrap_err();
        assert!(
            e.to_string().contains("no free PCI slot for NIC 30 "),
            "{e}"
        );
        let c = run(&format!("{} -M q35 -nodefaults", nics(30, ""))).unwrap();
        let slots = crate::config::nic_slots(&c.nics, c.board_slots).unwrap();
        assert_eq!(slots, (1..31).collect::<Vec<u8>>());
        // An addr= further on is kept free by the NICs before it.
        let c = run("-kernel k -nic user -netdev user,id=a -device e1000,netdev=a,addr=3").unwrap();
        assert_eq!(
            crate::config::nic_slots(&c.nics, c.board_slots).unwrap(),
            [4, 3]
        );
    }

    #[test]
    fn short_forms() {
        let c =
            run("-kernel k -nic user,model=virtio-net-pci,mac=52:54:00:00:00:01,hostfwd=tcp::1-:2")
                .unwrap();
        assert_eq!(c.netdevs[0].backend.kind(), "user");
        assert_eq!(hostfwd(&c.netdevs[0]), ["tcp::1-:2".parse().unwrap()]);
        assert_eq!(c.nics[0].model, NicModel::VirtioNetPci);
        assert_eq!(c.nics[0].netdev.as_ref(), Some(&c.netdevs[0].id));
        let c = run("-kernel k -net nic,model=e1000,macaddr=52:54:00:00:00:02 -net user").unwrap();
        assert_eq!(c.nics[0].model, NicModel::E1000);
        assert_eq!(c.netdevs[0].backend.kind(), "user");
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:00:00:02");
        assert!(run("-kernel k -nic none").unwrap().nics.is_empty());
        assert!(run("-kernel k -net none").unwrap().nics.is_empty());
    }

    #[test]
    fn an_all_zero_mac_is_a_default_one() {
        let c = run("-kernel k -nic user,model=e1000,mac=00:00:00:00:00:00 -nic user").unwrap();
        let macs: Vec<String> = c.nics.iter().map(|n| n.mac.to_string()).collect();
        assert_eq!(macs, ["52:54:00:12:34:56", "52:54:00:12:34:57"]);
    }

    /// The hub each backend is on, as `info usernet` names it: a `-net` backend's vlan, the
    /// default network's 0 (QEMU's is -net nic -net user), none for -netdev and -nic.
    #[test]
    fn backends_on_hubs() {
        let hubs = |line: &str| -> Vec<Option<u32>> {
            run(line).unwrap().netdevs.iter().map(|n| n.hub).collect()
        };
        assert_eq!(hubs("-kernel k"), [Some(0)]);
        assert_eq!(hubs("-kernel k -net nic -net user"), [Some(0)]);
        assert_eq!(
            hubs("-kernel k -net nic,vlan=2 -net user,vlan=02"),
            [Some(2)]
        );
        assert_eq!(
            hubs("-kernel k -nic user -netdev user,id=a -device e1000,netdev=a"),
            [None, None]
        );
    }

    /// `-name`: an empty guest name is none (QEMU's query-name says nothing); process= is
    /// kept for the process's name.
    #[test]
    fn name_and_process_name() {
        let c = run("-kernel k -name guest=,process=myvm").unwrap();
        assert_eq!((c.name, c.process_name.as_deref()), (None, Some("myvm")));
        let args = ["-kernel", "k", "-name", "vm1", "-name", ""].map(String::from);
        let Action::Run(c) = parse_with_fds(args, &InheritedFds::default()).unwrap() else {
            panic!("not a run")
        };
        assert_eq!(c.name, None, "an empty -name is none too");
        let c = run("-kernel k -name vm1,debug-threads=on").unwrap();
        assert_eq!((c.name.as_deref(), c.process_name), (Some("vm1"), None));
    }

    /// `-no-shutdown` and `-action shutdown=pause` hold a guest that shuts down; the last
    /// word stands; what nicvm cannot do is refused or noted, naming the option.
    #[test]
    fn no_shutdown_and_action() {
        assert!(!run("-kernel k").unwrap().no_shutdown);
        assert!(run("-kernel k -no-shutdown").unwrap().no_shutdown);
        assert!(
            run("-kernel k -action shutdown=pause,panic=shutdown")
                .unwrap()
                .no_shutdown
        );
        assert!(
            !run("-kernel k -no-shutdown -action shutdown=poweroff")
                .unwrap()
                .no_shutdown
        );
        let args = ["-kernel", "k", "-no-shutdown", "-action", ""].map(String::from);
        let Action::Run(c) = parse_with_fds(args, &InheritedFds::default()).unwrap() else {
            panic!("not a run")
        };
        assert!(c.no_shutdown, "-action '' asks nothing, as in QEMU");
        let c = run("-kernel k -action reboot=reset,watchdog=none").unwrap();
        assert!(!c.no_shutdown);
        let noted: Vec<&str> = c.notes.iter().map(|n| n.text.as_str()).collect();
        assert!(
            noted
                .iter()
                .any(|n| n.starts_with("-action: reboot=reset: nicvm never reboots")),
            "{noted:?}"
        );
        for (bad, says) in [
            (
                "-action shutdown=halt",
                "-action: shutdown: 'halt' is not one of QEMU's actions",
            ),
            (
                "-action panic=pause",
                "-action: panic=pause: a guest panic ends nicvm",
            ),
            ("-action colour=red", "-action: unknown parameter 'colour'"),
        ] {
            let e = run(&format!("-kernel k {bad}")).unwrap_err().to_string();
            assert!(e.starts_with(says), "{bad}: {e}");
        }
    }

    /// Booleans take QEMU's words for them, `y` and `n` too (QEMU 7.2 takes
    /// `restrict=y`); anything else is refused naming the key.
    #[test]
    fn booleans_take_qemus_words() {
        for (words, restrict, ipv6) in [
            ("restrict=y,ipv6=n", true, false),
            ("restrict=yes,ipv6=true", true, true),
        ] {
            let c = run(&format!("-kernel k -nic user,{words}")).unwrap();
            let Backend::User(o) = &c.netdevs[0].backend else {
                panic!("a user netdev")
            };
            assert_eq!((o.restrict, o.ipv6), (restrict, ipv6), "{words}");
        }
        let e = run("-kernel k -nic user,restrict=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("restrict: '1' is not on or off"), "{e}");
    }

    #[test]
    fn a_search_domain_dhcp_cannot_carry_is_left_out_with_a_warning() {
        let c = run("-kernel k -nic user,dnssearch=a..b,dnssearch=example.org,dnssearch=").unwrap();
        let Backend::User(o) = &c.netdevs[0].backend else {
            panic!("a user netdev")
        };
        assert_eq!(o.dnssearch, ["example.org"]);
        let warned: Vec<&str> = c
            .notes
            .iter()
            .filter(|n| n.warning && n.text.contains("dnssearch"))
            .map(|n| n.text.as_str())
            .collect();
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert!(
            warned[0].starts_with("-nic user: dnssearch: 'a..b' is not"),
            "{warned:?}"
        );
    }

    /// As in QEMU, `none` only takes the default network away: the NICs asked for beside it
    /// are made (older libvirt wrote `-net none` before its `-netdev`/`-device` pairs).
    #[test]
    fn none_leaves_the_nics_asked_for_beside_it() {
        for line in [
            "-kernel k -net none -netdev user,id=n0 -device e1000,netdev=n0",
            "-kernel k -netdev user,id=n0 -device e1000,netdev=n0 -nic none",
            "-kernel k -nic none -nic user,model=e1000",
            "-kernel k -net none -net nic,model=e1000 -net user",
        ] {
            let c = run(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(c.nics.len(), 1, "{line}");
            assert_eq!(c.nics[0].model, NicModel::E1000, "{line}");
            assert_eq!(c.netdevs.len(), 1, "{line}");
        }
    }

    #[test]
    fn default_network_is_user_behind_rtl8139() {
        let c = run("-kernel k").unwrap();
        assert_eq!(c.netdevs.len(), 1);
        assert_eq!(
            (c.netdevs[0].backend.kind(), c.netdevs[0].id.as_str()),
            ("user", "net0")
        );
        assert_eq!(c.nics.len(), 1);
        assert_eq!(c.nics[0].model, NicModel::Rtl8139 { cplus: true });
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:12:34:56");
        assert!(run("-kernel k -nic none").unwrap().netdevs.is_empty());
        // Any network option replaces the default.
        let c = run("-kernel k -netdev user,id=u").unwrap();
        assert!(c.nics.is_empty());
        assert_eq!(c.netdevs_without_peer().count(), 1);
    }

    /// As QEMU: a -device NIC given no netdev= has no peer, and comes beside the default
    /// network (it is no network option); QEMU warns of it unless that network is in use.
    #[test]
    fn a_device_without_netdev_is_a_nic_without_a_peer() {
        let c = run("-kernel k -device e1000").unwrap();
        let nics: Vec<_> = c
            .nics
            .iter()
            .map(|n| (n.model, n.netdev.as_deref()))
            .collect();
        assert_eq!(
            nics,
            [
                (NicModel::Rtl8139 { cplus: true }, Some("net0")),
                (NicModel::E1000, None)
            ]
        );
        assert_eq!(c.nics[1].mac.to_string(), "52:54:00:12:34:57");
        assert!(
            c.no_peer_warnings().is_empty(),
            "{:?}",
            c.no_peer_warnings()
        );

        let peerless = |args: &str| {
            let c = run(&format!("-kernel k {args}")).unwrap();
            let texts = c.no_peer_warnings();
            let none: Vec<usize> = (0..c.nics.len())
                .filter(|&i| c.nics[i].netdev.is_none())
                .collect();
            (none, texts)
        };
        assert_eq!(
            peerless("-nic none -device e1000"),
            (vec![0], vec!["nic e1000.0 has no peer".to_string()])
        );
        assert_eq!(
            peerless("-nodefaults -device virtio-net-pci,id=v -device rtl8139"),
            (
                vec![0, 1],
                vec![
                    "nic v has no peer".to_string(),
                    "nic rtl8139.0 has no peer".to_string()
                ]
            )
        );
        assert_eq!(
            peerless("-netdev user,id=a -device e1000,netdev=a -device e1000"),
            (vec![1], vec!["nic e1000.1 has no peer".to_string()])
        );
        // As QEMU's order: the netdevs first.
        assert_eq!(
            peerless("-netdev user,id=a -device e1000"),
            (
                vec![0],
                vec![
                    "netdev a has no peer".to_string(),
                    "nic e1000.0 has no peer".to_string()
                ]
            )
        );
        // A netdev= with no -netdev at all names what is missing (the default network's
        // is not there to take).
        let e = run("-kernel k -device e1000,netdev=net0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("netdev 'net0' is not defined"), "{e}");
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
        // As QEMU: each property's last value, integers as qdev reads them, and the netfilter
        // properties `info network` shows, at the values a capture has.
        let c = run(
            "-kernel k -object filter-dump,id=f,netdev=net0,file=a,file=b,maxlen=0x100,\
                     maxlen=0x200,status=on,position=tail,insert=behind",
        )
        .unwrap();
        assert_eq!(
            (c.dumps[0].file.to_str(), c.dumps[0].maxlen),
            (Some("b"), 512)
        );
        for bad in [
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,status=off",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,position=head",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,maxlen=4294967296",
            "-kernel k -object filter-dump,id=f,netdev=nope,file=x",
            "-kernel k -object filter-dump,id=f,netdev=net0",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,maxlen=0",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,queue=rx",
            "-kernel k -object filter-dump,id=f,netdev=net0,file=x,bogus=1",
            "-kernel k -object memory-backend-ram,id=m",
        ] {
            assert!(option_of(bad).starts_with("-object"), "{bad}");
        }
        // The later of two that clash is named, with what clashes (a review found the first
        // one's id quoted for a netdev captured twice).
        let two = "-kernel k -netdev user,id=n0 -device e1000,netdev=n0 \
                   -object filter-dump,id=f0,netdev=n0,file=a -object filter-dump";
        let e = run(&format!("{two},id=f1,netdev=n0,file=b")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "-object filter-dump: netdev 'n0' is captured twice ('f0' and 'f1'): one capture \
             per netdev"
        );
        let e = run(&format!(
            "{two},id=f0,netdev=net9,file=b -netdev user,id=net9"
        ))
        .unwrap_err();
        assert_eq!(e.to_string(), "-object filter-dump: duplicate id 'f0'");
    }

    #[test]
    fn nic_properties() {
        let c = run("-kernel k -netdev user,id=u -device rtl8139,netdev=u,cplus=off").unwrap();
        assert_eq!(c.nics[0].model, NicModel::Rtl8139 { cplus: false });
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
            "-netdev tap,id=a"
        );
        assert_eq!(
            option_of("-kernel k -nic user,id=a -nic user,id=a"),
            "-nic user,id=a",
            "the second one is named"
        );
        let e = run("-kernel k -nic user -netdev user,id=__nic0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "-netdev: id: '__nic0' is not an id (a letter, then letters, digits, '-', '.' or '_')"
        );
        // One rule and one message for every netdev id, JSON or not.
        for bad in [
            "-netdev user,id=a/b",
            "-netdev user,id=",
            "-netdev stream,id=0a,addr.type=unix,addr.path=/s",
            r#"-netdev {"type":"user","id":"n'0"}"#,
            "-nic user,id=1",
        ] {
            let e = run(&format!("-kernel k {bad}")).unwrap_err().to_string();
            assert!(
                e.contains(": id: '") && e.contains("' is not an id ("),
                "{bad}: {e}"
            );
        }
        assert_eq!(option_of("-kernel k -device ne2k_pci,netdev=a"), "-device");
        assert_eq!(
            option_of("-kernel k -device e1000,netdev=nope"),
            "-device e1000"
        );
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

    /// Every -netdev is checked when the command line is read, used by a NIC or not.
    #[test]
    fn every_netdev_is_checked_and_unused_ones_are_found() {
        let e = run("-kernel k -netdev user,id=n0,bogus=1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "-netdev user,id=n0: unknown parameter 'bogus'"
        );
        let e = run("-kernel k -netdev tap,id=n0,fd=3x").unwrap_err();
        assert_eq!(e.to_string(), "-netdev tap,id=n0: fd: '3x' is not a number");
        assert_eq!(
            option_of("-kernel k -netdev socket,id=s,listen=1234"),
            "-netdev socket,id=s"
        );
        assert_eq!(option_of("-kernel k -nic user,bogus=1"), "-nic user");
        assert_eq!(
            option_of("-kernel k -nic user,id=u,bogus=1"),
            "-nic user,id=u"
        );
        assert_eq!(
            option_of("-kernel k -net nic -net user,net=10.0.2.7/24"),
            "-net user"
        );
        let c = run("-kernel k -netdev user,id=a -netdev vde,id=b -device e1000,netdev=a").unwrap();
        let unused: Vec<&str> = c.netdevs_without_peer().map(|n| n.id.as_str()).collect();
        assert_eq!(unused, ["b"]);
        assert_eq!(run("-kernel k").unwrap().netdevs_without_peer().count(), 0);
        assert_eq!(
            run("-kernel k -nic tap,script=no")
                .unwrap()
                .netdevs_without_peer()
                .count(),
            0
        );
    }

    fn listing(s: &str) -> String {
        match parse(s.split_whitespace().map(String::from)).unwrap() {
            Action::Listing(t) => t,
            a => panic!("{s}: {a:?}"),
        }
    }

    /// What QEMU users paste: accepted (with a note when it changes nothing).
    #[test]
    fn pasted_qemu_lines_run() {
        let c = run(
            "-enable-kvm -M q35,accel=kvm -cpu host -display none -vga none -snapshot \
                     -accel kvm -kernel k -nic model=e1000",
        )
        .unwrap();
        assert_eq!(
            c.netdevs[0].backend.kind(),
            "user",
            "-nic without a type: user"
        );
        assert_eq!(c.nics[0].model, NicModel::E1000);
        assert_eq!(c.notes.len(), 7, "{:?}", c.notes);
        assert!(c.notes.iter().all(|n| !n.warning));
        let c = run(
            "-kernel k -net nic,model=virtio,vlan=0,macaddr=52:54:00:00:00:09 -net user,vlan=0",
        )
        .unwrap();
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:00:00:09");
        // Two hubs: each NIC with the backend of its vlan, whatever the order.
        let c = run("-kernel k -net nic,vlan=1,model=e1000 -net nic,vlan=0 -net user,vlan=0 -net socket,vlan=1,listen=:5555")
            .unwrap();
        assert_eq!(c.nics[0].model, NicModel::E1000);
        assert_eq!(
            c.netdev(c.nics[0].netdev.as_deref().unwrap())
                .unwrap()
                .backend
                .kind(),
            "socket"
        );
        assert_eq!(
            c.netdev(c.nics[1].netdev.as_deref().unwrap())
                .unwrap()
                .backend
                .kind(),
            "user"
        );
        // -net nic on a -netdev, as QEMU takes it; not together with vlan=.
        let c = run("-kernel k -netdev user,id=n0 -net nic,model=e1000,netdev=n0").unwrap();
        assert_eq!((c.nics.len(), c.nics[0].netdev.as_deref()), (1, Some("n0")));
        assert_eq!(c.nics[0].model, NicModel::E1000);
        let e = run("-kernel k -netdev user,id=n0 -net nic,netdev=n0,vlan=1").unwrap_err();
        assert!(e.to_string().contains("netdev= and vlan="), "{e}");
        // -device as QEMU reads it: a property given twice keeps its last value, a trailing
        // comma ends the list; ids are QEMU's.
        let c = run("-kernel k -netdev user,id=n0 \
                     -device e1000,netdev=n0,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57,")
        .unwrap();
        assert_eq!(c.nics[0].mac.to_string(), "52:54:00:12:34:57");
        // A NIC without mac= never gets an address another NIC was given, before or after it.
        let c = run("-kernel k -netdev user,id=a -device e1000,netdev=a \
                     -netdev user,id=b -device e1000,netdev=b,mac=52:54:00:12:34:56 \
                     -netdev user,id=c -device rtl8139,netdev=c")
        .unwrap();
        let macs: Vec<String> = c.nics.iter().map(|n| n.mac.to_string()).collect();
        assert_eq!(
            macs,
            [
                "52:54:00:12:34:57",
                "52:54:00:12:34:56",
                "52:54:00:12:34:58"
            ]
        );
        let c = run("-kernel k -netdev user,id=n0 -device e1000,netdev=n0,id=a,id=b").unwrap();
        assert_eq!(
            c.nics[0].id.as_deref(),
            Some("a"),
            "QEMU takes the first id="
        );
        // So on -net nic and -net TYPE (whose id names the backend); the last mac= of -nic,
        // the last model= of both.
        let c = run(
            "-kernel k -net nic,model=rtl8139,model=e1000,id=x,id=y,macaddr=52:54:00:00:00:01,\
                     macaddr=52:54:00:00:00:02 -net user,id=a,id=b,name=c,name=d \
                     -nic user,model=help,model=virtio-net-pci,mac=52:54:00:00:00:03,\
                     mac=52:54:00:00:00:04",
        )
        .unwrap();
        assert_eq!(c.nics[0].model, NicModel::VirtioNetPci);
        assert_eq!(c.nics[1].model, NicModel::E1000);
        let nics: Vec<(Option<&str>, String)> = c
            .nics
            .iter()
            .map(|n| (n.id.as_deref(), n.mac.to_string()))
            .collect();
        assert_eq!(
            nics,
            [
                (None, "52:54:00:00:00:04".to_string()),
                (Some("x"), "52:54:00:00:00:02".to_string())
            ]
        );
        assert_eq!(c.nics[1].netdev.as_deref(), Some("a"));
        // -net TYPE,id= is a netdev id like -netdev's (checked, unique, captured by it);
        // without one the hub port's name, one no -netdev has, and a -net dump finds its
        // vlan's backend by what it is, not by its name.
        let c = run("-kernel k -net user,id=foo -net nic \
                     -object filter-dump,id=f,netdev=foo,file=x.pcap")
        .unwrap();
        assert_eq!(c.dumps[0].netdev, "foo");
        for (bad, said) in [
            ("-net user,id=1x -net nic", "-net: id: '1x' is not an id"),
            (
                "-netdev user,id=a -net user,id=a -net nic",
                "-net user,id=a: duplicate id 'a'",
            ),
        ] {
            let e = run(&format!("-kernel k {bad}")).unwrap_err().to_string();
            assert!(e.starts_with(said), "{bad}: {e}");
        }
        let c = run(
            "-kernel k -netdev user,id=hub0port0 -device e1000,netdev=hub0port0 \
                     -net nic -net user -net dump,file=d.pcap,file=e.pcap",
        )
        .unwrap();
        assert_eq!(c.nics[0].netdev.as_deref(), Some("hub0port1"));
        assert_eq!(c.dumps[0].netdev, "hub0port1");
        assert_eq!(c.dumps[0].file, PathBuf::from("e.pcap"), "the last file=");
        // -nic is QemuOpts whatever its type: the first id=.
        let c = run("-kernel k -nic stream,id=a,id=b,addr.type=unix,addr.path=/s").unwrap();
        assert_eq!(c.netdevs[0].id, "a");
        for bad in ["bad/id", "1st", "a\u{1b}b"] {
            let e = run(&format!(
                "-kernel k -netdev user,id=n0 -device e1000,netdev=n0,id={bad}"
            ))
            .unwrap_err();
            assert!(e.to_string().contains("is not an id"), "{bad}: {e}");
        }
        // vlan= is a hub number: 01 is hub 1, a name or a sign is refused.
        let c = run("-kernel k -net nic,vlan=01 -net user,vlan=1").unwrap();
        assert_eq!(c.nics.len(), 1);
        for bad in [
            "-net nic,vlan=x -net user,vlan=x",
            "-net nic -net user,vlan=-1",
            "-net nic,vlan=+1 -net user,vlan=1",
        ] {
            let e = run(&format!("-kernel k {bad}")).unwrap_err();
            assert!(e.to_string().starts_with("-net: vlan: '"), "{bad}: {e}");
        }
        // -net nic takes QEMU's NIC options, not -device's other properties.
        let c = run("-kernel k -net nic,model=virtio-net-pci,vectors=3,macaddr=52:54:00:00:00:09,addr=5,id=v -net user \
                     -net nic,model=e1000,vectors=3,vlan=1 -net user,vlan=1")
            .unwrap();
        assert_eq!(c.nics[0].vectors, Some(3));
        assert_eq!(c.nics[0].id.as_deref(), Some("v"));
        assert_eq!(c.nics[1].vectors, None, "ignored on e1000, as by QEMU");
        for (bad, key) in [
            ("model=virtio-net-pci,csum=off", "csum"),
            ("model=virtio-net-pci,mrg_rxbuf=off", "mrg_rxbuf"),
            ("model=rtl8139,cplus=off", "cplus"),
            ("mac=52:54:00:00:00:09", "mac"),
        ] {
            let e = run(&format!("-kernel k -net nic,{bad} -net user")).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("-net: unknown parameter '{key}'"),
                "{bad}"
            );
        }
        let c = run("-kernel k -net nic -net user -net dump,file=/tmp/d.pcap").unwrap();
        assert_eq!(Some(&c.dumps[0].netdev), c.nics[0].netdev.as_ref());
        assert_eq!(c.dumps[0].file, PathBuf::from("/tmp/d.pcap"));
        let c = run("-kernel k -netdev tap,id=t,vhost=on,sndbuf=0,queues=1 \
                     -device virtio-net-pci,netdev=t,romfile=,bus=pci.0,bootindex=2,disable-legacy=on,mrg_rxbuf=off,vectors=4")
        .unwrap();
        assert!(!c.nics[0].mrg_rxbuf);
        assert!(c
            .notes
            .iter()
            .any(|n| n.warning && n.text.contains("vhost")));
        // The same warning for a bridge's tap made by a helper.
        let c =
            run("-kernel k -netdev tap,id=t,helper=/h,vhost=on -device e1000,netdev=t").unwrap();
        assert!(c
            .notes
            .iter()
            .any(|n| n.warning && n.text.contains("vhost-net asked for")));
        // -nographic: the console is mon:stdio, as in QEMU, unless something says otherwise.
        let console_monitor = |line: &str| {
            let c = run(line).unwrap();
            c.monitors
                .iter()
                .any(|m| m.endpoint == Endpoint::Stdio && m.mode == MonitorMode::Readline)
        };
        for line in [
            "-kernel k -nographic",
            // The serial port elsewhere: stdio is the monitor's alone, as in QEMU.
            "-kernel k -nographic -serial file:/tmp/console",
            "-kernel k -nographic -serial none",
            "-kernel k -nographic -serial unix:/tmp/s,server=on,wait=off",
        ] {
            assert!(console_monitor(line), "{line}");
        }
        // Plain stdio (Ctrl-C ends nicvm, no Ctrl-a keys) where QEMU's stdio chardev is
        // plain; not nicvm's default console or mon:stdio.
        for (line, plain) in [
            ("-kernel k", false),
            ("-kernel k -nographic", false),
            ("-kernel k -serial mon:stdio", false),
            ("-kernel k -serial stdio", true),
            (
                "-kernel k -nographic -qmp unix:/tmp/q,server=on,wait=off",
                true,
            ),
            ("-kernel k -nographic -monitor none", true),
            ("-kernel k -serial file:/tmp/x", false),
            ("-kernel k -nographic -serial file:/tmp/x", true),
            ("-kernel k -monitor stdio -serial none", true),
            (
                "-kernel k -chardev stdio,id=c,signal=off -serial chardev:c",
                false,
            ),
            (
                "-kernel k -chardev stdio,id=c,signal=off -mon chardev=c -serial none",
                false,
            ),
            (
                "-kernel k -chardev stdio,id=c,mux=on,signal=on -serial chardev:c -mon chardev=c",
                true,
            ),
        ] {
            assert_eq!(run(line).unwrap().stdio_signals, plain, "{line}");
        }
        assert_eq!(
            option_of("-kernel k -chardev stdio,id=c,signal=maybe"),
            "-chardev"
        );
        for line in [
            "-kernel k",
            "-kernel k -nographic -serial stdio",
            "-kernel k -nographic -chardev stdio,id=c0 -serial chardev:c0",
            "-kernel k -nographic -monitor none",
            "-kernel k -nographic -qmp unix:/tmp/q,server=on,wait=off",
            "-kernel k -nographic -nodefaults",
        ] {
            assert!(!console_monitor(line), "{line}");
        }
        let c = run("-nodefaults -kernel k").unwrap();
        assert!(c.nics.is_empty(), "-nodefaults: no default NIC");
        assert_eq!(c.serial, SerialTarget::None);
        for (line, option, why) in [
            ("-m 128M,foo=1", "-m", "foo"),
            ("-m 128M,slots=abc", "-m", "abc"),
            ("-m 128M,maxmem=64M", "-m", "maxmem=64M"),
            ("-name a,b", "-name", "'b'"),
            ("-name guest=vm1,foo=bar", "-name", "foo"),
            ("-serial none -serial stdio", "-serial", "one serial port"),
            (
                "-daemonize -monitor stdio -serial none",
                "-monitor",
                "stdio",
            ),
            (
                "-daemonize -chardev stdio,id=c -mon chardev=c -serial none",
                "-mon",
                "stdio",
            ),
        ] {
            let e = run(&format!("{line} -kernel k")).unwrap_err();
            assert_eq!(e.option, option, "{line}");
            assert!(e.to_string().contains(why), "{line}: {e}");
        }
        let c = run("-m size=256M,slots=4,maxmem=1G -name guest=vm1,debug-threads=on -kernel k")
            .unwrap();
        assert_eq!((c.mem_mib, c.name.as_deref()), (256, Some("vm1")));
        assert!(
            c.notes.iter().any(|n| n.text.contains("no memory hotplug")),
            "a note, not silence: {:?}",
            c.notes
        );
        let c = run("-m 256M -m maxmem=1G -name process=x -kernel k").unwrap();
        assert_eq!(
            (c.mem_mib, c.name.as_deref()),
            (256, None),
            "a size kept; no name"
        );
        match parse(["-name", "", "-kernel", "k"].map(String::from)).unwrap() {
            Action::Run(c) => assert_eq!(c.name, None, "-name '': none, as QEMU's query-name says"),
            a => panic!("{a:?}"),
        }
        // QEMU's order: -nic (and -net nic) NICs first, then -device ones, whatever the
        // command line's order.
        let c = run(
            "-netdev user,id=n0 -device e1000,netdev=n0,id=nic0 -netdev user,id=n1 \
                     -device virtio-net-pci,netdev=n1 -nic user,model=rtl8139 -kernel k",
        )
        .unwrap();
        let order: Vec<(&str, String)> = c
            .nics
            .iter()
            .map(|n| (n.model.name(), n.mac.to_string()))
            .collect();
        assert_eq!(
            order,
            [
                ("rtl8139", "52:54:00:12:34:56".to_string()),
                ("e1000", "52:54:00:12:34:57".to_string()),
                ("virtio-net-pci", "52:54:00:12:34:58".to_string()),
            ]
        );
        // -nic before -net, whatever comes first; the -net NICs (on a netdev or a vlan) in
        // their own order.
        let c = run(
            "-net nic,netdev=a,model=e1000 -netdev user,id=a -nic user,model=rtl8139 \
                     -net nic,model=virtio-net-pci -net user -kernel k",
        )
        .unwrap();
        let models: Vec<&str> = c.nics.iter().map(|n| n.model.name()).collect();
        assert_eq!(models, ["rtl8139", "e1000", "virtio-net-pci"]);
        let c = run(
            "-net nic,model=e1000 -net user -net nic,netdev=b,model=rtl8139 \
                     -netdev user,id=b -kernel k",
        )
        .unwrap();
        let models: Vec<&str> = c.nics.iter().map(|n| n.model.name()).collect();
        assert_eq!(models, ["e1000", "rtl8139"]);
        let c = run("-daemonize -pidfile /tmp/p -kernel k").unwrap();
        assert!(c.daemonize);
        assert_eq!(
            c.serial,
            SerialTarget::None,
            "no stdio console in the background"
        );
        assert_eq!(c.pidfile, Some(PathBuf::from("/tmp/p")));
        assert_eq!(
            run("-kernel k -smp 4,sockets=2,cores=2,threads=1")
                .unwrap()
                .cpus,
            4
        );
        assert_eq!(run("-kernel k -smp 4,sockets=2").unwrap().cpus, 4);
        // The topology as QEMU completes it (cores before sockets, since 6.2).
        let topo = |line: &str| {
            let t = run(&format!("-kernel k -smp {line}")).unwrap().topology;
            (t.sockets, t.dies, t.cores, t.threads)
        };
        assert_eq!(topo("4"), (1, 1, 4, 1));
        assert_eq!(topo("4,sockets=2"), (2, 1, 2, 1));
        assert_eq!(topo("4,cores=1"), (4, 1, 1, 1));
        assert_eq!(topo("4,threads=2"), (1, 1, 2, 2));
        assert_eq!(topo("8,sockets=2,dies=2"), (2, 2, 2, 1));
        assert_eq!(topo("sockets=2,cores=2,threads=2"), (2, 1, 2, 2));
        assert_eq!(topo("8,sockets=2,cores=2"), (2, 1, 2, 2));
        assert_eq!(topo("8,sockets=2,dies=2,cores=1"), (2, 2, 1, 2));
        let t = run("-kernel k -smp 8,sockets=2,dies=2,threads=1")
            .unwrap()
            .topology;
        // vCPU 7: socket 1, die 1, core 1, thread 0; vCPU 5: socket 1, die 0, core 1.
        assert_eq!((t.ids(7), t.ids(5)), ((1, 1, 1, 0), (1, 0, 1, 0)));
        assert_eq!(run("-kernel k -smp sockets=2,cores=2").unwrap().cpus, 4);
    }

    #[test]
    fn contradictions_are_refused_with_the_reason() {
        for (line, option, says) in [
            ("-smp 2,sockets=2,cores=2", "-smp", "topology"),
            ("-smp 3,sockets=2", "-smp", "topology"),
            ("-smp 2,maxcpus=4", "-smp", "hotplug"),
            ("-M microvm", "-M", "one machine"),
            ("-accel tcg", "-accel", "KVM"),
            ("-cpu qemu64", "-cpu", "host or max"),
            ("-display gtk", "-display", "no display"),
            ("-net nic -net user -net user", "-net", "1 '-net nic' but 2"),
            (
                "-net nic,vlan=1 -net user",
                "-net",
                "vlan 1: 1 '-net nic' but 0",
            ),
            ("-net nic -net user -net dump,vlan=3", "-net dump", "vlan 3"),
            ("-netdev tap,id=t,queues=17", "-netdev tap,id=t", "1 to 16"),
            (
                "-netdev tap,id=t,queues=2 -device e1000,netdev=t",
                "-device e1000",
                "only virtio-net-pci has more than one",
            ),
            (
                "-netdev tap,id=t,queues=2 -object filter-dump,id=d,netdev=t,file=/tmp/x",
                "-object filter-dump",
                "single-queue",
            ),
            (
                "-netdev user,id=u -device e1000,netdev=u,mrg_rxbuf=on",
                "-device e1000",
                "only virtio",
            ),
            (
                "-netdev user,id=u -device virtio-net-pci,netdev=u,mq=on,ctrl_vq=off",
                "-device virtio-net-pci",
                "ctrl_vq=on",
            ),
            (
                "-netdev user,id=u -device virtio-net-pci,netdev=u,bus=pci.1",
                "-device virtio-net-pci",
                "one PCI bus",
            ),
            ("-serial stdio -daemonize", "-daemonize", "background"),
        ] {
            let e = run(&format!("-kernel k {line}")).unwrap_err();
            assert_eq!(e.option, option, "{line}: {e}");
            assert!(e.to_string().contains(says), "{line}: {e}");
        }
        // `-net dump` alone is no backend: the count says so.
        let e = run("-kernel k -net nic -net dump").unwrap_err().to_string();
        assert!(
            e.contains("1 '-net nic' but 0 backend(s) (-net dump not counted)"),
            "{e}"
        );
        // An unknown type is named as such, alone as beside a NIC (a review found the count
        // said first); a dump without a backend is said once.
        for line in ["-kernel k -net foo", "-kernel k -net nic -net foo"] {
            let e = run(line).unwrap_err().to_string();
            assert!(
                e.starts_with("-net: unknown backend type 'foo'"),
                "{line}: {e}"
            );
        }
        let e = run("-kernel k -net dump").unwrap_err().to_string();
        assert_eq!(e, "-net dump: no backend on vlan 0 to capture");
    }

    #[test]
    fn monitors() {
        let c = run("-kernel k -qmp unix:/tmp/q.sock,server,nowait -S \
                     -chardev socket,id=m,host=127.0.0.1,port=4444,server=on,wait=off \
                     -mon chardev=m,mode=control -serial mon:stdio -monitor stdio")
        .unwrap();
        assert!(c.start_paused);
        assert_eq!(c.monitors.len(), 3, "{:?}", c.monitors);
        assert_eq!(c.monitors[0].endpoint, Endpoint::Unix("/tmp/q.sock".into()));
        assert_eq!(c.monitors[0].mode, MonitorMode::Control);
        assert_eq!(
            c.monitors[1].endpoint,
            Endpoint::Tcp("127.0.0.1:4444".parse().unwrap())
        );
        assert_eq!(c.monitors[2].endpoint, Endpoint::Stdio);
        assert_eq!(c.monitors[2].mode, MonitorMode::Readline);
        // -mon before its -chardev, as QEMU takes it; a telnet monitor is a TCP one.
        let c = run(
            "-kernel k -mon chardev=q,mode=control -chardev socket,id=q,path=/tmp/q,server=on,wait=off \
                     -monitor telnet:127.0.0.1:5555,server,nowait",
        )
        .unwrap();
        assert_eq!(c.monitors.len(), 2, "{:?}", c.monitors);
        assert_eq!(
            c.monitors[0].endpoint,
            Endpoint::Tcp("127.0.0.1:5555".parse().unwrap())
        );
        assert_eq!(c.monitors[1].endpoint, Endpoint::Unix("/tmp/q".into()));
        assert_eq!(c.monitors[1].mode, MonitorMode::Control);
        assert!(c.notes.iter().any(|n| n.text.contains("telnet")));
        assert_eq!(option_of("-kernel k -mon chardev=nope"), "-mon");
        let c = run("-kernel k -serial unix:/tmp/s.sock,server=on,wait=off").unwrap();
        assert_eq!(
            c.serial,
            SerialTarget::Socket {
                at: Endpoint::Unix("/tmp/s.sock".into()),
                telnet: false
            }
        );
        assert_eq!(
            run("-kernel k -serial pty").unwrap().serial,
            SerialTarget::Pty
        );
        let c = run("-kernel k -serial chardev:s -chardev socket,id=s,port=5555,server,nowait")
            .unwrap();
        assert!(matches!(
            c.serial,
            SerialTarget::Socket {
                at: Endpoint::Tcp(_),
                telnet: false
            }
        ));
        assert_eq!(option_of("-kernel k -serial chardev:nope"), "-serial");
        // QEMU's telnet consoles, as common lines write them: a TCP socket that speaks
        // telnet, without a note.
        for line in [
            "-kernel k -serial telnet::4444,server,nowait",
            "-kernel k -serial tcp::4444,server=on,wait=off,telnet=on",
            "-kernel k -serial chardev:c -chardev socket,id=c,port=4444,server=on,wait=off,telnet=on",
        ] {
            let c = run(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(
                c.serial,
                SerialTarget::Socket {
                    at: Endpoint::Tcp("0.0.0.0:4444".parse().unwrap()),
                    telnet: true
                },
                "{line}"
            );
            assert!(c.notes.is_empty(), "{line}: {:?}", c.notes);
        }
        // server=off (QEMU's default): nicvm connects, as QEMU's Python harness expects.
        let c = run("-kernel k -serial unix:/tmp/s -qmp tcp:127.0.0.1:4444").unwrap();
        assert_eq!(
            c.serial,
            SerialTarget::Socket {
                at: Endpoint::UnixClient("/tmp/s".into()),
                telnet: false
            }
        );
        assert_eq!(
            c.monitors[0].endpoint,
            Endpoint::TcpClient("127.0.0.1:4444".parse().unwrap())
        );
        assert!(c.wait_for.is_empty());
        let c =
            run("-kernel k -chardev socket,id=m,path=/tmp/m -mon chardev=m,mode=control").unwrap();
        assert_eq!(
            c.monitors[0].endpoint,
            Endpoint::UnixClient("/tmp/m".into())
        );
        // fd=: an inherited socket, connected (server=off) or listening.
        let fds = InheritedFds::from_fds([7, 8]);
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let Action::Run(c) = parse_with_fds(
            args(
                "-kernel k -chardev socket,id=m,fd=7 -mon m,mode=control \
                  -chardev socket,id=s,fd=8,server=on -serial chardev:s",
            ),
            &fds,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.monitors[0].endpoint,
            Endpoint::Fd {
                fd: 7,
                listening: false
            }
        );
        assert_eq!(
            c.wait_for,
            [Endpoint::Fd {
                fd: 8,
                listening: true
            }]
        );
        for (line, why) in [
            (
                "-chardev socket,id=m,fd=9 -mon m",
                "fd: 9 is not a descriptor nicvm inherited",
            ),
            (
                "-chardev socket,id=m,fd=7,path=/tmp/x -mon m",
                "path=, port= or fd=",
            ),
            (
                "-chardev socket,id=m,fd=7 -chardev socket,id=n,fd=7 -mon m",
                "fd: 7 is given twice",
            ),
            ("-qmp telnet:127.0.0.1:4444", "telnet needs server=on"),
            ("-qmp unix:/tmp/q,nowait", "'wait' option is incompatible"),
            (
                "-chardev socket,id=m,path=/tmp/m,wait=on -mon m",
                "'wait' option is incompatible",
            ),
        ] {
            let e = parse_with_fds(args(&format!("-kernel k {line}")), &fds)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{line}: {e}");
        }
        // wait=on, QEMU's default for a server: waited for, on the sockets opened, once each.
        let c = run("-kernel k -qmp tcp:127.0.0.1:4445,server").unwrap();
        assert_eq!(
            c.wait_for,
            [Endpoint::Tcp("127.0.0.1:4445".parse().unwrap())]
        );
        let c = run("-kernel k -serial unix:/tmp/s,server -chardev socket,id=u,path=/tmp/u,server \
                     -chardev socket,id=m,path=/tmp/m,server=on -mon m -qmp unix:/tmp/q,server,nowait")
        .unwrap();
        assert_eq!(
            c.wait_for,
            [
                Endpoint::Unix("/tmp/s".into()),
                Endpoint::Unix("/tmp/m".into())
            ]
        );
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        for (line, option) in [
            ("-qmp stdio", "-qmp"),
            ("-qmp pipe:/tmp/x", "-qmp"),
            ("-mon chardev=nope", "-mon"),
            (
                "-chardev socket,id=m,path=/tmp/m,server=on,wait=off -mon m,mode=json",
                "-mon",
            ),
            ("-chardev socket,id=m -mon m", "-chardev"),
            (
                "-qmp unix:/tmp/a,server=on,wait=off -monitor unix:/tmp/a,server=on,wait=off",
                "-monitor",
            ),
        ] {
            assert_eq!(option_of(&format!("-kernel k {line}")), option, "{line}");
        }
        // A socket path the kernel would cut: refused, for the socket options too.
        let long = format!("/tmp/{}", "a".repeat(103)); // 108 bytes
        for line in [
            format!("-qmp unix:{long},server=on,wait=off"),
            format!("-serial unix:{long},server=on,wait=off"),
            format!("-chardev socket,id=m,path={long},server=on,wait=off -mon m"),
        ] {
            let e = run(&format!("-kernel k {line}")).unwrap_err().to_string();
            assert!(e.contains("holds at most 107"), "{line}: {e}");
        }
        let ok = format!("-kernel k -qmp unix:{},server=on,wait=off", &long[..107]);
        assert!(run(&ok).is_ok());
    }

    #[test]
    fn listings_as_qemu_prints_them() {
        assert!(listing("-netdev help").contains("\ntap\n"));
        assert!(listing("-device help").contains("name \"e1000\""));
        assert!(listing("-device e1000,help").starts_with("e1000 options:"));
        assert!(listing("-device virtio-net-pci,help").contains("mrg_rxbuf"));
        assert!(listing("-nic model=help").contains("rtl8139"));
        assert!(listing("-M help").starts_with("Supported machines are:\npc "));
        assert!(listing("-machine type=help").contains("\nq35 "));
        assert!(listing("-cpu help").contains("\n  host "));
        assert_eq!(
            listing("-accel ?"),
            "Accelerators supported by nicvm:\nkvm\n"
        );
        assert!(listing("-nic help").contains("\ntap\n"));
        assert!(listing("-chardev help").contains("\n  socket\n"));
        assert!(listing("-serial help").contains("\n  stdio\n"));
        assert!(listing("-d help").contains("NICVM_LOG"));
        // Not a request for help: parsed as before (the listing tests end here).
        assert_eq!(option_of("-cpu helper -kernel k"), "-cpu");
        assert!(listing("-net nic,model=?").contains("virtio-net-pci"));
        assert_eq!(option_of("-device bogus,help"), "-device");
    }

    #[test]
    fn tap_fds_are_inherited_ones_each_named_once() {
        let fds = InheritedFds::from_fds([0, 1, 2, 5, 6]);
        let c = run_with(
            "-kernel k -netdev tap,id=a,fd=5 -netdev tap,id=b,fd=6 -device e1000,netdev=a",
            &fds,
        )
        .unwrap();
        let Backend::Tap(t) = &c.netdevs[1].backend else {
            panic!()
        };
        assert_eq!(
            t.device,
            TapDevice::Fds {
                key: "fd",
                fds: vec![6]
            }
        );
        let e = run_with(
            "-kernel k -netdev tap,id=a,fd=5 -netdev tap,id=b,fd=5",
            &fds,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "-netdev tap,id=b: fd: 5 is already used by -netdev tap,id=a"
        );
        let e = run_with("-kernel k -nic tap,fd=5 -net nic -net tap,fd=5", &fds).unwrap_err();
        assert_eq!(e.option, "-net tap", "{e}");
        let e = run_with("-kernel k -netdev tap,id=a,fd=7", &fds).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("-netdev tap,id=a: fd: 7 is not a descriptor nicvm inherited"),
            "{e}"
        );
        let e = run_with("-kernel k -netdev tap,id=a,fd=2", &fds).unwrap_err();
        assert_eq!(e.to_string(), "-netdev tap,id=a: fd: 2 is nicvm's stderr");
        assert!(
            run("-kernel k -netdev tap,id=a,fd=5").is_err(),
            "parse() knows no inherited descriptor"
        );
    }

    /// QEMU's short-form booleans on -netdev, -device, -nic and -net: the same settings as
    /// the long forms, each with QEMU's deprecation warning; a bare key that is no boolean
    /// still needs its value.
    #[test]
    fn short_form_booleans_as_qemu_takes_them() {
        let short = run("-kernel k -netdev user,id=n0,noipv6,restrict \
                         -device virtio-net-pci,netdev=n0,csum,nomrg_rxbuf,noguest_tso4 \
                         -nic user,model=rtl8139,restrict")
        .unwrap();
        let long = run("-kernel k -netdev user,id=n0,ipv6=off,restrict=on \
                        -device virtio-net-pci,netdev=n0,csum=on,mrg_rxbuf=off,guest_tso4=off \
                        -nic user,model=rtl8139,restrict=on")
        .unwrap();
        assert_eq!(
            format!("{:?} {:?}", short.netdevs, short.nics),
            format!("{:?} {:?}", long.netdevs, long.nics)
        );
        let warned: Vec<&str> = short
            .notes
            .iter()
            .filter(|n| n.warning && n.text.contains("short-form boolean"))
            .map(|n| n.text.as_str())
            .collect();
        assert_eq!(warned.len(), 6, "{warned:?}");
        assert!(
            warned[0].starts_with("-netdev user,id=n0,noipv6,restrict: short-form boolean option 'noipv6' deprecated; use ipv6=off instead"),
            "{}",
            warned[0]
        );
        assert!(!long.notes.iter().any(|n| n.text.contains("short-form")));
        // disable-legacy is on, off or auto: a short form, and a string in JSON.
        run("-kernel k -nic none -netdev user,id=n0 -device virtio-net-pci,netdev=n0,disable-legacy")
            .unwrap();
        run(r#"-kernel k -nic none -netdev user,id=n0 -device {"driver":"virtio-net-pci","netdev":"n0","disable-legacy":"on"}"#)
            .unwrap();
        for (line, said) in [
            ("-netdev user,id", "'id' needs a value"),
            ("-device e1000,netdev", "'netdev' needs a value"),
            ("-netdev user,id=n,nobody", "'nobody' needs a value"),
            // QEMU 7.2 reads stream and dgram with a parser that has no short forms.
            (
                "-netdev stream,id=s,server,addr.type=inet,addr.host=127.0.0.1,addr.port=1",
                "'server' needs a value",
            ),
        ] {
            let e = run(&format!("-kernel k {line}")).unwrap_err().to_string();
            assert!(e.contains(said), "{line}: {e}");
        }
    }

    /// libvirt's multiqueue tap: `fds=` one descriptor a queue, `vhostfds=` as many, which
    /// nicvm checks and leaves alone (with the vhost warning).
    #[test]
    fn a_multiqueue_tap_given_by_descriptors() {
        let fds = InheritedFds::from_fds([0, 1, 2, 5, 6, 7, 8, 9]);
        let c = run_with(
            r#"-kernel k -netdev {"type":"tap","fds":"5:6","vhost":true,"vhostfds":"7:8","id":"h"} -device virtio-net-pci,netdev=h,mq=on"#,
            &fds,
        )
        .unwrap();
        let Backend::Tap(t) = &c.netdevs[0].backend else {
            panic!()
        };
        assert_eq!(
            (&t.device, t.queues, t.vhost),
            (
                &TapDevice::Fds {
                    key: "fds",
                    fds: vec![5, 6]
                },
                2,
                true
            )
        );
        assert!(c
            .notes
            .iter()
            .any(|n| n.warning && n.text.contains("vhost")));
        let why = |s: &str| {
            run_with(&format!("-kernel k {s}"), &fds)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            why("-netdev tap,id=a,fds=5:6 -netdev tap,id=b,fd=6"),
            "-netdev tap,id=b: fd: 6 is already used by -netdev tap,id=a"
        );
        assert_eq!(
            why("-netdev tap,id=a,fds=5:6,vhostfds=7"),
            "-netdev tap,id=a: vhostfds: 1 descriptors, and fds= has 2: one for each queue"
        );
        assert_eq!(
            why("-netdev tap,id=a,fds=5:5"),
            "-netdev tap,id=a: fds: 5 is given twice"
        );
        assert_eq!(
            why("-netdev tap,id=a,fds=5:x"),
            "-netdev tap,id=a: fds: '5:x' is not numbers joined by ':'"
        );
        assert_eq!(
            why("-netdev tap,id=a,fd=5:6"),
            "-netdev tap,id=a: fd: '5:6' is not a number"
        );
        assert!(
            why("-netdev tap,id=a,fds=5:4").contains("fds: 4 is not a descriptor nicvm inherited")
        );
        for (s, keys) in [
            ("fds=5,queues=1", "fds= and queues="),
            ("fds=5,ifname=t", "fds= and ifname="),
            ("fds=5,vhostfd=7", "fds= and vhostfd="),
            ("fds=5,script=/x", "fds= and script="),
            ("fd=5,fds=6", "fd= and fds="),
            ("fd=5,vhostfds=7", "fd= and vhostfds="),
        ] {
            assert!(why(&format!("-netdev tap,id=a,{s}")).contains(keys), "{s}");
        }
        let c = run_with(
            "-kernel k -netdev tap,id=a,ifname=t,vhostfd=7 -device e1000,netdev=a",
            &fds,
        )
        .unwrap();
        let Backend::Tap(t) = &c.netdevs[0].backend else {
            panic!()
        };
        assert!(t.vhost, "vhostfd= alone asks for vhost-net, as in QEMU");
        let c = run_with(
            "-kernel k -netdev tap,id=a,fd=5,vhost=off,vhostforce=on -device e1000,netdev=a",
            &fds,
        )
        .unwrap();
        let Backend::Tap(t) = &c.netdevs[0].backend else {
            panic!()
        };
        assert!(!t.vhost, "vhost=off wins, as in QEMU");
        assert!(!c.notes.iter().any(|n| n.text.contains("vhost")));
        assert_eq!(
            why("-netdev tap,id=a,fd=5,vhost=off,vhostfd=7"),
            "-netdev tap,id=a: vhostfd= and vhostfds= need vhost (not vhost=off), as in QEMU"
        );
        assert_eq!(
            why("-netdev tap,id=a,ifname=t,vhostfds=7:8"),
            "-netdev tap,id=a: vhostfds= needs fds="
        );
        assert_eq!(
            why("-netdev tap,id=a,fds=5:6,vhostfds=7:6"),
            "-netdev tap,id=a: vhostfds: 6 is a descriptor of the tap itself (fd= or fds=), not a vhost-net one"
        );
    }
}
