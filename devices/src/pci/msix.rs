//! MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the pending-bit
//! array, with each vector routed through its own GSI and irqfd.
//!
//! A vector's route is programmed when the guest enables MSI-X or rewrites an entry's
//! address/data; masking only gates delivery here (the pending bit latches and fires on
//! unmask), so the common mask/unmask dance costs no routing-table update.

use super::{PciConfig, PCI_CAP_ID_MSIX};
use crate::interrupt::{IrqChip, MsiMessage};
use crate::snapshot::{RestoreError, State};
use std::io;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub const MSIX_ENTRY_SIZE: u64 = 16;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CTRL_MASK: u32 = 1;

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
    /// What the GSI currently routes to.
    routed: Option<MsiMessage>,
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (self.addr_hi as u64) << 32 | self.addr_lo as u64,
            data: self.data,
        }
    }
}

/// One table entry as saved: the three words the guest wrote and its mask bit.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryState {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

/// The table, the PBA and Message Control's two bits. The GSIs and irqfds are the new
/// process's own; the routes are rebuilt from the entries.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MsixState {
    entries: Vec<EntryState>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

pub struct Msix {
    cap: usize,
    entries: Vec<Entry>,
    pending: Vec<bool>,
    vectors: Vec<(u32, EventFd)>,
    enabled: bool,
    function_masked: bool,
    chip: Arc<dyn IrqChip>,
}

