//! The root bus: configuration mechanism #1 (CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at
//! 0xCFC-0xCFF, any access width) and dispatch of BAR windows to whichever device the guest
//! placed there.

use super::*;
use crate::bus::BusDevice;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    io: bool,
    base: u64,
    size: u64,
    slot: u8,
    bar: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    #[error("PCI slot {0} does not exist (0-31)")]
    NoSuchSlot(u8),
    #[error("PCI slot {0} is already taken")]
    Taken(u8),
}

pub struct PciRoot {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    config_address: AtomicU32,
    map: RwLock<Vec<Mapping>>,
}

const CONFIG_ENABLE: u32 = 1 << 31;

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RootState {
    config_address: u32,
    slots: Vec<(u8, State)>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        PciRoot {
            slots: (0..32).map(|_| None).collect(),
            config_address: AtomicU32::new(0),
            map: RwLock::new(Vec::new()),
        }
    }

    /// Puts a single-function device in `slot` (device number on bus 0).
    pub fn add(&mut self, slot: u8, dev: Arc<Mutex<dyn PciDevice>>) -> Result<(), SlotError> {
        let s = self
            .slots
            .get_mut(slot as usize)
            .ok_or(SlotError::NoSuchSlot(slot))?;
        if s.is_some() {
            return Err(SlotError::Taken(slot));
        }
        *s = Some(dev);
        self.remap(slot);
        Ok(())
    }

    pub fn first_free_slot(&self) -> Option<u8> {
        self.slots.iter().position(|s| s.is_none()).map(|s| s as u8)
    }

    fn remap(&self, slot: u8) {
        let Some(dev) = &self.slots[slot as usize] else {
            return;
        };
        let bars = dev.lock().unwrap().config().decoded_bars();
        let mut map = self.map.write().unwrap();
        map.retain(|m| m.slot != slot);
        for (bar, kind, base, size) in bars {
            map.push(Mapping {
                io: kind == BarKind::Io,
                base,
                size,
                slot,
                bar,
            });
        }
    }

    /// The devices' states by slot, and CONFIG_ADDRESS (vCPUs stopped).
    pub fn save(&self) -> State {
        self.with_devices_locked(|s| s)
    }

    /// Runs `f` with every device locked (in slot order), and nothing saved: no device
    /// writes guest RAM or raises an interrupt until `f` returns.
    pub fn with_devices_held<R>(&self, f: impl FnOnce() -> R) -> R {
        let _held: Vec<std::sync::MutexGuard<'_, dyn PciDevice>> = self
            .slots
            .iter()
            .filter_map(|d| Some(d.as_ref()?.lock().unwrap()))
            .collect();
        f()
    }

    /// Locks every device (in slot order), saves their states and calls `f` with them while
    /// still holding the locks: no device writes guest memory until `f` returns (a snapshot
    /// writes RAM there).
    pub fn with_devices_locked<R>(&self, f: impl FnOnce(State) -> R) -> R {
        let locked: Vec<(u8, std::sync::MutexGuard<'_, dyn PciDevice>)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((i as u8, d.as_ref()?.lock().unwrap())))
            .collect();
        let slots = locked.iter().map(|(i, d)| (*i, d.save())).collect();
        let state = crate::snapshot::to_state(&RootState {
            config_address: self.config_address.load(Ordering::Relaxed),
            slots,
        });
        f(state)
    }

    /// Restores every device from `state`, which must name exactly the slots this bus has
    /// filled, then maps their BARs where the guest had placed them.
    pub fn restore(&self, state: &State) -> Result<(), RestoreError> {
        let saved: RootState = crate::snapshot::from_state(state, "PCI bus")?;
        let filled: Vec<u8> = (0..self.slots.len() as u8)
            .filter(|&s| self.slots[s as usize].is_some())
            .collect();
        let mut named: Vec<u8> = saved.slots.iter().map(|(s, _)| *s).collect();
        named.sort_unstable();
        if named != filled {
            return Err(RestoreError(format!(
                "PCI bus: the snapshot has devices in slots {named:?}, this machine in \
                 {filled:?} (restore with the same -device options)"
            )));
        }
        for (slot, dev_state) in &saved.slots {
            let dev = self.slots[*slot as usize]
                .as_ref()
                .expect("slot checked above");
            dev.lock()
                .unwrap()
                .restore(dev_state)
                .map_err(|e| RestoreError(format!("PCI slot {slot}: {e}")))?;
            self.remap(*slot);
        }
        self.config_address
            .store(saved.config_address, Ordering::Relaxed);
        Ok(())
    }

    fn target(&self) -> Option<(u8, usize)> {
        let a = self.config_address.load(Ordering::Relaxed);
        let (bus, dev, func) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 0x7);
        (a & CONFIG_ENABLE != 0 && bus == 0 && func == 0)
            .then_some((dev as u8, (a & 0xfc) as usize))
    }

    /// Config read of device `slot` (bus 0, function 0).
    pub fn config_read(&self, slot: u8, offset: usize, data: &mut [u8]) {
        match self.slots.get(slot as usize).and_then(|s| s.as_ref()) {
            Some(dev) => dev.lock().unwrap().config().read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&self, slot: u8, offset: usize, data: &[u8]) {
        let Some(dev) = self.slots.get(slot as usize).and_then(|s| s.as_ref()) else {
            return;
        };
        {
            let mut d = dev.lock().unwrap();
            d.config_mut().write(offset, data);
            d.config_written(offset, data.len());
        }
        let end = offset + data.len();
        let touches = |lo: usize, hi: usize| offset < hi && end > lo;
        if touches(PCI_COMMAND, PCI_COMMAND + 2) || touches(PCI_BAR0, PCI_BAR0 + 24) {
            self.remap(slot);
        }
    }

    fn window_access(
        &self,
        io: bool,
        addr: u64,
        f: impl FnOnce(&mut dyn PciDevice, usize, u64),
    ) -> bool {
        let hit = {
            let map = self.map.read().unwrap();
            map.iter()
                .find(|m| m.io == io && addr >= m.base && addr - m.base < m.size)
                .copied()
        };
        match hit {
            Some(m) => {
                let dev = self.slots[m.slot as usize].as_ref().unwrap();
                f(&mut *dev.lock().unwrap(), m.bar, addr - m.base);
                true
            }
            None => false,
        }
    }
}

