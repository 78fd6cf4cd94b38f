//! PCI behaviour proven with a test device: config cycles through 0xCF8/0xCFC at every width,
//! BAR sizing and relocation, INTx through the chip, MSI-X routing, masking and pending bits.

use super::*;
use crate::bus::Bus;
use crate::interrupt::{IntxLine, IrqChip, MsiMessage, RecordingIrqChip};
use std::sync::{Arc, Mutex};

/// BAR0: 256 bytes of I/O, BAR1: 4 KiB 64-bit MMIO (registers at 0, MSI-X table at 0x800,
/// PBA at 0xc00). Writing register 0 raises INTx (or vector 0 when MSI-X is on).
struct TestDev {
    config: PciConfig,
    msix: Msix,
    intx: IntxLine,
    io_log: Vec<(u64, u8)>,
}

impl TestDev {
    fn new(chip: Arc<dyn IrqChip>, slot: u8) -> Self {
        let mut config = PciConfig::new(0x1234, 0x5678, (0x02, 0x00, 0x00), 3);
        config.add_bar(0, BarKind::Io, 256);
        config.add_bar(1, BarKind::Mem64, 4096);
        config.set_interrupt(1, intx_gsi(slot, 0) as u8);
        let msix = Msix::new(&mut config, chip.clone(), 4, 1, 0x800, 0xc00).unwrap();
        TestDev {
            config,
            msix,
            intx: IntxLine::new(chip, intx_gsi(slot, 0), slot as u32),
            io_log: vec![],
        }
    }
}

impl PciDevice for TestDev {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, _offset: usize, _len: usize) {
        self.msix.config_written(&self.config);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match (bar, offset) {
            (1, 0x800..=0xbff) => self.msix.table_read(offset - 0x800, data),
            (1, 0xc00..) => self.msix.pba_read(offset - 0xc00, data),
            _ => data.fill(bar as u8 + 0xa0),
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (1, 0x800..=0xbff) => self.msix.table_write(offset - 0x800, data),
            (1, 0) => {
                if !self.msix.notify(0) {
                    self.intx.set(data[0] != 0);
                }
            }
            _ => self.io_log.push((offset, data[0])),
        }
    }
    fn save(&self) -> crate::snapshot::State {
        serde_json::json!({
            "config": save_config_only(&self.config),
            "msix": self.msix.save(),
        })
    }
    fn restore(&mut self, state: &crate::snapshot::State) -> Result<(), RestoreError> {
        restore_config_only(&mut self.config, &state["config"])?;
        self.msix.restore(&self.config, &state["msix"])
    }
}

struct Rig {
    chip: Arc<RecordingIrqChip>,
    dev: Arc<Mutex<TestDev>>,
    root: Arc<PciRoot>,
    pio: Bus,
    mmio: Bus,
}

const SLOT: u8 = 3;

fn rig() -> Rig {
    let chip = Arc::new(RecordingIrqChip::default());
    let dev = Arc::new(Mutex::new(TestDev::new(chip.clone(), SLOT)));
    let mut root = PciRoot::new();
    root.add(0, Arc::new(Mutex::new(HostBridge::default())))
        .unwrap();
    root.add(SLOT, dev.clone()).unwrap();
    let root = Arc::new(root);
    let mut pio = Bus::new();
    pio.insert(0xcf8, 8, Arc::new(PciConfigIo(root.clone())))
        .unwrap();
    pio.insert(
        0xc000,
        0x4000,
        Arc::new(PciWindow {
            root: root.clone(),
            io: true,
            base: 0xc000,
        }),
    )
    .unwrap();
    let mut mmio = Bus::new();
    mmio.insert(
        0xc000_0000,
        0x3ec0_0000,
        Arc::new(PciWindow {
            root: root.clone(),
            io: false,
            base: 0xc000_0000,
        }),
    )
    .unwrap();
    Rig {
        chip,
        dev,
        root,
        pio,
        mmio,
    }
}

