//! The VM's configuration as typed values, every field checked: what the command line
//! (`cli`) turns into before anything is opened, and what `vm` and `netdev` build from.
//!
//! `netdev` parses one `-netdev`'s options into its backend's options, `slirp` the
//! user-mode network's, `addr` socket addresses, `fds` the descriptors nicvm inherited.

pub mod addr;
pub mod fds;
pub mod netdev;
pub mod slirp;

use net_backends::dgram::DgramOptions;
use net_backends::slirp::SlirpOptions;
use net_backends::stream::StreamOptions;
use net_backends::vde::VdeOptions;
use net_backends::MacAddr;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::PathBuf;

pub use fds::InheritedFds;

#[derive(Debug, Clone)]
pub struct Config {
    pub mem_mib: u64,
    pub cpus: u8,
    /// `-smp`'s topology, what was left out computed as QEMU does.
    pub topology: Topology,
    /// `-cpu host,-NAME,+NAME,...`: features taken away (false) or insisted on (true).
    pub cpu_features: Vec<(&'static str, bool)>,
    /// `-cpu ...,enforce` / `check=off`: what a feature switched on but absent comes to.
    pub cpu_missing: crate::cpuid::Missing,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub serial: SerialTarget,
    /// Ctrl-C on stdio ends nicvm, as on QEMU's plain `stdio` (signal=on): the serial console
    /// there alone from an explicit `-serial stdio` (or `-nographic` with its monitor
    /// elsewhere), or a monitor there alone; or what `-chardev stdio,signal=` says. The
    /// serial console alone then has no Ctrl-a keys. Otherwise (nicvm's default console,
    /// `mon:stdio`) Ctrl-C goes to the guest and Ctrl-a x quits.
    pub stdio_signals: bool,
    pub name: Option<String>,
    pub netdevs: Vec<NetdevConfig>,
    pub nics: Vec<NicConfig>,
    pub dumps: Vec<DumpConfig>,
    /// `-daemonize`: into the background once set up (set-up errors still reach the caller).
    pub daemonize: bool,
    /// `-pidfile FILE`: nicvm's pid, written once set up, removed at exit.
    pub pidfile: Option<PathBuf>,
    /// What QEMU options that change nothing here were given, each said once at start
    /// (`-display none`, `-cpu host`, ...), and warnings about accepted options.
    pub notes: Vec<Note>,
    /// `-qmp`, `-monitor`, `-mon`, `-serial mon:stdio`: the control channels.
    pub monitors: Vec<MonitorConfig>,
    /// `-S`: the guest starts stopped (QMP `cont` starts it).
    pub start_paused: bool,
    /// `-no-shutdown` (`-action shutdown=pause`): a guest's power-off or reboot stops it,
    /// held in QEMU's `shutdown` state until a monitor's `quit` or a signal ends nicvm.
    pub no_shutdown: bool,
    /// `-name ...,process=NAME`: the process's name (`/proc/PID/comm`), as QEMU sets it.
    pub process_name: Option<String>,
    /// `-incoming file:PATH`: the guest comes from this snapshot instead of booting
    /// (`-kernel` is then not needed, and not loaded if given).
    pub incoming: Option<PathBuf>,
    /// The monitor and serial sockets given `wait=on` (QEMU's default for a server): set-up
    /// waits until each has a client waiting, before the guest starts, as QEMU does.
    pub wait_for: Vec<Endpoint>,
    /// `-save-on console=TEXT,file=PATH`: once the guest writes TEXT on its serial console,
    /// nicvm stops it, writes a snapshot to PATH and exits.
    pub save_on: Option<SaveOn>,
    /// The PCI slots QEMU's board (`-M`, with or without a VGA card) would hold: see
    /// [`board_slots`].
    pub board_slots: u32,
    /// The classic default network was made (no network option given): QEMU then says
    /// nothing of NICs without a peer.
    pub default_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveOn {
    pub console: String,
    pub file: PathBuf,
}

/// Which protocol a monitor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// QMP: JSON.
    Control,
    /// HMP: the human monitor's text commands.
    Readline,
}

/// How `-smp` arranges the vCPUs (their product is the CPU count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub sockets: u8,
    pub dies: u8,
    pub cores: u8,
    pub threads: u8,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            sockets: 1,
            dies: 1,
            cores: 1,
            threads: 1,
        }
    }
}

impl Topology {
    /// `-smp N` alone, as QEMU since 6.2 reads it: N cores of one socket.
    pub fn cores(n: u8) -> Self {
        Topology {
            cores: n,
            ..Topology::default()
        }
    }