/// CONFIG_ADDRESS/CONFIG_DATA, inserted on the port bus at 0xCF8 with length 8. Only the
/// addressed function is locked.
pub struct PciConfigIo(pub Arc<PciRoot>);

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let root = &self.0;
        if offset < 4 {
            let v = root.config_address.load(Ordering::Relaxed).to_le_bytes();
            let o = offset as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.get(o + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match root.target() {
            Some((slot, reg)) => root.config_read(slot, reg + (offset as usize - 4), data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let root = &self.0;
        if offset < 4 {
            // Only dword writes change CONFIG_ADDRESS; narrower ones are for other uses of 0xCF8.
            if offset == 0 && data.len() == 4 {
                let v = u32::from_le_bytes(data.try_into().unwrap());
                root.config_address.store(v, Ordering::Relaxed);
            }
            return;
        }
        if let Some((slot, reg)) = root.target() {
            root.config_write(slot, reg + (offset as usize - 4), data);
        }
    }
}

/// The part of port or MMIO space where BARs live; inserted on the bus at `base`. An access
/// locks only the function whose BAR it hits, so vCPUs driving different NICs do not wait for
/// each other.
pub struct PciWindow {
    pub root: Arc<PciRoot>,
    pub io: bool,
    pub base: u64,
}

impl BusDevice for PciWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if !self
            .root
            .window_access(self.io, self.base + offset, |d, bar, off| {
                d.bar_read(bar, off, data)
            })
        {
            data.fill(0xff);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.root
            .window_access(self.io, self.base + offset, |d, bar, off| {
                d.bar_write(bar, off, data)
            });
    }
}