impl Rig {
    fn select(&self, slot: u8, reg: u32) {
        let a = 0x8000_0000 | (slot as u32) << 11 | (reg & 0xfc);
        self.pio.write(0xcf8, &a.to_le_bytes());
    }
    fn cfg_read(&self, slot: u8, reg: u32, len: usize) -> u32 {
        self.select(slot, reg);
        let mut b = [0u8; 4];
        self.pio.read(0xcfc + (reg & 3) as u64, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn cfg_write(&self, slot: u8, reg: u32, len: usize, v: u32) {
        self.select(slot, reg);
        self.pio
            .write(0xcfc + (reg & 3) as u64, &v.to_le_bytes()[..len]);
    }
    fn mmio_write32(&self, addr: u64, v: u32) {
        self.mmio.write(addr, &v.to_le_bytes());
    }
    fn mmio_read32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(addr, &mut b);
        u32::from_le_bytes(b)
    }
}

#[test]
fn config_cycles_at_every_width() {
    let r = rig();
    assert_eq!(r.cfg_read(SLOT, 0, 4), 0x5678_1234);
    assert_eq!(r.cfg_read(SLOT, 0, 2), 0x1234);
    assert_eq!(r.cfg_read(SLOT, 2, 2), 0x5678);
    assert_eq!(r.cfg_read(SLOT, 3, 1), 0x56);
    assert_eq!(r.cfg_read(SLOT, 0x0b, 1), 0x02, "class code");
    assert_eq!(r.cfg_read(0, 0x0a, 2), 0x0600, "host bridge class");
    assert_eq!(r.cfg_read(7, 0, 4), 0xffff_ffff, "empty slot");
    // Function 1 of a single-function device does not exist.
    r.pio.write(
        0xcf8,
        &(0x8000_0000u32 | (SLOT as u32) << 11 | 1 << 8).to_le_bytes(),
    );
    let mut b = [0u8; 4];
    r.pio.read(0xcfc, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xffff_ffff);
    // CONFIG_ADDRESS reads back.
    r.select(SLOT, 0x10);
    r.pio.read(0xcf8, &mut b);
    assert_eq!(
        u32::from_le_bytes(b),
        0x8000_0000 | (SLOT as u32) << 11 | 0x10
    );
    // Read-only fields stay put; Interrupt Line is writable, Interrupt Pin is not.
    r.cfg_write(SLOT, 0, 4, 0);
    assert_eq!(r.cfg_read(SLOT, 0, 4), 0x5678_1234);
    r.cfg_write(SLOT, 0x3c, 2, 0x0b0b);
    assert_eq!(r.cfg_read(SLOT, 0x3c, 2), 0x010b);
    // The capability list is linked: status bit 4, pointer at 0x34, MSI-X first.
    assert_ne!(r.cfg_read(SLOT, 6, 2) & 0x10, 0);
    let cap = r.cfg_read(SLOT, 0x34, 1);
    assert_eq!(r.cfg_read(SLOT, cap, 1), 0x11);
    assert_eq!(r.cfg_read(SLOT, cap + 2, 2) & 0x7ff, 3, "4 vectors");
}

#[test]
fn bar_sizing_and_relocation() {
    let r = rig();
    // Size BAR0 (I/O, 256 bytes) the way Linux does: save, write ones, read, restore.
    r.cfg_write(SLOT, 0x10, 4, 0xffff_ffff);
    assert_eq!(r.cfg_read(SLOT, 0x10, 4), 0xffff_ff01);
    // 64-bit memory BAR of 4 KiB.
    r.cfg_write(SLOT, 0x14, 4, 0xffff_ffff);
    r.cfg_write(SLOT, 0x18, 4, 0xffff_ffff);
    assert_eq!(r.cfg_read(SLOT, 0x14, 4), 0xffff_f004);
    assert_eq!(r.cfg_read(SLOT, 0x18, 4), 0xffff_ffff);
    // Unused BARs and the ROM BAR read as zero and stay zero.
    r.cfg_write(SLOT, 0x1c, 4, 0xffff_ffff);
    r.cfg_write(SLOT, 0x30, 4, 0xffff_ffff);
    assert_eq!(r.cfg_read(SLOT, 0x1c, 4), 0);
    assert_eq!(r.cfg_read(SLOT, 0x30, 4), 0);

    // Place the BARs, enable decoding, and reach the device through them.
    r.cfg_write(SLOT, 0x10, 4, 0xc100);
    r.cfg_write(SLOT, 0x14, 4, 0xc000_2000);
    r.cfg_write(SLOT, 0x18, 4, 0);
    r.cfg_write(SLOT, 0x04, 2, (PCI_COMMAND_IO | PCI_COMMAND_MEMORY) as u32);
    let mut b = [0u8; 1];
    assert!(r.pio.read(0xc104, &mut b));
    assert_eq!(b[0], 0xa0);
    r.pio.write(0xc1ff, &[9]);
    assert_eq!(r.dev.lock().unwrap().io_log, vec![(0xff, 9)]);
    assert_eq!(r.mmio_read32(0xc000_2010), 0xa1a1_a1a1);

    // Relocate: the old address goes dead, the new one answers.
    r.cfg_write(SLOT, 0x14, 4, 0xc800_0000);
    assert_eq!(r.mmio_read32(0xc000_2010), 0xffff_ffff);
    assert_eq!(r.mmio_read32(0xc800_0010), 0xa1a1_a1a1);
    // Disabling memory decode unmaps it; I/O stays.
    r.cfg_write(SLOT, 0x04, 2, PCI_COMMAND_IO as u32);
    assert_eq!(r.mmio_read32(0xc800_0010), 0xffff_ffff);
    assert!(r.pio.read(0xc104, &mut b));
}

fn enable_bars(r: &Rig) {
    r.cfg_write(SLOT, 0x14, 4, 0xc000_0000);
    r.cfg_write(SLOT, 0x18, 4, 0);
    r.cfg_write(
        SLOT,
        0x04,
        2,
        (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER) as u32,
    );
}

#[test]
fn intx_is_level_triggered_on_the_slot_pin() {
    let r = rig();
    enable_bars(&r);
    let gsi = intx_gsi(SLOT, 0);
    assert_eq!(gsi, 19);
    assert_eq!(r.cfg_read(SLOT, 0x3d, 1), 1, "INTA");
    assert_eq!(r.cfg_read(SLOT, 0x3c, 1), gsi);
    r.mmio_write32(0xc000_0000, 1);
    assert!(r.chip.level(gsi));
    r.mmio_write32(0xc000_0000, 0);
    assert!(!r.chip.level(gsi));
}

#[test]
fn msix_routing_masking_and_pending() {
    let r = rig();
    enable_bars(&r);
    let cap = r.cfg_read(SLOT, 0x34, 1);
    let table = 0xc000_0800u64;
    // Program vector 0 while masked (entries start masked), as Linux does.
    r.mmio_write32(table, 0xfee0_0000);
    r.mmio_write32(table + 4, 0);
    r.mmio_write32(table + 8, 0x4041);
    assert_eq!(r.mmio_read32(table + 12), 1, "vectors reset masked");
    // Enable MSI-X: the route appears, INTx is no longer used.
    r.cfg_write(SLOT, cap + 2, 2, 0x8000);
    let gsi = 24;
    assert_eq!(
        r.chip.route(gsi),
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041
        })
    );
    // Masked: a notification latches in the PBA instead of firing.
    r.mmio_write32(0xc000_0000, 1);
    assert!(!r.chip.level(intx_gsi(SLOT, 0)));
    assert_eq!(r.mmio_read32(0xc000_0c00) & 1, 1, "pending bit set");
    let dev = r.dev.clone();
    let fired = || dev.lock().unwrap().msix.irqfd(0).unwrap().read().is_ok();
    assert!(!fired());
    // Unmask: the pending interrupt is delivered and the bit clears.
    r.mmio_write32(table + 12, 0);
    assert!(fired());
    assert_eq!(r.mmio_read32(0xc000_0c00) & 1, 0);
    // Unmasked: fires straight away.
    r.mmio_write32(0xc000_0000, 1);
    assert!(fired());
    // Function mask holds everything back; clearing it releases.
    r.cfg_write(SLOT, cap + 2, 2, 0xc000);
    r.mmio_write32(0xc000_0000, 1);
    assert!(!fired());
    r.cfg_write(SLOT, cap + 2, 2, 0x8000);
    assert!(fired());
    // Retargeting rewrites the route; disabling removes it.
    r.mmio_write32(table + 8, 0x4042);
    assert_eq!(r.chip.route(gsi).unwrap().data, 0x4042);
    r.cfg_write(SLOT, cap + 2, 2, 0);
    assert_eq!(r.chip.route(gsi), None);
    // Out-of-range table accesses are ignored.
    r.mmio_write32(table + 16 * 4, 0x1234);
    assert_eq!(r.mmio_read32(table + 16 * 4), 0);
}