    /// The socket, die, core and thread of vCPU `i`, as QEMU numbers them on x86.
    pub fn ids(&self, i: u8) -> (u32, u32, u32, u32) {
        let i = u32::from(i);
        let [t, c, d] = [self.threads, self.cores, self.dies].map(|n| u32::from(n.max(1)));
        (i / (t * c * d), (i / (t * c)) % d, (i / t) % c, i % t)
    }

    /// How many low bits of an APIC ID number the threads of a core, the cores of a die and
    /// the dies of a package: each level takes the bits its count needs (QEMU's layout, and
    /// the shifts CPUID leaves 0xB and 0x1F give).
    pub fn id_bits(&self) -> (u32, u32, u32) {
        let bits = |n: u8| u32::from(n.max(1)).next_power_of_two().trailing_zeros();
        (bits(self.threads), bits(self.cores), bits(self.dies))
    }

    /// Logical CPUs in a package.
    pub fn per_package(&self) -> u32 {
        [self.dies, self.cores, self.threads]
            .iter()
            .map(|&n| u32::from(n.max(1)))
            .product()
    }

    /// The APIC ID of vCPU `i`: its thread, core, die and socket in their bit fields (sparse
    /// when a count is no power of two: two sockets of three cores are 0-2 and 4-6). With
    /// at most `cli::MAX_CPUS` (8) vCPUs it stays far below xAPIC's 255.
    pub fn apic_id(&self, i: u8) -> u32 {
        let (socket, die, core, thread) = self.ids(i);
        let (t, c, d) = self.id_bits();
        socket << (t + c + d) | die << (t + c) | core << t | thread
    }
}

/// Where a monitor or the serial port is reached: a socket nicvm listens on (`server=on`),
/// one it connects to (`server=off`, a harness listening), or one it inherited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
    /// `path=PATH` with `server=off`: nicvm connects to it at set-up.
    UnixClient(PathBuf),
    /// `host=,port=` with `server=off`.
    TcpClient(std::net::SocketAddr),
    /// `fd=N`: an inherited socket, listening (`server=on`) or connected (`server=off`: the
    /// other end is the one client, as QEMU's Python harness passes a socketpair).
    Fd {
        fd: RawFd,
        listening: bool,
    },
    /// The console: the serial port and the monitor share it (Ctrl-a c switches).
    Stdio,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub mode: MonitorMode,
    pub endpoint: Endpoint,
    /// `-mon ...,pretty=on`: QMP answers and events indented, as QEMU prints them.
    pub pretty: bool,
    /// On a `telnet` socket: the clients' telnet commands are taken out of their input.
    pub telnet: bool,
    /// The option it came from, as messages name it.
    pub option: String,
}

/// A message about an accepted option, printed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub text: String,
}

impl Config {
    /// The netdev called `id`.
    pub fn netdev(&self, id: &str) -> Option<&NetdevConfig> {
        self.netdevs.iter().find(|n| n.id == id)
    }

    /// QEMU's warnings of net clients without a peer, in its order: each netdev no NIC uses,
    /// then each NIC without a netdev (unless the default network is in use).
    pub fn no_peer_warnings(&self) -> Vec<String> {
        let netdevs = self
            .netdevs_without_peer()
            .map(|nd| format!("netdev {} has no peer", nd.id));
        let nics = (0..self.nics.len())
            .filter(|&i| self.nics[i].netdev.is_none() && !self.default_network)
            .map(|i| format!("nic {} has no peer", nic_name(&self.nics, i)));
        netdevs.chain(nics).collect()
    }

    /// The netdevs no NIC uses (QEMU: "netdev ID has no peer"): opened and kept running all
    /// the same, as in QEMU (see `peerless`).
    pub fn netdevs_without_peer(&self) -> impl Iterator<Item = &NetdevConfig> {
        self.netdevs
            .iter()
            .filter(|n| !self.nics.iter().any(|c| c.is_on(&n.id)))
    }
}

