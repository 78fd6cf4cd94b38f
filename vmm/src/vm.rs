//! The VM: [`Vm::new`] builds it from a [`Config`] (KVM, memory, irqchip, buses and devices,
//! the guest loaded, vCPUs set up), [`Vm::run`] runs it until the guest or the user ends it and
//! says why, and dropping it undoes everything: threads stopped and joined, backends closed,
//! downscripts run, files removed. Every exit path goes through that `Drop`: a setup failure
//! half-way, a guest power-off, a signal, Ctrl-a x, a panic on any thread.

use crate::boot;
use crate::config::{Config, NicConfig, NicModel, SerialTarget};
use crate::console;
use crate::cpuid;
use crate::host::HostKind;
use crate::io_thread::{IoThread, Subscriber};
use crate::irqchip::KvmIrqChip;
use crate::layout::*;
use crate::mptable;
use crate::netdev::{self, NetdevGuard, OpenError};
use crate::snapshot::Saver;
use crate::vcpu::{self, Buses, VcpuThread};
use devices::bus::Bus;
use devices::e1000::E1000;
use devices::interrupt::{IntxLine, IrqChip};
use devices::legacy::{Cmos, Serial, I8042};
use devices::lifecycle::{ExitReason, Lifecycle};
use devices::net::{NetPort, Nic, NicControl, NicStats};
use devices::pci::{self, BarKind, HostBridge, PciConfigIo, PciDevice, PciRoot, PciWindow};
use devices::pvpanic::PvPanic;
use devices::rtl8139::Rtl8139;
use devices::virtio::net::{VirtioNet, VirtioNetOptions};
use devices::virtio::IoEventRegistry;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Why a VM could not be built: one line, printed before the guest runs (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("-cpu: {0}")]
    Cpu(String),
    #[error("/dev/kvm: cannot open ({0}); is KVM available and are you allowed to use it?")]
    NoKvm(kvm_ioctls::Error),
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("-m: {mib} MiB is more than this host's {host} MiB of RAM")]
    MoreThanHost { mib: u64, host: u64 },
    #[error("-m: {0} MiB is too small for Linux (at least 16M)")]
    TooSmall(u64),
    #[error("-m: cannot allocate {mib} MiB of guest RAM: {source}")]
    Memory {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest memory: {0}")]
    HostAddress(vm_memory::GuestMemoryError),
    #[error("-kernel: cannot open {0}: {1}")]
    Kernel(PathBuf, std::io::Error),
    #[error("-initrd: cannot read {0}: {1}")]
    Initrd(PathBuf, std::io::Error),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Netdev(#[from] OpenError),
    #[error("-serial: cannot create {0}: {1}")]
    Serial(PathBuf, std::io::Error),
    #[error("-serial: {0}")]
    SerialIo(std::io::Error),
    #[error("-object filter-dump,id={id}: cannot create {path}: {source}")]
    Dump {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("-device {model}: {source}")]
    Device {
        model: &'static str,
        source: std::io::Error,
    },
    #[error("-device {model}: {source}")]
    Slot {
        model: &'static str,
        source: devices::pci::SlotError,
    },
    #[error("no free PCI slot for another NIC")]
    NoSlot,
    #[error("too many PCI devices: the BAR window is full")]
    BarsFull,
    #[error("{0}")]
    Bus(#[from] devices::bus::BusError),
    #[error("MP table: {0}")]
    MpTable(vm_memory::GuestMemoryError),
    #[error("-smp: cannot create vCPU {0}: {1}")]
    Vcpu(u8, kvm_ioctls::Error),
    #[error(transparent)]
    VcpuSetup(#[from] vcpu::SetupError),
    /// A host resource: a thread, an eventfd, the interrupt routing table.
    #[error("{0}: {1}")]
    Host(&'static str, std::io::Error),
    #[error("-incoming: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("-save-on: {0}")]
    SaveOn(crate::snapshot::SnapshotError),
    #[error("-incoming: {0}: {1}")]
    Restore(PathBuf, String),
}

const COM1_PORT: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;
const CMOS_PORT: u64 = 0x70;
const PCI_CONFIG_PORT: u64 = 0xcf8;

/// Queue doorbells as KVM ioeventfds: a guest kick wakes the I/O thread without a vCPU exit
/// to userspace.
struct KvmIoEvents(Arc<VmFd>);

impl IoEventRegistry for KvmIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(std::io::Error::from)
    }
    fn unregister(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(std::io::Error::from)
    }
}

fn host_ram_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Checks what can be checked without KVM: files and sizes.
pub fn validate(cfg: &Config) -> Result<(), VmError> {
    let mem = cfg.mem_mib << 20;
    if let Some(host) = host_ram_bytes() {
        if mem > host {
            return Err(VmError::MoreThanHost {
                mib: cfg.mem_mib,
                host: host >> 20,
            });
        }
    }
    if mem < 16 << 20 {
        return Err(VmError::TooSmall(cfg.mem_mib));
    }
    if let Some(so) = &cfg.save_on {
        crate::snapshot::check_writable(&so.file).map_err(VmError::SaveOn)?;
    }
    if let Some(p) = &cfg.incoming {
        // The kernel and initramfs are in the snapshot; a file that is not one is refused
        // here, before KVM is opened (Vm::new reads the rest).
        crate::snapshot::IncomingHeader::open(p)?;
        return Ok(());
    }
    crate::open::regular_file(&cfg.kernel).map_err(|e| VmError::Kernel(cfg.kernel.clone(), e))?;
    if let Some(i) = &cfg.initrd {
        crate::open::regular_file(i).map_err(|e| VmError::Initrd(i.clone(), e))?;
    }
    Ok(())
}

/// Places every BAR of `dev` from the running allocators, as firmware would.
pub fn assign_bars(
    dev: &mut dyn PciDevice,
    io_next: &mut u64,
    mmio_next: &mut u64,
) -> Result<(), VmError> {
    for bar in 0..6 {
        let (Some(kind), Some(size)) = (dev.config().bar_kind(bar), dev.config().bar_size(bar))
        else {
            continue;
        };
        let (next, end) = match kind {
            BarKind::Io => (io_next as &mut u64, PCI_IO_START + PCI_IO_SIZE),
            _ => (mmio_next as &mut u64, PCI_MMIO_START + PCI_MMIO_SIZE),
        };
        let addr = next.next_multiple_of(size);
        if addr + size > end {
            return Err(VmError::BarsFull);
        }
        dev.config_mut().set_bar_addr(bar, addr);
        *next = addr + size;
    }
    Ok(())
}

/// A NIC model on its port, seen three ways: the PCI function the buses dispatch to, the
/// workers the I/O threads drive (one per queue of the port), and its counters. One object,
/// one lock (and one per port queue for its backend's system calls).
struct NicParts {
    pci: Arc<Mutex<dyn PciDevice>>,
    workers: Vec<Subscriber>,
    counters: Counters,
    control: Arc<Mutex<dyn NicControl>>,
    /// The backend as `info network` shows it (see `netdev::Opened::info`).
    backend_info: Option<String>,
}

type Counters = Box<dyn Fn() -> NicStats + Send>;

fn nic_parts<M: devices::net::NicModel>(model: M, port: NetPort) -> NicParts {
    let nic = Arc::new(Mutex::new(Nic::new(model, port)));
    let counted = nic.clone();
    NicParts {
        pci: nic.clone(),
        control: nic.clone(),
        workers: Nic::workers(&nic)
            .into_iter()
            .map(|w| Box::new(w) as Subscriber)
            .collect(),
        counters: Box::new(move || match counted.lock() {
            Ok(n) => n.stats(),
            Err(poisoned) => poisoned.into_inner().stats(),
        }),
        backend_info: None,
    }
}

/// A NIC whose counters NICVM_STATS reports.
struct CountedNic {
    config: NicConfig,
    backend: &'static str,
    backend_info: Option<String>,
    counters: Counters,
    slot: u8,
    control: Arc<Mutex<dyn NicControl>>,
}

#[derive(Clone, Copy)]
pub struct Timing {
    pub start: Instant,
    pub enabled: bool,
}

impl Timing {
    pub fn mark(&self, what: &str) {
        if self.enabled {
            crate::say!(
                "nicvm-timing: {what} {:.4}\r",
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// The netdevs' guards, undone newest first when dropped.
#[derive(Default)]
struct Guards(Vec<NetdevGuard>);

impl Drop for Guards {
    fn drop(&mut self) {
        while let Some(g) = self.0.pop() {
            drop(g);
        }
    }
}

/// Files the set-up created (a capture, a serial log) that did not exist before: removed if
/// the set-up fails later, kept once the VM is built.
#[derive(Default)]
struct NewFiles(Vec<PathBuf>);

impl NewFiles {
    /// Notes `path` as about to be created by nicvm, unless it exists already.
    fn creating(&mut self, path: &std::path::Path) {
        if !path.exists() {
            self.0.push(path.to_path_buf());
        }
    }

    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for NewFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A console thread feeding the guest's serial port from stdin; stopped through its eventfd.
struct ConsoleThread {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ConsoleThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            // It may be writing the monitor's text to a stdout nobody reads: not waited for
            // longer than a second (the exit ends it).
            let t0 = std::time::Instant::now();
            while !t.is_finished() && t0.elapsed() < std::time::Duration::from_secs(1) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        console::restore_terminal();
    }
}

/// What the monitor acts on (see [`Vm::monitor_parts`]).
pub struct MonitorParts {
    pub nics: Vec<crate::monitor::NicEntry>,
    /// The vCPU threads, for kicking them into a pause.
    pub vcpus: Arc<Mutex<Vec<libc::pthread_t>>>,
    /// The netdevs no NIC uses, by id (the first queue of each).
    pub peerless: Vec<(String, crate::peerless::Shared)>,
}

pub struct Vm {
    // Fields drop in this order: the threads first (stopped and joined), then the devices
    // and their backends, then the netdevs' guards (downscripts), last of all KVM.
    vcpu_threads: Vec<VcpuThread>,
    /// The thread still filling in the kernel's pages, if any (joined after the vCPUs).
    kernel_loader: Option<boot::KernelLoader>,
    io: Vec<IoThread>,
    console: Option<ConsoleThread>,
    /// The serial port on a socket or a pty, and its thread.
    serial_io: Option<crate::serial_io::SerialIo>,
    /// Set up, not yet running (taken by `run`).
    vcpus: Vec<VcpuFd>,
    /// Per I/O thread (one per port queue index), the NIC queues it drives.
    subscribers: Vec<Vec<Subscriber>>,
    nics: Vec<CountedNic>,
    buses: Arc<Buses>,
    serial: Arc<Mutex<Serial>>,
    serial_target: SerialTarget,
    /// Config::stdio_signals.
    stdio_signals: bool,
    mem: GuestMemoryMmap,
    /// Held for what its Drop does: the netdevs' downscripts and files, after the devices.
    _guards: Guards,
    /// The netdevs no NIC uses (the first queue of each), by id: kept running (the I/O
    /// thread drains them), asked by the monitor (a user network's table and forwards).
    /// After the guards: a tap is still there while its downscript runs, as a NIC's is
    /// (the saver holds those).
    peerless: Vec<(String, crate::peerless::Shared)>,
    lifecycle: Arc<Lifecycle>,
    timing: Timing,
    /// The running vCPU threads, for the monitor's pause; emptied before they are joined.
    vcpu_pthreads: Arc<Mutex<Vec<libc::pthread_t>>>,
    /// The monitor on the console (`-serial mon:stdio`), if any.
    console_monitor: Option<Arc<crate::monitor::Control>>,
    /// The console starts with the monitor (else with the guest's serial port; Ctrl-a c
    /// switches).
    console_monitor_first: bool,
    /// What a snapshot is taken of (QMP migrate, -save-on).
    saver: Arc<Saver>,
    /// `-save-on`: told by the console watch when the guest wrote the text.
    save_on: Option<(std::sync::mpsc::Receiver<()>, PathBuf)>,
    save_thread: Option<std::thread::JoinHandle<()>>,
    /// `-incoming`: the thread holding the lease on the snapshot file (see
    /// `crate::ram_lease`); dropped once nothing uses the file's pages any more.
    lease_thread: Option<crate::ram_lease::LeaseThread>,
    _vm: Arc<VmFd>,
}

impl Vm {
    /// Builds the VM; nothing of the guest runs yet. On an error everything already made is
    /// undone before this returns.
    pub fn new(
        cfg: &Config,
        host: HostKind,
        timing: Timing,
        lifecycle: Arc<Lifecycle>,
    ) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?,
        );
        // A restored guest's RAM is the snapshot's, mapped copy-on-write from the header alone
        // (a RAM size other than saved is reported from the state, read after).
        let incoming_head = match &cfg.incoming {
            Some(p) => Some(crate::snapshot::IncomingHeader::open(p)?),
            None => None,
        };
        if incoming_head.is_some() {
            crate::ram_lease::report_sigbus();
        }
        let mem = match &incoming_head {
            Some(head) => head.map_memory(&ram_ranges(cfg.mem_mib)),
            None => Ok(guest_memory(cfg.mem_mib)?),
        };
        // Taken at once: from here on a writer of the file waits for RAM to leave it. Watched
        // once the state is read (a writer let through earlier would change it under the read).
        let ram_lease = incoming_head.as_ref().and_then(|h| h.lease());
        // RAM goes to KVM before the interrupt controller exists: a memory slot made after
        // KVM_CREATE_IRQCHIP waits out a grace period (6-8 ms measured on kvm_pvm), one made
        // before it takes 0.1-0.3 ms.
        if let Ok(mem) = &mem {
            register_memory(&vm, mem)?;
        }
        if let Err(e) = vm.set_tss_address(0xfffb_d000) {
            log::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        vm.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
        let incoming = match incoming_head {
            Some(head) => {
                let inc = head.read()?;
                let cpu = cpuid::describe(&cfg.cpu_features);
                inc.check_size(host.describe(), cfg.mem_mib, cfg.cpus, &cpu)?;
                timing.mark("snapshot-read");
                Some(inc)
            }
            None => None,
        };
        let mem = mem?;
        let vcpu_pthreads = Arc::new(Mutex::new(vec![]));
        let lease_thread = match ram_lease {
            Some(lease) => Some(
                crate::ram_lease::LeaseThread::spawn(
                    lease,
                    mem.clone(),
                    lifecycle.clone(),
                    Arc::clone(&vcpu_pthreads),
                )
                .map_err(|e| VmError::Host("snapshot lease thread", e))?,
            ),
            None => None,
        };
        let chip: Arc<dyn IrqChip> = Arc::new(
            KvmIrqChip::new(vm.clone()).map_err(|e| VmError::Host("KVM_SET_GSI_ROUTING", e))?,
        );
        timing.mark("vm-and-memory");

        // Legacy devices.
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let com1_irq =
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|e| VmError::Host("eventfd", e))?;
        vm.register_irqfd(&com1_irq, COM1_IRQ)
            .map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
        let mut new_files = NewFiles::default();
        let mut serial_io = None;
        let out: Box<dyn Write + Send> = match &cfg.serial {
            SerialTarget::Stdio => Box::new(console::Stdout),
            SerialTarget::File(p) => {
                new_files.creating(p);
                Box::new(
                    crate::open::create_in_setup(p).map_err(|e| VmError::Serial(p.clone(), e))?,
                )
            }
            SerialTarget::None => Box::new(std::io::sink()),
            SerialTarget::Socket { at, telnet } => {
                let io =
                    crate::serial_io::SerialIo::socket(at, *telnet).map_err(VmError::SerialIo)?;
                let w = io.writer();
                serial_io = Some(io);
                w
            }
            SerialTarget::Pty => {
                let io = crate::serial_io::SerialIo::pty().map_err(VmError::SerialIo)?;
                let w = io.writer();
                serial_io = Some(io);
                w
            }
        };
        let (out, save_on) = match &cfg.save_on {
            Some(so) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let l = lifecycle.clone();
                let watch = ConsoleWatch::new(out, so.console.as_bytes(), move || {
                    // The vCPU writing the text stops before its next instruction.
                    l.set_paused(true);
                    let _ = tx.send(());
                });
                (
                    Box::new(watch) as Box<dyn Write + Send>,
                    Some((rx, so.file.clone())),
                )
            }
            None => (out, None),
        };
        let serial = Arc::new(Mutex::new(Serial::new(com1_irq, out)));
        pio.insert(COM1_PORT, 8, serial.clone())?;
        let i8042 = Arc::new(Mutex::new(I8042::new(lifecycle.clone())));
        pio.insert(I8042_PORT, 5, i8042.clone())?;
        let cmos = Arc::new(Mutex::new(Cmos::default()));
        pio.insert(CMOS_PORT, 2, cmos.clone())?;

        // PCI: the NICs in the slots QEMU's board leaves them (config::nic_slots), each with
        // its netdev opened here; pvpanic after.
        let mut guards = Guards::default();
        let mut root = PciRoot::new();
        let (mut io_next, mut mmio_next) = (PCI_IO_START, PCI_MMIO_START);
        root.add(0, Arc::new(Mutex::new(HostBridge::default())))
            .map_err(|source| VmError::Slot {
                model: "host bridge",
                source,
            })?;
        let ioevents: Arc<dyn IoEventRegistry> = Arc::new(KvmIoEvents(vm.clone()));
        let mut subscribers = vec![];
        let mut nics = vec![];
        let slots =
            crate::config::nic_slots(&cfg.nics, cfg.board_slots).map_err(|_| VmError::NoSlot)?;
        for (spec, slot) in cfg.nics.iter().zip(slots) {
            if let Some(d) = cfg.dumps.iter().find(|d| spec.is_on(&d.netdev)) {
                new_files.creating(&d.file);
            }
            let parts = build_nic(cfg, spec, slot, &mem, &chip, &ioevents, &mut guards)?;
            let control = parts.control.clone();
            assign_bars(
                &mut *parts.pci.lock().unwrap(),
                &mut io_next,
                &mut mmio_next,
            )?;
            root.add(slot, parts.pci).map_err(|source| VmError::Slot {
                model: spec.model.name(),
                source,
            })?;
            let backend = match &spec.netdev {
                Some(id) => cfg.netdev(id).expect("checked by the CLI").backend.kind(),
                None => "none",
            };
            nics.push(CountedNic {
                config: spec.clone(),
                backend,
                backend_info: parts.backend_info,
                counters: parts.counters,
                slot,
                control,
            });
            // The I/O thread of queue q drives queue q of every NIC that has one.
            for (q, w) in parts.workers.into_iter().enumerate() {
                if subscribers.len() <= q {
                    subscribers.push(vec![]);
                }
                subscribers[q].push(w);
            }
        }
        // As QEMU: a netdev no NIC uses is opened and kept running (its forwards listen, its
        // tap exists), what it receives read and dropped. QEMU drops it before its filters
        // see it: a capture of it is made, and holds no frame.
        let mut peerless = vec![];
        for nd in cfg.netdevs_without_peer() {
            if let Some(d) = cfg.dumps.iter().find(|d| d.netdev == nd.id) {
                new_files.creating(&d.file);
                let dump_err = |source| VmError::Dump {
                    id: d.id.clone(),
                    path: d.file.clone(),
                    source,
                };
                let file = crate::open::create_in_setup(&d.file).map_err(dump_err)?;
                net_backends::pcap::empty_capture(file, d.maxlen).map_err(dump_err)?;
            }
            let opened = netdev::open(nd)?;
            guards.0.push(opened.guard);
            let mut queues = vec![opened.backend];
            queues.extend(opened.more_queues);
            let shared: Vec<crate::peerless::Shared> = queues
                .into_iter()
                .map(|b| Arc::new(Mutex::new(b)))
                .collect();
            if subscribers.is_empty() {
                subscribers.push(vec![]);
            }
            subscribers[0].extend(crate::peerless::subscribers(&nd.id, &shared));
            peerless.push((nd.id.clone(), shared[0].clone()));
        }
        timing.mark("nics-and-netdevs");
        let mut panic_dev = PvPanic::new(lifecycle.clone());
        assign_bars(&mut panic_dev, &mut io_next, &mut mmio_next)?;
        let slot = root.first_free_slot().ok_or(VmError::NoSlot)?;
        root.add(slot, Arc::new(Mutex::new(panic_dev)))
            .map_err(|source| VmError::Slot {
                model: "pvpanic",
                source,
            })?;
        let root = Arc::new(root);
        pio.insert(PCI_CONFIG_PORT, 8, Arc::new(PciConfigIo(root.clone())))?;
        let window = |io: bool, base: u64| {
            Arc::new(PciWindow {
                root: root.clone(),
                io,
                base,
            })
        };
        pio.insert(PCI_IO_START, PCI_IO_SIZE, window(true, PCI_IO_START))?;
        mmio.insert(PCI_MMIO_START, PCI_MMIO_SIZE, window(false, PCI_MMIO_START))?;

        let shape = crate::snapshot::MachineShape {
            host: host.describe().into(),
            mem_mib: cfg.mem_mib,
            cpus: cfg.cpus,
            cpu: cpuid::describe(&cfg.cpu_features),
            nics: nics
                .iter()
                .map(|n| {
                    let c = &n.config;
                    (c.model.name().to_string(), c.mac.to_string(), n.slot)
                })
                .collect(),
        };
        let mut kernel_loader = None;
        let entry = match &incoming {
            Some(inc) => {
                inc.check_shape(&shape)?;
                None
            }
            None => {
                let apic_ids: Vec<u8> = (0..cfg.cpus)
                    .map(|i| cfg.topology.apic_id(i) as u8)
                    .collect();
                let mp = mptable::build(MPTABLE_START as u32, &apic_ids, pci::intx_gsi);
                vm_memory::Bytes::write_slice(&mem, &mp, GuestAddress(MPTABLE_START))
                    .map_err(VmError::MpTable)?;
                let l = lifecycle.clone();
                let t = timing;
                let later = boot::Later {
                    failed: Box::new(move |e| l.request_exit(ExitReason::Error(e))),
                    done: Box::new(move || t.mark("kernel-in-memory")),
                };
                let (entry, loader) = boot::load(
                    &mem,
                    cfg.mem_mib << 20,
                    &cfg.kernel,
                    cfg.initrd.as_deref(),
                    &cfg.append,
                    later,
                )?;
                kernel_loader = Some(loader);
                log::debug!("entry {:?} at {:#x}", entry.mode, entry.rip);
                timing.mark("kernel-loaded");
                Some(entry)
            }
        };
        // vCPUs and a snapshot's state need no memory slot (except MSRs that point into guest
        // RAM: below), so they are set up while KVM makes RAM live.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let host_cpu = cpuid::HostCpu::probe(&kvm);
        log::debug!("KVM_CAP_TSC_DEADLINE_TIMER: {}", host_cpu.tsc_deadline);
        let mut vcpus = vec![];
        for id in 0..cfg.cpus {
            // KVM makes the vCPU's id its APIC ID.
            let v = vm
                .create_vcpu(u64::from(cfg.topology.apic_id(id)))
                .map_err(|e| VmError::Vcpu(id, e))?;
            let table = cpuid::for_vcpu(&supported, id, &cfg.topology, host, &host_cpu);
            let (table, warnings) = cpuid::set_features(table, &cfg.cpu_features, cfg.cpu_missing)
                .map_err(VmError::Cpu)?;
            if id == 0 {
                for w in warnings {
                    log::warn!("-cpu: {w}");
                }
                if let Some(w) = cpuid::threads_unseen(&table, &cfg.topology) {
                    log::warn!("-smp: {w}");
                }
            }
            for e in table.as_slice() {
                log::trace!(
                    "cpuid {:#x}.{}: {:08x} {:08x} {:08x} {:08x}",
                    e.function,
                    e.index,
                    e.eax,
                    e.ebx,
                    e.ecx,
                    e.edx
                );
            }
            vcpu::setup_vcpu_common(&v, &table)?;
            match (&incoming, entry) {
                (Some(inc), _) => inc.state.vcpus[id as usize]
                    .apply_registers(&v)
                    .map_err(|e| VmError::Restore(inc.path().into(), format!("vCPU {id}: {e}")))?,
                (None, Some(entry)) if id == 0 => vcpu::setup_boot_vcpu(&v, &mem, entry)?,
                _ => {}
            }
            vcpus.push(v);
        }
        if let Some(inc) = &incoming {
            let restore_err = |e: String| VmError::Restore(inc.path().into(), e);
            // The irqchip first: devices that restore an asserted line drive it into the
            // restored IOAPIC.
            inc.state.vm.apply(&vm).map_err(restore_err)?;
            let d = &inc.state.devices;
            root.restore(&d.pci)
                .map_err(|e| restore_err(e.to_string()))?;
            serial
                .lock()
                .unwrap()
                .restore(&d.serial)
                .map_err(|e| restore_err(format!("serial port: {e}")))?;
            i8042
                .lock()
                .unwrap()
                .restore(&d.i8042)
                .map_err(|e| restore_err(format!("i8042: {e}")))?;
            cmos.lock()
                .unwrap()
                .restore(&d.cmos)
                .map_err(|e| restore_err(format!("CMOS: {e}")))?;
        }
        if let Some(inc) = &incoming {
            // MSRs last: some (kvm-clock, PV EOI, async PF) name guest RAM, which KVM
            // checks against its memory slots.
            for (id, v) in vcpus.iter().enumerate() {
                inc.state.vcpus[id]
                    .apply_msrs_and_events(v)
                    .map_err(|e| VmError::Restore(inc.path().into(), format!("vCPU {id}: {e}")))?;
            }
            timing.mark("snapshot-restored");
        }
        let msrs = match kvm.get_msr_index_list() {
            Ok(l) => l.as_slice().to_vec(),
            Err(e) => {
                log::warn!("KVM_GET_MSR_INDEX_LIST: {e}; snapshots will not include MSRs");
                vec![]
            }
        };
        let saver = Arc::new(Saver {
            vm: vm.clone(),
            mem: mem.clone(),
            root: root.clone(),
            serial: serial.clone(),
            i8042,
            cmos,
            pause: Arc::new(vcpu::PauseStates {
                states: crate::snapshot::VcpuStates::new(cfg.cpus as usize),
                msrs,
            }),
            lifecycle: lifecycle.clone(),
            shape,
            saving: Mutex::new(()),
        });
        new_files.keep();
        Ok(Vm {
            vcpu_threads: vec![],
            kernel_loader,
            io: vec![],
            console: None,
            serial_io,
            vcpus,
            subscribers,
            nics,
            buses: Arc::new(Buses { pio, mmio }),
            serial,
            serial_target: cfg.serial.clone(),
            stdio_signals: cfg.stdio_signals,
            mem,
            peerless,
            _guards: guards,
            lifecycle,
            timing,
            vcpu_pthreads,
            console_monitor: None,
            console_monitor_first: false,
            saver,
            save_on,
            save_thread: None,
            lease_thread,
            _vm: vm,
        })
    }

    /// What the monitor needs: the NICs, the vCPU threads, the netdevs no NIC uses.
    pub fn monitor_parts(&self) -> MonitorParts {
        let nics = self
            .nics
            .iter()
            .map(|n| crate::monitor::NicEntry {
                config: n.config.clone(),
                slot: n.slot,
                control: n.control.clone(),
                backend_info: n.backend_info.clone(),
            })
            .collect();
        MonitorParts {
            nics,
            vcpus: self.vcpu_pthreads.clone(),
            peerless: self.peerless.clone(),
        }
    }

    /// The serial port's listening socket, if it is on one.
    pub fn serial_listener(&self) -> Option<std::os::fd::RawFd> {
        self.serial_io.as_ref()?.listener_fd()
    }

    /// Takes a client waiting on the serial port's socket now, before the guest runs.
    pub fn accept_serial_client(&self) {
        if let Some(s) = &self.serial_io {
            s.accept_waiting();
        }
    }

    /// What QMP's migrate saves.
    pub fn saver(&self) -> Arc<Saver> {
        self.saver.clone()
    }

    /// The console's monitor (`-serial mon:stdio`, `-monitor stdio`): Ctrl-a c switches to it.
    pub fn set_console_monitor(&mut self, control: Arc<crate::monitor::Control>, first: bool) {
        self.console_monitor = Some(control);
        self.console_monitor_first = first;
    }

    /// Runs the guest until it ends, a signal arrives or the user quits, and says why. The
    /// threads are stopped before this returns. A guest held after shutting down
    /// (`-no-shutdown`) has not ended: `on_held` is called when that happens.
    pub fn run(
        &mut self,
        signals: &crate::signals::SignalFd,
        on_held: &mut dyn FnMut(),
    ) -> ExitReason {
        if let Err(e) = self.start() {
            self.lifecycle
                .request_exit(ExitReason::Error(e.to_string()));
        }
        let reason = crate::signals::wait_for_exit(&self.lifecycle, signals, on_held);
        self.stop();
        if let Some(path) = std::env::var_os("NICVM_STATS") {
            let json = stats_json(&self.nics, self.timing.start.elapsed().as_secs_f64());
            if let Err(e) = std::fs::write(&path, json) {
                log::warn!("NICVM_STATS: cannot write {}: {e}", path.to_string_lossy());
            }
        }
        reason
    }

    fn start(&mut self) -> Result<(), VmError> {
        // Before any thread that touches guest RAM (the I/O threads, the vCPUs) starts: from
        // now on RAM moves with the devices held.
        if let Some(l) = &self.lease_thread {
            l.guest_starts(self.saver.clone());
        }
        // The console thread: for a serial console on stdio, and for a monitor there
        // (`-monitor stdio` with the serial port elsewhere: the monitor has the console).
        if self.serial_target == SerialTarget::Stdio || self.console_monitor.is_some() {
            let tty = console::stdin_is_tty();
            let reader = match self.console_monitor.clone() {
                None => console::StdinFor::Guest {
                    escapes: tty && !self.stdio_signals,
                },
                Some(monitor) if self.serial_target == SerialTarget::Stdio => {
                    console::StdinFor::Shared {
                        monitor,
                        monitor_first: self.console_monitor_first,
                    }
                }
                Some(monitor) => console::StdinFor::Monitor(monitor),
            };
            if tty {
                if let Err(e) = console::enter_raw_mode(self.stdio_signals) {
                    log::warn!("cannot put the terminal in raw mode: {e}");
                }
            }
            let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
                .map_err(|e| VmError::Host("eventfd", e))?;
            let thread_stop = stop.try_clone().map_err(|e| VmError::Host("eventfd", e))?;
            let (s, l) = (self.serial.clone(), self.lifecycle.clone());
            let thread = std::thread::Builder::new()
                .name("console".into())
                .spawn(move || console::pump_stdin(s, l, thread_stop, reader))
                .map_err(|e| VmError::Host("console thread", e))?;
            self.console = Some(ConsoleThread {
                stop,
                thread: Some(thread),
            });
        }
        if let Some(s) = &mut self.serial_io {
            s.start(self.serial.clone())
                .map_err(|e| VmError::Host("serial thread", e))?;
        }
        for (i, subscribers) in std::mem::take(&mut self.subscribers)
            .into_iter()
            .enumerate()
        {
            let t = IoThread::spawn(i, subscribers).map_err(|e| VmError::Host("I/O thread", e))?;
            self.io.push(t);
        }
        self.timing.mark("vcpu-start");
        for (id, v) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let t = VcpuThread::spawn(
                id as u8,
                v,
                self.mem.clone(),
                self.buses.clone(),
                self.lifecycle.clone(),
                self.saver.pause.clone(),
            )
            .map_err(|e| VmError::Host("vCPU thread", e))?;
            self.vcpu_pthreads.lock().unwrap().push(t.pthread());
            self.vcpu_threads.push(t);
        }
        if let Some((rx, path)) = self.save_on.take() {
            let (saver, lifecycle) = (self.saver.clone(), self.lifecycle.clone());
            let pthreads = self.vcpu_pthreads.clone();
            let t = std::thread::Builder::new()
                .name("save-on".into())
                .spawn(move || save_on_console(rx, &path, &saver, &lifecycle, &pthreads))
                .map_err(|e| VmError::Host("-save-on thread", e))?;
            self.save_thread = Some(t);
        }
        Ok(())
    }

    /// Stops and joins every thread: vCPUs first (no more guest accesses), then the I/O
    /// thread, then the console. Safe to call more than once.
    fn stop(&mut self) {
        self.lifecycle
            .request_exit(ExitReason::Error("the VM was stopped".into()));
        // No kick from the monitor reaches a thread once it may have been joined.
        self.vcpu_pthreads.lock().unwrap().clear();
        for t in self.vcpu_threads.drain(..) {
            t.stop();
        }
        // After a snapshot being written (-save-on, or a monitor's migrate) has read every
        // page it needs: the loader, dropped, stops filling them in.
        if let Some(t) = self.save_thread.take() {
            let _ = t.join();
        }
        drop(self.saver.saving.lock());
        self.kernel_loader = None;
        self.io.clear();
        // Nothing reads or writes guest RAM any more: the snapshot file may change now.
        self.lease_thread = None;
        self.console = None;
        self.serial_io = None;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `backend`, the netdev `id`'s, wrapped in its capture (`-object filter-dump`) if it has one.
fn with_capture(
    cfg: &Config,
    id: &str,
    backend: Box<dyn net_backends::NetBackend>,
) -> Result<Box<dyn net_backends::NetBackend>, VmError> {
    let Some(d) = cfg.dumps.iter().find(|d| d.netdev == id) else {
        return Ok(backend);
    };
    let dump_err = |source| VmError::Dump {
        id: d.id.clone(),
        path: d.file.clone(),
        source,
    };
    let file = crate::open::create_in_setup(&d.file).map_err(dump_err)?;
    Ok(Box::new(
        net_backends::pcap::PcapDump::new(backend, file, d.maxlen).map_err(dump_err)?,
    ))
}

/// Opens the netdev of `spec` (its guard joins `guards`), wraps it in a capture when asked,
/// and builds the NIC on it.
fn build_nic(
    cfg: &Config,
    spec: &NicConfig,
    slot: u8,
    mem: &GuestMemoryMmap,
    chip: &Arc<dyn IrqChip>,
    ioevents: &Arc<dyn IoEventRegistry>,
    guards: &mut Guards,
) -> Result<NicParts, VmError> {
    let (backend, more_queues, info) = match &spec.netdev {
        Some(id) => {
            let nd = cfg.netdev(id).expect("checked by the CLI");
            let opened = netdev::open(nd)?;
            guards.0.push(opened.guard);
            log::debug!(
                "{} {} on slot {slot} backed by {}",
                spec.model.name(),
                spec.mac,
                opened.label
            );
            let backend = with_capture(cfg, &nd.id, opened.backend)?;
            (backend, opened.more_queues, opened.info)
        }
        None => {
            let none: Box<dyn net_backends::NetBackend> =
                Box::new(net_backends::nopeer::NoPeer::default());
            (none, vec![], None)
        }
    };
    // Slots share IOAPIC pins (3 and 11 both reach GSI 19): each device drives the line under
    // its own source id, its slot, and the chip ORs them.
    let intx = IntxLine::new(chip.clone(), pci::intx_gsi(slot, 0), slot as u32);
    let model = spec.model.name();
    let device = |source| VmError::Device { model, source };
    let mut backends = vec![backend];
    backends.extend(more_queues);
    let port = NetPort::with_queues(format!("{model} {}", spec.mac), backends).map_err(device)?;
    let mem = mem.clone();
    let mut parts = match spec.model {
        NicModel::VirtioNetPci => {
            let caps = port.capabilities();
            let opts = VirtioNetOptions {
                queue_pairs: port.queue_count(),
                mq: spec.mq,
                ctrl_vq: spec.ctrl_vq,
                mrg_rxbuf: spec.mrg_rxbuf,
                vectors: spec.vectors,
                withheld: spec.withheld,
                mtu: spec.mtu,
            };
            let m = VirtioNet::new(
                spec.mac,
                caps,
                mem,
                chip.clone(),
                intx,
                ioevents.clone(),
                opts,
            )
            .map_err(device)?;
            nic_parts(m, port)
        }
        NicModel::Rtl8139 { cplus } => nic_parts(
            Rtl8139::new(spec.mac, mem, intx, cplus).map_err(device)?,
            port,
        ),
        NicModel::E1000 => nic_parts(E1000::new(spec.mac, mem, intx).map_err(device)?, port),
    };
    parts.backend_info = info;
    Ok(parts)
}

/// Where guest RAM lies: below and above the MMIO hole.
fn ram_ranges(mib: u64) -> Vec<(GuestAddress, usize)> {
    ram_regions(mib << 20)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect()
}

/// Guest RAM, mapped (not yet registered with KVM).
fn guest_memory(mib: u64) -> Result<GuestMemoryMmap, VmError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(mib)).map_err(|source| VmError::Memory { mib, source })
}

/// `-save-on`: waits for the console watch, stops the vCPUs, writes the snapshot and ends
/// the VM (exit status 0 once written, 3 if it could not be).
fn save_on_console(
    rx: std::sync::mpsc::Receiver<()>,
    path: &std::path::Path,
    saver: &Saver,
    lifecycle: &Lifecycle,
    pthreads: &Mutex<Vec<libc::pthread_t>>,
) {
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(()) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !lifecycle.exit_requested() => {}
            Err(_) => return,
        }
    }
    // Held from the pause on: guest RAM leaving its snapshot file meanwhile would resume
    // the vCPUs after it (see crate::ram_lease).
    let held = saver.saving.lock().unwrap();
    if !vcpu::pause_all(lifecycle, pthreads, saver.shape.cpus.into()) && lifecycle.exit_requested()
    {
        return; // ended meanwhile: nothing to save
    }
    lifecycle.request_exit(match saver.save_holding(&held, path) {
        Ok(()) => ExitReason::User(format!("-save-on: snapshot written to {}", path.display())),
        Err(e) => ExitReason::Error(format!("-save-on: {e}")),
    });
}

