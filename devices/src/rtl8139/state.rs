//! The RTL8139's state in a snapshot, and putting it back.
//!
//! Saved: the register storage, ISR/IMR, the four TSDs, CBR, the EEPROM with its bus state,
//! TCTR (as time since its epoch) and the TimerInt deadline, the link as the driver last saw
//! it, the C+ ring positions, the tally counters, the engines' error state, and the work the
//! guest still waits for:
//!
//! * normal-mode slots the driver handed over that were not sent yet (`tx_waiting`): their
//!   TSD still shows OWN clear, so they go out from guest memory after restore;
//! * the C+ frame being gathered: the buffers it will be read from once it is whole and the
//!   descriptors whose write-back waits for the send (the driver cannot reuse those until
//!   then). Snapshots of earlier builds, which copied a small frame's first descriptors as
//!   they came and gave those back at once, also hold the bytes already copied; they are
//!   still restored.
//!
//! Not saved: frames in `tx_backlog`. Their slots and descriptors were already reported done,
//! so they are dropped, as a wire may drop a frame. The line level is not saved either: it is
//! ISR & IMR, which are.

use super::desc::Tally;
use super::eeprom::{Eeprom93c46, SavedEeprom};
use super::tx::{CP_RING_MAX, DESC_EOR, DESC_FS, DESC_LS, TX_LEN_MASK};
use super::*;
use crate::net::guest_iov;
use crate::snapshot::{deadline_from_ns, deadline_to_ns, RestoreError, State};
use vm_memory::GuestAddress;

/// Bytes of a C+ frame copied out of guest memory as its descriptors came, in a snapshot of
/// an earlier build (up to its TX_COPY_MAX; this one copies none while gathering): more
/// cannot be in a saved frame.
const MAX_COPIED: usize = 2048;

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// The personality: a snapshot restores only into the same one.
    cplus: bool,
    regs: Vec<u8>,
    isr: u16,
    imr: u16,
    tsd: [u32; 4],
    cbr: u16,
    eeprom: SavedEeprom,
    /// Time since TCTR's epoch (TCTR counts it at 33 MHz).
    tctr_ns: u64,
    /// Time left until TimerInt matches.
    timer_int_ns: Option<u64>,
    wire_up: bool,
    link: bool,
    cscr_link_change: bool,
    tx_dead: bool,
    rx_dead: bool,
    rx_poll: bool,
    /// Normal-mode slots handed over and not yet sent, in order.
    tx_waiting: Vec<u8>,
    cp_tx_index: u16,
    cp_rx_index: u16,
    cp_tx_opts: (u32, u32),
    cp_tx_drop: bool,
    /// The C+ frame being gathered: length so far, bytes copied, buffers to send it from
    /// (guest address, length) and descriptors waiting for their write-back (address,
    /// status).
    cp_tx_len: usize,
    cp_tx_copied: Vec<u8>,
    cp_tx_pieces: Vec<(u64, usize)>,
    cp_tx_descs: Vec<(u64, u32)>,
    tally: Tally,
}

fn bad(what: impl std::fmt::Display) -> RestoreError {
    RestoreError::new(format!("rtl8139: {what}"))
}

impl Rtl8139 {
    pub(super) fn save_state(&self) -> State {
        let now = Instant::now();
        crate::snapshot::to_state(&Saved {
            cplus: self.cplus,
            regs: self.regs.to_vec(),
            isr: self.isr,
            imr: self.imr,
            tsd: self.tsd,
            cbr: self.cbr,
            eeprom: self.eeprom.save(),
            tctr_ns: now
                .saturating_duration_since(self.tctr_epoch)
                .as_nanos()
                .min(u64::MAX as u128) as u64,
            timer_int_ns: deadline_to_ns(self.timer_int_at, now),
            wire_up: self.wire_up,
            link: self.link,
            cscr_link_change: self.cscr_link_change,
            tx_dead: self.tx_dead,
            rx_dead: self.rx_dead,
            rx_poll: self.rx_poll,
            tx_waiting: self.tx_waiting.iter().map(|&s| s as u8).collect(),
            cp_tx_index: self.cp_tx_index,
            cp_rx_index: self.cp_rx_index,
            cp_tx_opts: self.cp_tx_opts,
            cp_tx_drop: self.cp_tx_drop,
            cp_tx_len: self.cp_tx_len,
            cp_tx_copied: self.tx_buf.to_vec(),
            cp_tx_pieces: self.cp_tx_pieces.iter().map(|&(a, l)| (a.0, l)).collect(),
            cp_tx_descs: self.cp_tx_descs.iter().map(|&(a, s)| (a.0, s)).collect(),
            tally: self.tally,
        })
    }