/// The name QEMU gives NIC `i` of `nics` in listings and messages: its id, or MODEL.N (the
/// N-th NIC of its model).
pub fn nic_name<'a>(nics: impl IntoIterator<Item = &'a NicConfig>, i: usize) -> String {
    let nics: Vec<&NicConfig> = nics.into_iter().take(i + 1).collect();
    let n = nics[i];
    n.id.clone().unwrap_or_else(|| {
        let k = nics[..i]
            .iter()
            .filter(|m| m.model.name() == n.model.name())
            .count();
        format!("{}.{k}", n.model.name())
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
    None,
    /// `unix:PATH,server=on,...`, `tcp:HOST:PORT,server=on,...`: one client at a time;
    /// `telnet:...` (or `telnet=on`): a TCP one that speaks telnet.
    Socket {
        at: Endpoint,
        telnet: bool,
    },
    /// `pty`: a pseudo-terminal, its name printed at start.
    Pty,
}

/// `-netdev TYPE,id=ID,...` (or the backend half of `-nic`, `-net`, the default network).
#[derive(Debug, Clone)]
pub struct NetdevConfig {
    pub id: String,
    /// The option it came from, as messages name it: `-netdev tap,id=n0`, `-nic user`, ...
    pub option: String,
    pub backend: Backend,
    /// The hub (QEMU's vlan) of a `-net` backend and of the default network, which QEMU puts
    /// on hub 0: `info usernet` names a user network by it (`Hub 0 (ID)`; `Hub -1` for a
    /// `-netdev` or `-nic`).
    pub hub: Option<u32>,
}

/// One variant per backend, with its options fully parsed.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `user`: libslirp.
    User(SlirpOptions),
    Tap(TapOptions),
    Vde(VdeOptions),
    /// `stream`: QEMU's length-framed frames over TCP or a Unix stream socket.
    Stream(StreamOptions),
    /// `dgram`: one frame per datagram.
    Dgram(DgramOptions),
    /// QEMU's older `socket`: a stream (listen=, connect=) or datagrams (mcast=, udp=).
    Socket(SocketKind),
    /// `bridge`: a tap made for the VM on a host bridge.
    Bridge(BridgeOptions),
}

impl Backend {
    /// The `-netdev` type this came from.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::User(_) => "user",
            Backend::Tap(_) => "tap",
            Backend::Vde(_) => "vde",
            Backend::Stream(_) => "stream",
            Backend::Dgram(_) => "dgram",
            Backend::Socket(_) => "socket",
            Backend::Bridge(_) => "bridge",
        }
    }

    /// Queues the backend has (a multiqueue tap's `queues=`; 1 for everything else).
    pub fn queues(&self) -> usize {
        match self {
            Backend::Tap(t) => t.queues,
            _ => 1,
        }
    }
}

/// What a `-netdev socket` turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketKind {
    Stream(StreamOptions),
    Dgram(DgramOptions),
}

/// `-netdev tap`: `ifname=`/`fd=`, `script=`, `downscript=`, `vnet_hdr=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapOptions {
    pub device: TapDevice,
    pub script: Script,
    pub downscript: Script,
    /// `vnet_hdr=on|off`; None: a virtio-net header when the kernel offers one (an `fd=`:
    /// the one it was opened with).
    pub vnet_hdr: Option<bool>,
    /// `vhost=on` was asked for: nicvm has no vhost-net, frames go through its own loop.
    pub vhost: bool,
    /// `queues=N`: a multiqueue tap opened N times (virtio-net gets a queue pair per queue).
    pub queues: usize,
}

/// `-netdev bridge,br=BR[,helper=HELPER]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeOptions {
    /// The host bridge (QEMU's default: br0).
    pub br: String,
    /// QEMU's bridge helper, a program or a command line: it makes the tap and hands its
    /// descriptor over. None: nicvm makes the tap itself where it has the privilege
    /// (CAP_NET_ADMIN), else it runs QEMU's default helper.
    pub helper: Option<String>,
    /// `-netdev tap,helper=,vhost=on` (or `vhostforce=on`): vhost-net asked for, which nicvm
    /// does not have (the caller warns).
    pub vhost: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapDevice {
    /// `ifname=NAME`: that tap, created if missing; None: a new one the kernel names.
    Ifname(Option<String>),
    /// `fd=N`, or `fds=N:M:...` (a multiqueue tap's queues, one each): tap descriptors nicvm
    /// inherited (checked: inherited, not 0-2, each named once), and which key named them.
    Fds { key: &'static str, fds: Vec<RawFd> },
}

/// `script=`/`downscript=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// Not given: the default script (`/etc/nicvm-ifup`, else QEMU's `/etc/qemu-ifup`; the
    /// same for ifdown) if it exists when the tap is opened.
    Default,
    /// `no` (or empty).
    No,
    Path(PathBuf),
}

