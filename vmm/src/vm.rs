//! Assembling and running a VM: KVM, memory, irqchip, buses and devices, boot, vCPU threads,
//! and the supervisor loop that turns the first exit reason into nicvm's exit.

use crate::boot;
use crate::config::{Config, NicModel, SerialTarget};
use crate::console;
use crate::cpuid;
use crate::host::HostKind;
use crate::irqchip::KvmIrqChip;
use crate::layout::*;
use crate::mptable;
use crate::netdev;
use crate::vcpu::{self, Buses};
use devices::bus::Bus;
use devices::e1000::E1000;
use devices::interrupt::{IntxLine, IrqChip};
use devices::legacy::{Cmos, Serial, I8042};
use devices::lifecycle::{ExitReason, Lifecycle};
use devices::net::{NetPort, Nic, NicStats};
use devices::pci::{self, BarKind, HostBridge, PciConfigIo, PciDevice, PciRoot, PciWindow};
use devices::pvpanic::PvPanic;
use devices::rtl8139::Rtl8139;
use devices::virtio::net::VirtioNet;
use devices::virtio::IoEventRegistry;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A setup failure: printed as one line, exit status 1, before the guest runs.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

fn setup_err(e: impl std::fmt::Display) -> SetupError {
    SetupError(e.to_string())
}

const COM1_PORT: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;
const CMOS_PORT: u64 = 0x70;
const PCI_CONFIG_PORT: u64 = 0xcf8;
/// First slot for NICs without addr=, as on QEMU's default PC board.
const FIRST_NIC_SLOT: u8 = 3;

/// Queue doorbells as KVM ioeventfds: a guest kick wakes the I/O thread without a vCPU exit
/// to userspace.
struct KvmIoEvents(Arc<kvm_ioctls::VmFd>);

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
pub fn validate(cfg: &Config) -> Result<(), SetupError> {
    let mem = cfg.mem_mib << 20;
    if let Some(host) = host_ram_bytes() {
        if mem > host {
            return Err(SetupError(format!(
                "-m: {} MiB is more than this host's {} MiB of RAM",
                cfg.mem_mib,
                host >> 20
            )));
        }
    }
    if mem < 16 << 20 {
        return Err(SetupError(format!(
            "-m: {} MiB is too small for Linux (at least 16M)",
            cfg.mem_mib
        )));
    }
    std::fs::File::open(&cfg.kernel).map_err(|e| {
        SetupError(format!(
            "-kernel: cannot open {}: {e}",
            cfg.kernel.display()
        ))
    })?;
    if let Some(i) = &cfg.initrd {
        std::fs::File::open(i)
            .map_err(|e| SetupError(format!("-initrd: cannot read {}: {e}", i.display())))?;
    }
    Ok(())
}

/// Places every BAR of `dev` from the running allocators, as firmware would.
pub fn assign_bars(
    dev: &mut dyn PciDevice,
    io_next: &mut u64,
    mmio_next: &mut u64,
) -> Result<(), SetupError> {
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
            return Err(SetupError(
                "too many PCI devices: the BAR window is full".into(),
            ));
        }
        dev.config_mut().set_bar_addr(bar, addr);
        *next = addr + size;
    }
    Ok(())
}

/// A NIC model on its port, seen three ways: the PCI function the buses dispatch to, the
/// subscriber the I/O thread drives, and its counters. One object, one lock.
struct NicParts {
    pci: Arc<Mutex<dyn PciDevice>>,
    subscriber: crate::io_thread::Subscriber,
    stats: NicCounters,
}

type NicCounters = Box<dyn Fn() -> NicStats + Send>;

fn nic_parts<M: devices::net::NicModel>(model: M, port: NetPort) -> NicParts {
    let nic = Arc::new(Mutex::new(Nic::new(model, port)));
    let counters = nic.clone();
    NicParts {
        pci: nic.clone(),
        subscriber: Box::new(nic),
        stats: Box::new(move || match counters.lock() {
            Ok(n) => n.stats(),
            Err(poisoned) => poisoned.into_inner().stats(),
        }),
    }
}

pub struct Timing {
    pub start: Instant,
    pub enabled: bool,
}