/// The serial port's output, passed on whole, watched for a text: `on_match` runs once,
/// on the vCPU thread that wrote the text's last byte.
struct ConsoleWatch {
    inner: Box<dyn Write + Send>,
    text: Vec<u8>,
    /// The last bytes written, at most the text's length.
    tail: std::collections::VecDeque<u8>,
    on_match: Option<Box<dyn FnOnce() + Send>>,
}

impl ConsoleWatch {
    fn new(
        inner: Box<dyn Write + Send>,
        text: &[u8],
        on_match: impl FnOnce() + Send + 'static,
    ) -> ConsoleWatch {
        ConsoleWatch {
            inner,
            text: text.to_vec(),
            tail: std::collections::VecDeque::with_capacity(text.len()),
            on_match: Some(Box::new(on_match)),
        }
    }
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.on_match.is_some() {
            for &b in &buf[..n] {
                if self.tail.len() == self.text.len() {
                    self.tail.pop_front();
                }
                self.tail.push_back(b);
                if self.tail.iter().eq(self.text.iter()) {
                    if let Some(f) = self.on_match.take() {
                        f();
                    }
                    break;
                }
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Registers guest RAM with KVM, one slot per region.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(VmError::HostAddress)?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, a handle to the Vm's memory,
        // which the Vm keeps until after its vCPU threads are joined; the slots do not
        // overlap.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct StatsRow<'a> {
    model: &'static str,
    /// None for a NIC without a peer.
    netdev: Option<&'a str>,
    backend: &'static str,
    mac: String,
    tx_frames: u64,
    rx_frames: u64,
    tx_bytes: u64,
    rx_bytes: u64,
    interrupts: u64,
    rx_dropped: u64,
    backend_dropped: u64,
}

/// `NICVM_STATS=PATH`: at exit, one JSON object with nicvm's run time and, per NIC, what it is
/// and its counters (for scripts/bench).
fn stats_json(nics: &[CountedNic], seconds: f64) -> String {
    let rows: Vec<StatsRow> = nics
        .iter()
        .map(|n| {
            let s = (n.counters)();
            StatsRow {
                model: match n.config.model {
                    NicModel::Rtl8139 { cplus: false } => "rtl8139,cplus=off",
                    m => m.name(),
                },
                netdev: n.config.netdev.as_deref(),
                backend: n.backend,
                mac: n.config.mac.to_string(),
                tx_frames: s.tx_frames,
                rx_frames: s.rx_frames,
                tx_bytes: s.tx_bytes,
                rx_bytes: s.rx_bytes,
                interrupts: s.interrupts,
                rx_dropped: s.rx_dropped,
                backend_dropped: s.backend_dropped,
            }
        })
        .collect();
    let seconds = (seconds * 1000.0).round() / 1000.0;
    let mut json = serde_json::json!({ "seconds": seconds, "nics": rows }).to_string();
    json.push('\n');
    json
}