/// A guest's PCI setup: BARs moved away from where the machine put them, MSI-X enabled with
/// vectors 0 and 2 programmed (2 masked, with an interrupt pending), CONFIG_ADDRESS selected.
fn programmed_rig() -> Rig {
    let r = rig();
    r.cfg_write(SLOT, 0x10, 4, 0xc200);
    r.cfg_write(SLOT, 0x14, 4, 0xc040_0000);
    r.cfg_write(SLOT, 0x18, 4, 0);
    r.cfg_write(
        SLOT,
        0x04,
        2,
        (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER) as u32,
    );
    let table = 0xc040_0800u64;
    for (v, data) in [(0u64, 0x4041u32), (2, 0x4043)] {
        r.mmio_write32(table + 16 * v, 0xfee0_1000);
        r.mmio_write32(table + 16 * v + 8, data);
    }
    r.mmio_write32(table + 12, 0);
    let cap = r.cfg_read(SLOT, 0x34, 1);
    r.cfg_write(SLOT, cap + 2, 2, 0x8000);
    // Vector 2 stays masked; make it pending through the device.
    r.dev.lock().unwrap().msix.notify(2);
    assert_eq!(r.mmio_read32(0xc040_0c00), 0b100);
    r.select(SLOT, 0x3c);
    r
}