impl Timing {
    pub fn mark(&self, what: &str) {
        if self.enabled {
            eprintln!(
                "nicvm-timing: {what} {:.3}\r",
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Builds the VM, runs it, and returns why it ended. What opening the netdevs set up is
/// left in `guards`, also when set-up fails: the caller drops them once the VM has ended.
pub fn run(
    cfg: &Config,
    host: HostKind,
    timing: Timing,
    signals: &crate::signals::SignalFd,
    guards: &mut Vec<netdev::NetdevGuard>,
) -> Result<ExitReason, SetupError> {
    let kvm = Kvm::new().map_err(|e| {
        SetupError(format!(
            "/dev/kvm: cannot open ({e}); is KVM available and are you allowed to use it?"
        ))
    })?;
    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| setup_err(format!("KVM_CREATE_VM: {e}")))?,
    );
    if let Err(e) = vm.set_tss_address(0xfffb_d000) {
        log::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    vm.create_irq_chip()
        .map_err(|e| setup_err(format!("KVM_CREATE_IRQCHIP: {e}")))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| setup_err(format!("KVM_CREATE_PIT2: {e}")))?;

    // Guest RAM.
    let mem_bytes = cfg.mem_mib << 20;
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_bytes)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
        SetupError(format!(
            "-m: cannot allocate {} MiB of guest RAM: {e}",
            cfg.mem_mib
        ))
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|e| setup_err(format!("guest memory: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (both are
        // dropped only at process exit), and the slots do not overlap.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| setup_err(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
    }

    let chip: Arc<dyn IrqChip> = Arc::new(
        KvmIrqChip::new(vm.clone()).map_err(|e| setup_err(format!("KVM_SET_GSI_ROUTING: {e}")))?,
    );
    let lifecycle = Arc::new(Lifecycle::new().map_err(setup_err)?);

    // Legacy devices.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let com1_irq = EventFd::new(EFD_NONBLOCK).map_err(setup_err)?;
    vm.register_irqfd(&com1_irq, COM1_IRQ)
        .map_err(|e| setup_err(format!("KVM_IRQFD: {e}")))?;
    let out: Box<dyn Write + Send> = match &cfg.serial {
        SerialTarget::Stdio => Box::new(console::Stdout),
        SerialTarget::File(p) => Box::new(
            std::fs::File::create(p)
                .map_err(|e| SetupError(format!("-serial: cannot create {}: {e}", p.display())))?,
        ),
        SerialTarget::None => Box::new(std::io::sink()),
    };
    let serial = Arc::new(Mutex::new(Serial::new(com1_irq, out)));
    pio.insert(COM1_PORT, 8, serial.clone())
        .map_err(setup_err)?;
    pio.insert(
        I8042_PORT,
        5,
        Arc::new(Mutex::new(I8042::new(lifecycle.clone()))),
    )
    .map_err(setup_err)?;
    pio.insert(CMOS_PORT, 2, Arc::new(Mutex::new(Cmos::default())))
        .map_err(setup_err)?;

    // PCI.
    let mut root = PciRoot::new();
    let mut io_next = PCI_IO_START;
    let mut mmio_next = PCI_MMIO_START;
    root.add(0, Arc::new(Mutex::new(HostBridge::default())))
        .map_err(setup_err)?;
    let ioevents: Arc<dyn IoEventRegistry> = Arc::new(KvmIoEvents(vm.clone()));
    let mut subscribers = vec![];
    let mut counted: Vec<Counted> = vec![];
    for spec in &cfg.nics {
        let nd = cfg
            .netdevs
            .iter()
            .find(|n| n.id == spec.netdev)
            .expect("checked by the CLI");
        let opened = netdev::open(nd, spec.model.wants_vnet_hdr()).map_err(setup_err)?;
        guards.push(opened.guard);
        let slot = match spec.slot {
            Some(s) => s,
            None => (FIRST_NIC_SLOT..32)
                .find(|&s| !root.slot_taken(s) && !cfg.nics.iter().any(|n| n.slot == Some(s)))
                .ok_or_else(|| setup_err("no free PCI slot for another NIC"))?,
        };
        // Slots share IOAPIC pins (3 and 11 both reach GSI 19): each device drives the line
        // under its own source id, its slot, and the chip ORs them.
        let intx = IntxLine::new(chip.clone(), pci::intx_gsi(slot, 0), slot as u32);
        let model_err =
            |e: std::io::Error| SetupError(format!("-device {}: {e}", spec.model.name()));
        let mut backend = opened.backend;
        if let Some(d) = cfg.dumps.iter().find(|d| d.netdev == nd.id) {
            backend = Box::new(
                net_backends::pcap::PcapDump::create(backend, &d.file, d.maxlen).map_err(|e| {
                    SetupError(format!(
                        "-object filter-dump,id={}: cannot create {}: {e}",
                        d.id,
                        d.file.display()
                    ))
                })?,
            );
        }
        let mem = mem.clone();
        let port = NetPort::new(format!("{} {}", spec.model.name(), spec.mac), backend)
            .map_err(model_err)?;
        let parts = match spec.model {
            NicModel::VirtioNetPci => {
                let caps = port.capabilities();
                let m = VirtioNet::new(spec.mac, caps, mem, chip.clone(), intx, ioevents.clone())
                    .map_err(model_err)?;
                nic_parts(m, port)
            }
            NicModel::Rtl8139 { cplus } => nic_parts(
                Rtl8139::new(spec.mac, mem, intx, cplus).map_err(model_err)?,
                port,
            ),
            NicModel::E1000 => nic_parts(E1000::new(spec.mac, mem, intx).map_err(model_err)?, port),
        };
        let pci = parts.pci;
        assign_bars(&mut *pci.lock().unwrap(), &mut io_next, &mut mmio_next)?;
        log::debug!(
            "{} {} on slot {slot} backed by {}",
            spec.model.name(),
            spec.mac,
            opened.label
        );
        root.add(slot, pci)
            .map_err(|e| SetupError(format!("-device {}: {e}", spec.model.name())))?;
        counted.push((spec.clone(), nd.backend.kind().into(), parts.stats));
        subscribers.push(parts.subscriber);
    }
    let mut panic_dev = PvPanic::new(lifecycle.clone());
    assign_bars(&mut panic_dev, &mut io_next, &mut mmio_next)?;
    let slot = root
        .first_free_slot()
        .ok_or_else(|| setup_err("no free PCI slot"))?;
    root.add(slot, Arc::new(Mutex::new(panic_dev)))
        .map_err(setup_err)?;
    let root = Arc::new(root);
    pio.insert(PCI_CONFIG_PORT, 8, Arc::new(PciConfigIo(root.clone())))
        .map_err(setup_err)?;
    let window = |io: bool, base: u64| {
        Arc::new(PciWindow {
            root: root.clone(),
            io,
            base,
        })
    };
    pio.insert(PCI_IO_START, PCI_IO_SIZE, window(true, PCI_IO_START))
        .map_err(setup_err)?;
    mmio.insert(PCI_MMIO_START, PCI_MMIO_SIZE, window(false, PCI_MMIO_START))
        .map_err(setup_err)?;

    let mp = mptable::build(MPTABLE_START as u32, cfg.cpus, pci::intx_gsi);
    vm_memory::Bytes::write_slice(&mem, &mp, GuestAddress(MPTABLE_START))
        .map_err(|e| setup_err(format!("MP table: {e}")))?;

    let entry = boot::load(
        &mem,
        mem_bytes,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        &cfg.append,
    )
    .map_err(setup_err)?;
    log::debug!("entry {:?} at {:#x}", entry.mode, entry.rip);

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| setup_err(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let mut vcpus = vec![];
    for id in 0..cfg.cpus {
        let v = vm
            .create_vcpu(id as u64)
            .map_err(|e| SetupError(format!("-smp: cannot create vCPU {id}: {e}")))?;
        let table = cpuid::for_vcpu(&supported, id, cfg.cpus, host);
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
        vcpu::setup_vcpu_common(&v, &table).map_err(setup_err)?;
        if id == 0 {
            vcpu::setup_boot_vcpu(&v, &mem, entry).map_err(setup_err)?;
        }
        vcpus.push(v);
    }

    // From here on the guest runs; failures are exit reasons, not setup errors.
    if cfg.serial == SerialTarget::Stdio {
        let tty = console::stdin_is_tty();
        if tty {
            if let Err(e) = console::enter_raw_mode() {
                log::warn!("cannot put the terminal in raw mode: {e}");
            }
        }
        let (s, l) = (serial.clone(), lifecycle.clone());
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || console::pump_stdin(s, l, tty))
            .map_err(setup_err)?;
    }
    let _io = crate::io_thread::IoThread::spawn(subscribers)
        .map_err(|e| setup_err(format!("I/O thread: {e}")))?;
    let buses = Arc::new(Buses { pio, mmio });
    timing.mark("vcpu-start");
    for (id, v) in vcpus.into_iter().enumerate() {
        let (m, b, l) = (mem.clone(), buses.clone(), lifecycle.clone());
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(id as u8, v, m, b, l))
            .map_err(setup_err)?;
    }
    let reason = crate::signals::wait_for_exit(&lifecycle, signals);
    if let Some(path) = std::env::var_os("NICVM_STATS") {
        let json = stats_json(&counted, timing.start.elapsed().as_secs_f64());
        if let Err(e) = std::fs::write(&path, json) {
            log::warn!("NICVM_STATS: cannot write {}: {e}", path.to_string_lossy());
        }
    }
    Ok(reason)
}

/// A NIC whose counters NICVM_STATS reports: its -device, its netdev's type, the model.
type Counted = (crate::config::NicConfig, String, NicCounters);

/// `NICVM_STATS=PATH`: at exit, one JSON object with nicvm's run time and, per NIC, what it is
/// and its counters (for scripts/bench).
fn stats_json(nics: &[Counted], seconds: f64) -> String {
    let rows: Vec<String> = nics
        .iter()
        .map(|(spec, kind, counters)| {
            let s = counters();
            let model = match spec.model {
                NicModel::Rtl8139 { cplus: false } => "rtl8139,cplus=off",
                m => m.name(),
            };
            format!(
                "{{\"model\":\"{model}\",\"netdev\":\"{}\",\"backend\":\"{}\",\"mac\":\"{}\",\
                 \"tx_frames\":{},\"rx_frames\":{},\"tx_bytes\":{},\"rx_bytes\":{},\
                 \"interrupts\":{},\"rx_dropped\":{}}}",
                json_escape(&spec.netdev),
                json_escape(kind),
                spec.mac,
                s.tx_frames,
                s.rx_frames,
                s.tx_bytes,
                s.rx_bytes,
                s.interrupts,
                s.rx_dropped
            )
        })
        .collect();
    format!(
        "{{\"seconds\":{seconds:.3},\"nics\":[{}]}}\n",
        rows.join(",")
    )
}

fn json_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}