/// The NIC models, each with the properties only it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicModel {
    /// `cplus=on` (default): the RTL8139C+ that Linux's 8139cp drives; off: a plain
    /// RTL8139C for 8139too.
    Rtl8139 {
        cplus: bool,
    },
    E1000,
    VirtioNetPci,
}

impl NicModel {
    /// A model name as QEMU's `-device`/`model=` take it, with default properties.
    pub fn parse(s: &str) -> Option<NicModel> {
        Some(match s {
            "rtl8139" => NicModel::Rtl8139 { cplus: true },
            "e1000" | "e1000-82540em" => NicModel::E1000,
            "virtio-net-pci" | "virtio-net" | "virtio" => NicModel::VirtioNetPci,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            NicModel::Rtl8139 { .. } => "rtl8139",
            NicModel::E1000 => "e1000",
            NicModel::VirtioNetPci => "virtio-net-pci",
        }
    }
}

/// `-device MODEL,netdev=ID,...`: the frontend half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// From `-device` (QEMU's peripheral), not `-nic`, `-net nic` or the default network
    /// (made with the board).
    pub from_device: bool,
    pub model: NicModel,
    /// The netdev behind it; none for a `-device` given no `netdev=` (QEMU's NIC without a
    /// peer: what the guest sends is dropped, nothing arrives).
    pub netdev: Option<String>,
    pub mac: MacAddr,
    pub id: Option<String>,
    /// PCI slot (`addr=`).
    pub slot: Option<u8>,
    /// virtio-net's `mrg_rxbuf=` (default on): mergeable receive buffers offered.
    pub mrg_rxbuf: bool,
    /// virtio-net's `mq=` (default off): more than one queue pair offered to the driver.
    pub mq: bool,
    /// virtio-net's `ctrl_vq=` (default on): the control queue (RX mode, MAC tables, pairs).
    pub ctrl_vq: bool,
    /// virtio-net's `vectors=`: MSI-X vectors (default: 2 per queue pair + 2).
    pub vectors: Option<u16>,
    /// virtio-net's feature bits turned off by its offload properties (`csum=off`,
    /// `host_tso4=off`, ...; none by default).
    pub withheld: u64,
    /// virtio-net's `host_mtu=` (68 to 65535; none, or 0, offers no MTU).
    pub mtu: Option<u16>,
}

impl NicConfig {
    /// Whether the netdev `id` is behind this NIC.
    pub fn is_on(&self, id: &str) -> bool {
        self.netdev.as_deref() == Some(id)
    }
}

/// The PCI slots QEMU's board holds (a bit each), which a NIC without `addr=` passes over, so
/// that the guest finds its NICs at the PCI addresses QEMU's would have (`enp0s3` on pc):
/// pc (i440FX) 0 and 1 (the PIIX3), and 2 for the VGA card; q35 0, 1 for the VGA card, and
/// 0x1f (the ICH9). Without a VGA card (`-vga none`, `-nodefaults`) QEMU's first NIC is in 2
/// on pc, 1 on q35. nicvm has none of these devices but its host bridge in 0; its pvpanic
/// takes the first slot left over.
pub fn board_slots(q35: bool, vga: bool) -> u32 {
    match (q35, vga) {
        (false, true) => 0b111,
        (false, false) => 0b11,
        (true, true) => 0b11 | 1 << 31,
        (true, false) => 0b1 | 1 << 31,
    }
}

/// Each NIC's PCI slot, in order: its `addr=`, else the first slot that neither the board
/// (`board`, from [`board_slots`]) nor a NIC holds (one given by `addr=` or taken before).
/// One of 1-1f is left for the pvpanic device. `Err(i)`: NIC `i` is the one that finds no
/// slot.
pub fn nic_slots(nics: &[NicConfig], board: u32) -> Result<Vec<u8>, usize> {
    let mut slots: Vec<u8> = Vec::with_capacity(nics.len());
    for (i, nic) in nics.iter().enumerate() {
        let slot = match nic.slot {
            Some(s) => s,
            None => (1..32)
                .find(|&s| {
                    board & 1 << s == 0
                        && !slots.contains(&s)
                        && !nics.iter().any(|n| n.slot == Some(s))
                })
                .ok_or(i)?,
        };
        slots.push(slot);
        // Slots 1-1f, less the pvpanic's.
        if slots.len() > 30 {
            return Err(i);
        }
    }
    Ok(slots)
}