    pub(super) fn restore_state(
        &mut self,
        port: &mut NetPort,
        state: &State,
    ) -> Result<(), RestoreError> {
        let s: Saved = crate::snapshot::from_state(state, "rtl8139")?;
        if s.cplus != self.cplus {
            return Err(bad(format!(
                "a snapshot of the {} personality does not restore into the {} one",
                personality(s.cplus),
                personality(self.cplus)
            )));
        }
        let regs: [u8; 256] = crate::snapshot::array(&s.regs, "rtl8139 registers")?;
        if regs[CR] & CR_RST != 0 {
            return Err(bad("CR.RST set (a reset completes at once)"));
        }
        let eeprom = Eeprom93c46::restore(&s.eeprom)?;
        if s.tx_waiting.len() > 4 {
            return Err(bad("tx_waiting: more than four slots"));
        }
        let mut waiting = VecDeque::with_capacity(4);
        for &slot in &s.tx_waiting {
            if slot >= 4 || waiting.contains(&(slot as usize)) {
                return Err(bad(format!("tx_waiting: slot {slot} twice or beyond TSD3")));
            }
            waiting.push_back(slot as usize);
        }
        for (what, i) in [
            ("cp_tx_index", s.cp_tx_index),
            ("cp_rx_index", s.cp_rx_index),
        ] {
            if i >= CP_RING_MAX {
                return Err(bad(format!(
                    "{what} {i} beyond the longest ring ({CP_RING_MAX})"
                )));
            }
        }
        // The frame being gathered: bounded as the transmit path bounds it (unless the engine
        // stopped on a DMA error half-way through it: it is then discarded, as reset would).
        let len = s.cp_tx_len;
        if !s.tx_dead {
            check_gathered(&self.mem, &s)?;
        }

        let now = Instant::now();
        self.regs = regs;
        self.isr = s.isr;
        self.imr = s.imr;
        self.tsd = s.tsd;
        self.cbr = s.cbr;
        self.eeprom = eeprom;
        self.tctr_epoch = tctr_epoch(now, s.tctr_ns);
        self.timer_int_at = deadline_from_ns(s.timer_int_ns, now);
        self.wire_up = s.wire_up;
        self.link = s.link;
        self.cscr_link_change = s.cscr_link_change;
        self.tx_dead = s.tx_dead;
        self.rx_dead = s.rx_dead;
        self.rx_poll = s.rx_poll;
        self.tx_waiting = waiting;
        self.tx_backlog.clear();
        self.cp_tx_index = s.cp_tx_index;
        self.cp_rx_index = s.cp_rx_index;
        self.cp_tx_opts = s.cp_tx_opts;
        self.cp_tx_drop = s.cp_tx_drop;
        self.tx_buf.clear();
        self.cp_tx_pieces.clear();
        self.cp_tx_descs.clear();
        self.cp_tx_len = 0;
        if !s.tx_dead {
            // A stopped engine never uses what it was gathering (reset discards it).
            self.tx_buf.extend_from_slice(&s.cp_tx_copied);
            self.cp_tx_pieces
                .extend(s.cp_tx_pieces.iter().map(|&(a, n)| (GuestAddress(a), n)));
            self.cp_tx_descs
                .extend(s.cp_tx_descs.iter().map(|&(a, st)| (GuestAddress(a), st)));
            self.cp_tx_len = len;
        }
        self.tally = s.tally;

        // What the guest's writes had set going: the line, the timer, and transmit work
        // that waited for the backend (or was interrupted by the snapshot) goes out now.
        self.update_irq();
        self.arm_timer();
        self.flush_tx(port);
        port.kick_rx();
        Ok(())
    }
}

/// The C+ frame being gathered in a saved state: no more pieces than a ring has, no more
/// copied than the transmit path copies, buffers in guest memory, status-only write-backs.
fn check_gathered(mem: &GuestMemoryMmap, s: &Saved) -> Result<(), RestoreError> {
    let (len, copied) = (s.cp_tx_len, s.cp_tx_copied.len());
    if s.cp_tx_pieces.len() > CP_RING_MAX as usize || s.cp_tx_descs.len() > CP_RING_MAX as usize {
        return Err(bad("C+ TX frame over more descriptors than a ring holds"));
    }
    let in_place: usize = s.cp_tx_pieces.iter().map(|p| p.1.min(1 << 20)).sum();
    if copied > MAX_COPIED || len > net_backends::MAX_FRAME || copied + in_place > len {
        return Err(bad(format!(
            "C+ TX frame of {len} bytes with {copied} copied and {in_place} in place"
        )));
    }
    for &(addr, n) in &s.cp_tx_pieces {
        if n > TX_LEN_MASK as usize || !guest_iov::is_memory(mem, GuestAddress(addr), n) {
            return Err(bad(format!(
                "C+ TX buffer {addr:#x}+{n} is not a descriptor's buffer in guest memory"
            )));
        }
    }
    let status_bits = DESC_EOR | DESC_FS | DESC_LS | TX_LEN_MASK;
    if let Some(&(_, st)) = s.cp_tx_descs.iter().find(|d| d.1 & !status_bits != 0) {
        return Err(bad(format!(
            "C+ TX descriptor status {st:#x} has command bits"
        )));
    }

    Ok(())
}

fn personality(cplus: bool) -> &'static str {
    if cplus {
        "C+ (8139cp)"
    } else {
        "RTL8139C (8139too)"
    }
}

/// TCTR's epoch `ns` before `now`. A host that has been up for less time than that cannot
/// place it there: TCTR then keeps its value modulo its 32-bit wrap (the epoch a whole
/// number of wraps later), or restarts from 0 on a host up for less than one wrap.
fn tctr_epoch(now: Instant, ns: u64) -> Instant {
    let exact = now.checked_sub(Duration::from_nanos(ns));
    exact.unwrap_or_else(|| {
        let ticks = (ns as u128 * TCTR_HZ as u128 / 1_000_000_000) as u32;
        let within = ticks as u64 * 1_000_000_000 / TCTR_HZ;
        now.checked_sub(Duration::from_nanos(within)).unwrap_or(now)
    })
}
