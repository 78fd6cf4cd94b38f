//! Port I/O and MMIO buses: address ranges mapped to devices.
//!
//! A vCPU exit names an address; the bus finds the device whose range holds it and passes the
//! offset into that range. A device locks what it needs itself: a simple device is a
//! `Mutex<impl MutBusDevice>`, while the PCI windows find the function behind an address and
//! lock only that one. Two vCPUs touching two devices never contend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// A device whose state sits behind one lock: put it on a bus as `Mutex<T>`.
pub trait MutBusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl<T: MutBusDevice> BusDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock().unwrap().read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.lock().unwrap().write(offset, data)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("empty range at {0:#x}")]
    Empty(u64),
}

struct Entry {
    len: u64,
    dev: Arc<dyn BusDevice>,
}

/// Either bus: 16-bit port space or 64-bit MMIO space.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<dyn BusDevice>) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<dyn BusDevice>)> {
        let (base, e) = self.ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((addr - base, &e.dev))
    }

    /// Returns false when nothing claims `addr` (reads then see all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.write(off, data);
                true
            }
            None => false,
        }
    }

    /// A port exit of `size` bytes per access: one access for IN/OUT, `data.len() / size`
    /// accesses to the same port, in order, for a string instruction (`rep insb`/`outsw`...),
    /// for which KVM hands over all the items of one exit in `data`. A device sees each item
    /// as its own access of `size` bytes, as on hardware; not `count * size` bytes at once
    /// (which would also reach the registers after the port).
    pub fn read_port(&self, port: u64, size: usize, data: &mut [u8]) {
        if size == 0 || data.len() <= size {
            self.read(port, data);
            return;
        }
        for item in data.chunks_mut(size) {
            self.read(port, item);
        }
    }

    /// [`Bus::read_port`] for OUT and `outs`.
    pub fn write_port(&self, port: u64, size: usize, data: &[u8]) {
        if size == 0 || data.len() <= size {
            self.write(port, data);
            return;
        }
        for item in data.chunks(size) {
            self.write(port, item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl MutBusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_offsets_and_misses() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x3f7, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![7])]);
    }

    #[test]
    fn string_port_io_is_one_access_per_item() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0xc000, 0x100, dev.clone()).unwrap();
        // rep outsw of three words to port 0xc037: three 2-byte writes to one port.
        bus.write_port(0xc037, 2, &[1, 2, 3, 4, 5, 6]);
        bus.write_port(0xc010, 4, &[9, 9, 9, 9]);
        assert_eq!(
            dev.lock().unwrap().0,
            vec![
                (0x37, vec![1, 2]),
                (0x37, vec![3, 4]),
                (0x37, vec![5, 6]),
                (0x10, vec![9; 4])
            ]
        );
        // rep insb of four bytes from port 0xc005: four 1-byte reads of that port.
        let mut b = [0u8; 4];
        bus.read_port(0xc005, 1, &mut b);
        assert_eq!(b, [5; 4]);
        bus.read_port(0xf000, 2, &mut b);
        assert_eq!(b, [0xff; 4], "nothing there: all ones");
    }

    #[test]
    fn overlaps_are_refused() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x9, dev.clone()).is_err());
        bus.insert(0xf8, 0x8, dev.clone()).unwrap();
        bus.insert(0x110, 0x8, dev.clone()).unwrap();
        assert!(bus.insert(0x200, 0, dev).is_err());
    }
}