/// `-object filter-dump,id=ID,netdev=NETDEV,file=PATH[,maxlen=N]`: capture a netdev's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpConfig {
    /// The option it came from, for messages: `-object filter-dump` or `-net dump`.
    pub option: &'static str,
    pub id: String,
    pub netdev: String,
    pub file: PathBuf,
    pub maxlen: u32,
}

/// A bad option value; printed after the option it belongs to (`-netdev tap,id=n0: ...`).
/// Every message names the key.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    #[error("unknown parameter '{0}'")]
    Unknown(String),
    /// A value of the wrong shape.
    #[error("{key}: '{value}' is not {what}")]
    NotA {
        key: String,
        value: String,
        what: &'static str,
    },
    #[error("{key}: empty {what}")]
    Empty { key: String, what: &'static str },
    #[error("{key}: '{value}' needs a host")]
    NoHost { key: String, value: String },
    #[error("{key}: the name is longer than {max} characters")]
    TooLong { key: String, max: usize },
    #[error("{key}: {value} is out of range ({range})")]
    OutOfRange {
        key: String,
        value: String,
        range: &'static str,
    },
    /// Something more is needed: `[KEY ]needs WHAT`.
    #[error("{}needs {what}", key.as_ref().map(|k| format!("{k} ")).unwrap_or_default())]
    Needs { key: Option<String>, what: String },
    #[error("{} cannot be used together", .0.iter().map(|k| format!("{k}=")).collect::<Vec<_>>().join(" and "))]
    Together(Vec<String>),
    #[error("{key}: not used with {other}")]
    NotUsedWith { key: String, other: String },
    #[error("{key}: not of the same IP version as {other}")]
    IpVersion { key: String, other: String },
    #[error("local.type: must be {0}, as remote.type is")]
    LocalType(&'static str),
    #[error("{key}: only for clients (server=off)")]
    ClientOnly { key: String },
    #[error("{key}: '{ty}' addresses are not supported by nicvm (inet, unix are)")]
    AddrTypeUnsupported { key: String, ty: String },
    #[error("fd: passing a socket descriptor is not supported by nicvm")]
    SocketFd,
    #[error("{key}: cannot resolve '{host}': {source}")]
    Resolve {
        key: String,
        host: String,
        source: std::io::Error,
    },
    #[error("{key}: '{host}' has no address")]
    NoAddress { key: String, host: String },
    #[error("{key}: {addr} is outside net={net}/{prefix}")]
    OutsideNet {
        key: String,
        addr: Ipv4Addr,
        net: Ipv4Addr,
        prefix: u8,
    },
    #[error("{key}: {addr} is also the {other}= address; they must differ")]
    SameAddr {
        key: String,
        addr: Ipv4Addr,
        other: &'static str,
    },
    #[error("guestfwd: {addr} must be a free address inside net={net}/{prefix}")]
    GuestFwdAddr {
        addr: Ipv4Addr,
        net: Ipv4Addr,
        prefix: u8,
    },
    #[error("ipv4=off and ipv6=off leave nothing to do")]
    NoIp,
    /// `hostfwd=`/`guestfwd=` that libslirp's parser refused, with its reason.
    #[error("{key}: {why}")]
    Forward {
        key: &'static str,
        why: net_backends::slirp::FwdSyntaxError,
    },
    #[error("{0}: {1} is nicvm's {name}", name = ["stdin", "stdout", "stderr"][*.1 as usize])]
    StdFd(&'static str, RawFd),
    #[error("{0}: {1} is not a descriptor nicvm inherited (pass it open, without close-on-exec)")]
    NotInherited(&'static str, RawFd),
    #[error("{0}: {1} is given twice")]
    FdTwice(&'static str, RawFd),
    #[error("{0}: {1} descriptors, and fds= has {2}: one for each queue")]
    FdCount(&'static str, usize, usize),
    #[error("{0}: {1} is a descriptor of the tap itself (fd= or fds=), not a vhost-net one")]
    VhostFdIsTap(&'static str, RawFd),
    #[error("vhostfd= and vhostfds= need vhost (not vhost=off), as in QEMU")]
    VhostFdsWithoutVhost,
    #[error("fd: {fd} is already used by {by}")]
    FdTaken { fd: RawFd, by: String },
}

/// QEMU's booleans: `on|off` (and `yes|no`, `true|false`, `y|n`).
pub fn on_off(key: &str, v: &str) -> Result<bool, OptionError> {
    // QEMU's words for a boolean (qapi_bool_parse), `y` and `n` among them.
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(OptionError::NotA {
            key: key.into(),
            value: v.into(),
            what: "on or off",
        }),
    }
}