impl Msix {
    /// Adds the capability to `config`: `n` vectors, table at `table_off` and PBA at
    /// `pba_off` inside BAR `bar`.
    pub fn new(
        config: &mut PciConfig,
        chip: Arc<dyn IrqChip>,
        n: u16,
        bar: u8,
        table_off: u32,
        pba_off: u32,
    ) -> io::Result<Self> {
        assert!((1..=2048).contains(&n));
        let mut body = [0u8; 12];
        body[0] = PCI_CAP_ID_MSIX;
        body[2..4].copy_from_slice(&(n - 1).to_le_bytes());
        body[4..8].copy_from_slice(&(table_off | bar as u32).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_off | bar as u32).to_le_bytes());
        let mut wmask = [0u8; 12];
        wmask[3] = 0xc0;
        let cap = config.add_capability(&body, &wmask);
        let vectors = (0..n)
            .map(|_| chip.alloc_msi())
            .collect::<io::Result<Vec<_>>>()?;
        let masked = Entry {
            ctrl: VECTOR_CTRL_MASK,
            ..Default::default()
        };
        Ok(Msix {
            cap,
            entries: vec![masked; n as usize],
            pending: vec![false; n as usize],
            vectors,
            enabled: false,
            function_masked: false,
            chip,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn vector_count(&self) -> usize {
        self.entries.len()
    }

    /// The irqfd behind vector `v`, for devices that signal from another thread.
    pub fn irqfd(&self, v: usize) -> Option<&EventFd> {
        self.vectors.get(v).map(|(_, fd)| fd)
    }

    /// Call after any config write; picks up Message Control changes.
    pub fn config_written(&mut self, config: &PciConfig) {
        let ctl = config.get16(self.cap + 2);
        let enabled = ctl & MSIX_ENABLE != 0;
        self.function_masked = ctl & MSIX_FUNCTION_MASK != 0;
        if enabled != self.enabled {
            self.enabled = enabled;
            for v in 0..self.entries.len() {
                self.sync_route(v);
            }
        }
        self.deliver_pending();
    }

    fn sync_route(&mut self, v: usize) {
        let want = self.enabled.then(|| self.entries[v].message());
        if want != self.entries[v].routed {
            match self.chip.route_msi(self.vectors[v].0, want) {
                Ok(()) => self.entries[v].routed = want,
                Err(e) => log::error!("msix: cannot route vector {v}: {e}"),
            }
        }
    }

    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.entries[v].ctrl & VECTOR_CTRL_MASK != 0
    }

    fn deliver_pending(&mut self) {
        if !self.enabled {
            return;
        }
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                let _ = self.vectors[v].1.write(1);
            }
        }
    }

    /// Raises vector `v`. Returns false when MSI-X is off (the caller falls back to INTx).
    pub fn notify(&mut self, v: usize) -> bool {
        if !self.enabled {
            return false;
        }
        if v >= self.entries.len() {
            return true; // the guest assigned no valid vector: nothing to deliver
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            let _ = self.vectors[v].1.write(1);
        }
        true
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (v, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get(v) else { return };
        let words = [e.addr_lo, e.addr_hi, e.data, e.ctrl];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let f = field as usize;
        let n = data.len().min(16 - f);
        data[..n].copy_from_slice(&bytes[f..f + n]);
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let (v, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get_mut(v) else {
            return;
        };
        let mut words = [e.addr_lo, e.addr_hi, e.data, e.ctrl];
        let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let f = field as usize;
        let n = data.len().min(16 - f);
        bytes[f..f + n].copy_from_slice(&data[..n]);
        for (i, w) in words.iter_mut().enumerate() {
            *w = u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        }
        e.addr_lo = words[0];
        e.addr_hi = words[1];
        e.data = words[2];
        e.ctrl = words[3] & VECTOR_CTRL_MASK;
        self.sync_route(v);
        self.deliver_pending();
    }

    /// The table, pending bits and enable/mask state, for a snapshot.
    pub fn save(&self) -> State {
        crate::snapshot::to_state(&MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| EntryState {
                    addr_lo: e.addr_lo,
                    addr_hi: e.addr_hi,
                    data: e.data,
                    ctrl: e.ctrl,
                })
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        })
    }

    /// Puts a saved table back into this freshly built capability. `config` is the device's
    /// config space, already restored: its Message Control must say what the state says (the
    /// two are saved separately and a file could disagree). Every vector is then routed as
    /// the guest's writes had routed it, and a pending vector that is deliverable fires, as
    /// on the guest's last unmask. A state that does not fit changes nothing.
    pub fn restore(&mut self, config: &PciConfig, state: &State) -> Result<(), RestoreError> {
        let s: MsixState = crate::snapshot::from_state(state, "MSI-X")?;
        let n = self.entries.len();
        if s.entries.len() != n || s.pending.len() != n {
            return Err(RestoreError(format!(
                "MSI-X: {} table entries and {} pending bits where the device has {n} vectors",
                s.entries.len(),
                s.pending.len()
            )));
        }
        if let Some(v) = s
            .entries
            .iter()
            .position(|e| e.ctrl & !VECTOR_CTRL_MASK != 0)
        {
            return Err(RestoreError(format!(
                "MSI-X: vector {v} has reserved vector-control bits set"
            )));
        }
        let ctl = config.get16(self.cap + 2);
        if (ctl & MSIX_ENABLE != 0, ctl & MSIX_FUNCTION_MASK != 0) != (s.enabled, s.function_masked)
        {
            return Err(RestoreError(format!(
                "MSI-X: enable {} / function mask {} disagree with Message Control {ctl:#06x}",
                s.enabled, s.function_masked
            )));
        }
        for (e, saved) in self.entries.iter_mut().zip(&s.entries) {
            e.addr_lo = saved.addr_lo;
            e.addr_hi = saved.addr_hi;
            e.data = saved.data;
            e.ctrl = saved.ctrl;
        }
        self.pending = s.pending;
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for v in 0..n {
            self.sync_route(v);
            // A route the chip refused would leave the guest's handler deaf: the VM does
            // not start rather than lose interrupts.
            if self.entries[v].routed != self.enabled.then(|| self.entries[v].message()) {
                return Err(RestoreError(format!("MSI-X: vector {v} cannot be routed")));
            }
        }
        self.deliver_pending();
        Ok(())
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let base = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(base + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }
}