fn saved_text(r: &Rig) -> String {
    serde_json::to_string(&r.root.save()).unwrap()
}

#[test]
fn restored_bus_decodes_and_routes_as_saved() {
    let old = programmed_rig();
    let text = saved_text(&old);
    let new = rig();
    assert_eq!(
        new.mmio_read32(0xc040_0800),
        0xffff_ffff,
        "nothing there yet"
    );
    new.root
        .restore(&serde_json::from_str(&text).unwrap())
        .unwrap();
    // A save of the restored bus is the save it came from.
    assert_eq!(
        new.root.save(),
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    );
    // The BARs answer where the guest had put them, through both windows.
    let mut b = [0u8; 1];
    assert!(new.pio.read(0xc204, &mut b));
    assert_eq!(b[0], 0xa0);
    new.pio.write(0xc2ff, &[7]);
    assert_eq!(new.dev.lock().unwrap().io_log, vec![(0xff, 7)]);
    assert_eq!(new.mmio_read32(0xc040_0010), 0xa1a1_a1a1);
    assert_eq!(new.mmio_read32(0xc040_0808), 0x4041, "the MSI-X table");
    // CONFIG_ADDRESS as the guest left it: a CONFIG_DATA read needs no new select.
    let mut d = [0u8; 2];
    new.pio.read(0xcfc, &mut d);
    assert_eq!(u16::from_le_bytes(d), old.cfg_read(SLOT, 0x3c, 2) as u16);
    // The routes the guest's writes made, made again on the new chip.
    for gsi in 24..28 {
        assert_eq!(new.chip.route(gsi), old.chip.route(gsi), "GSI {gsi}");
    }
    assert!(new.chip.route(24).is_some() && new.chip.route(26).is_some());
    // Vector 0 fires; vector 2 is still pending and fires on unmask.
    let fired = |v: usize| {
        new.dev
            .lock()
            .unwrap()
            .msix
            .irqfd(v)
            .unwrap()
            .read()
            .is_ok()
    };
    assert!(!fired(2), "a masked vector stays held back");
    new.mmio_write32(0xc040_0000, 1);
    assert!(fired(0));
    assert_eq!(new.mmio_read32(0xc040_0c00), 0b100);
    new.mmio_write32(0xc040_0800 + 16 * 2 + 12, 0);
    assert!(fired(2));
}

#[test]
fn restore_refuses_another_machine() {
    let text = saved_text(&programmed_rig());
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    // The same slots holding a device of another kind.
    let other = rig();
    other.dev.lock().unwrap().config.set16(2, 0x9999);
    let e = other.root.restore(&state).unwrap_err();
    assert!(e.0.contains("slot 3") && e.0.contains("read-only"), "{e}");
    // The device in another slot.
    let chip = Arc::new(RecordingIrqChip::default());
    let mut root = PciRoot::new();
    root.add(0, Arc::new(Mutex::new(HostBridge::default())))
        .unwrap();
    root.add(4, Arc::new(Mutex::new(TestDev::new(chip.clone(), 4))))
        .unwrap();
    let e = root.restore(&state).unwrap_err();
    assert!(e.0.contains("slots"), "{e}");
    // An MSI-X table of another length, or a Message Control that disagrees.
    let r = rig();
    let mut s = state.clone();
    let dev = &mut s["slots"][1][1];
    dev["msix"]["entries"].as_array_mut().unwrap().pop();
    assert!(r.root.restore(&s).unwrap_err().0.contains("vectors"));
    let mut s = state.clone();
    s["slots"][1][1]["msix"]["enabled"] = false.into();
    assert!(r
        .root
        .restore(&s)
        .unwrap_err()
        .0
        .contains("Message Control"));
    let mut s = state.clone();
    s["slots"][1][1]["msix"]["entries"][0]["ctrl"] = 0x8000_0001u32.into();
    assert!(r.root.restore(&s).is_err());
    let mut s = state;
    s["slots"][1][1]["msix"]["pending"] = serde_json::json!([true, "no", false, false]);
    assert!(r.root.restore(&s).is_err());
    assert_eq!(chip.route(24), None);
}

/// Slots 3 and 11 share GSI 19. Each NIC model used to drive its line with the GSI as its
/// source id, so one device de-asserting (here: the rtl8139 reset) cleared the other's
/// pending interrupt. With per-device sources the chip keeps the pin asserted.
#[test]
fn nics_sharing_a_pin_do_not_clear_each_other() {
    use crate::e1000::{regs, E1000, MMIO_BAR};
    use crate::rtl8139::{Rtl8139, BAR_IO, CR, CR_RST};
    use net_backends::mem::pair;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    assert_eq!(intx_gsi(3, 0), intx_gsi(11, 0));
    let gsi = intx_gsi(3, 0);
    let chip = Arc::new(RecordingIrqChip::default());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mac = |i| net_backends::MacAddr::nth_default(i);
    let port = |name: &str, b: net_backends::mem::MemBackend| {
        crate::net::NetPort::new(name.into(), Box::new(b)).unwrap()
    };
    let (b, _p1) = pair(Default::default());
    let model = E1000::new(mac(0), mem.clone(), IntxLine::new(chip.clone(), gsi, 3)).unwrap();
    let mut e1000 = crate::net::Nic::new(model, port("e1000", b));
    let (b, _p2) = pair(Default::default());
    let model = Rtl8139::new(mac(1), mem, IntxLine::new(chip.clone(), gsi, 11), true).unwrap();
    let mut rtl = crate::net::Nic::new(model, port("rtl8139", b));
    e1000.bar_write(MMIO_BAR, regs::IMS as u64, &regs::ICR_LSC.to_le_bytes());
    e1000.bar_write(MMIO_BAR, regs::ICS as u64, &regs::ICR_LSC.to_le_bytes());
    assert!(chip.level(gsi), "e1000 asserted its line");
    rtl.bar_write(BAR_IO, CR as u64, &[CR_RST]);
    assert!(
        chip.level(gsi),
        "the rtl8139's reset left the e1000's interrupt pending"
    );
    let mut icr = [0u8; 4];
    e1000.bar_read(MMIO_BAR, regs::ICR as u64, &mut icr);
    assert!(!chip.level(gsi), "reading ICR clears it");
}

/// A function whose BAR write blocks until told to go on, standing in for a NIC busy with a
/// long transmit on one vCPU.
struct Busy {
    config: PciConfig,
    entered: std::sync::mpsc::Sender<()>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl PciDevice for Busy {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {
        let _ = self.entered.send(());
        let _ = self.go.lock().unwrap().recv();
    }
    fn save(&self) -> crate::snapshot::State {
        save_config_only(&self.config)
    }
    fn restore(&mut self, state: &crate::snapshot::State) -> Result<(), RestoreError> {
        restore_config_only(&mut self.config, state)
    }
}

/// While one vCPU is inside one function's BAR access, another vCPU reaches a different
/// function through the same window: the window is not one lock (it was).
#[test]
fn busy_function_does_not_block_the_window() {
    let chip = Arc::new(RecordingIrqChip::default());
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let mut busy = Busy {
        config: PciConfig::new(0x1234, 0x1, (0x02, 0, 0), 0),
        entered: entered_tx,
        go: Mutex::new(go_rx),
    };
    busy.config.add_bar(0, BarKind::Mem32, 4096);
    busy.config.set_bar_addr(0, 0xc010_0000);
    busy.config
        .write(PCI_COMMAND, &PCI_COMMAND_MEMORY.to_le_bytes());
    let other = Arc::new(Mutex::new(TestDev::new(chip, 4)));
    other.lock().unwrap().config.set_bar_addr(1, 0xc020_0000);
    other
        .lock()
        .unwrap()
        .config
        .write(PCI_COMMAND, &PCI_COMMAND_MEMORY.to_le_bytes());
    let mut root = PciRoot::new();
    root.add(3, Arc::new(Mutex::new(busy))).unwrap();
    root.add(4, other.clone()).unwrap();
    let mut mmio = Bus::new();
    mmio.insert(
        0xc000_0000,
        0x3ec0_0000,
        Arc::new(PciWindow {
            root: Arc::new(root),
            io: false,
            base: 0xc000_0000,
        }),
    )
    .unwrap();
    let mmio = Arc::new(mmio);
    let m = mmio.clone();
    let vcpu0 = std::thread::spawn(move || m.write(0xc010_0000, &[1]));
    entered.recv().unwrap();
    // vCPU 0 is inside the busy function now.
    let mmio2 = mmio.clone();
    let done = crate::test_util::finishes("access to the other function", move || {
        let mut b = [0u8; 4];
        mmio2.read(0xc020_0004, &mut b);
        b
    });
    let _ = done;
    go.send(()).unwrap();
    vcpu0.join().unwrap();
}
