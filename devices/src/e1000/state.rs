//! The 82540EM's state in a snapshot, and putting it back.
//!
//! Saved: the register file (ring bases, lengths, heads and tails, ICR/IMS, the statistics
//! the driver reads and clears, the filters), the EEPROM with its Microwire state, the PHY,
//! IOADDR, the link as STATUS last reported it, the interrupt line, the ITR gate (how long ago
//! the line was last asserted, and when a held-back assertion is due), the RDTR/RADV and
//! TIDV/TADV timers as time left, the TCP/IP context, the rings' error state, and how many
//! segments of a TSO frame the backend already took.
//!
//! In-flight frames need nothing more: a frame the backend refused keeps TDH at its first
//! descriptor (none of its descriptors is written back), so after restore the ring is walked
//! again from TDH and the frame goes out from guest memory, skipping the TSO segments that
//! already left. A received frame the guest had no room for waited in the port, not here:
//! it is lost with the backend, as on a wire.

use super::eeprom::SavedEeprom;
use super::*;
use crate::snapshot::{deadline_from_ns, deadline_to_ns, RestoreError, State};

/// The ITR gate looks back at most 0xffff * 256 ns (16.8 ms); an older assertion is as good
/// as none.
const ITR_LOOKBACK: Duration = Duration::from_secs(1);

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// MMIO_SIZE / 4 registers.
    regs: Vec<u32>,
    eeprom: SavedEeprom,
    phy: Phy,
    io_addr: u32,
    wire_up: bool,
    link_up: bool,
    an_started: bool,
    line: bool,
    /// How long ago the line was last asserted (for the ITR gate).
    last_irq_ago_ns: Option<u64>,
    /// Time left until ITR lets a waiting assertion through.
    itr_due_ns: Option<u64>,
    rx_delay: SavedDelay,
    tx_delay: SavedDelay,
    ctx: SavedContext,
    tx_segs_sent: usize,
    tx_error: bool,
    rx_error: bool,
}

/// A [`DelayedCause`] as time left on each of its timers.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedDelay {
    packet_ns: Option<u64>,
    absolute_ns: Option<u64>,
}

/// The context descriptor's fields, at their widths in the descriptor.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedContext {
    ipcss: u8,
    ipcso: u8,
    ipcse: u16,
    tucss: u8,
    tucso: u8,
    tucse: u16,
    tucmd: u8,
    hdrlen: u8,
    mss: u16,
}

impl SavedDelay {
    fn save(d: &DelayedCause, now: Instant) -> SavedDelay {
        SavedDelay {
            packet_ns: deadline_to_ns(d.packet, now),
            absolute_ns: deadline_to_ns(d.absolute, now),
        }
    }
    fn restore(&self, now: Instant) -> DelayedCause {
        DelayedCause {
            packet: deadline_from_ns(self.packet_ns, now),
            absolute: deadline_from_ns(self.absolute_ns, now),
        }
    }
}

/// Registers whose writes keep only some bits: (offset, bits a write can leave set, name).
const MASKED: [(usize, u32, &str); 15] = [
    (ICR, ICR_VALID, "ICR"),
    (IMS, ICR_VALID, "IMS"),
    (ITR, 0xffff, "ITR"),
    (RDTR, 0xffff, "RDTR"),
    (TIDV, 0xffff, "TIDV"),
    (VET, 0xffff, "VET"),
    (CTRL, !CTRL_RST, "CTRL"),
    (RDBAL, !0xf, "RDBAL"),
    (TDBAL, !0xf, "TDBAL"),
    (RDLEN, RING_LEN_MASK, "RDLEN"),
    (TDLEN, RING_LEN_MASK, "TDLEN"),
    // Ring indexes: 16 bits. One past its ring (after TDLEN/RDLEN shrank, or a driver bug)
    // is a state a guest can leave; the rings check head and tail against their length on
    // every walk and stop with an error, as they would have without the snapshot.
    (RDH, 0xffff, "RDH"),
    (RDT, 0xffff, "RDT"),
    (TDH, 0xffff, "TDH"),
    (TDT, 0xffff, "TDT"),
];

impl E1000 {
    pub(super) fn save_state(&self) -> State {
        let now = Instant::now();
        let c = &self.ctx;
        crate::snapshot::to_state(&Saved {
            regs: self.regs.to_vec(),
            eeprom: self.eeprom.save(),
            phy: self.phy.clone(),
            io_addr: self.io_addr,
            wire_up: self.wire_up,
            link_up: self.link_up,
            an_started: self.an_started,
            line: self.line,
            last_irq_ago_ns: self
                .last_irq
                .map(|t| now.saturating_duration_since(t))
                .filter(|&ago| ago < ITR_LOOKBACK)
                .map(|ago| ago.as_nanos() as u64),
            itr_due_ns: deadline_to_ns(self.itr_due, now),
            rx_delay: SavedDelay::save(&self.rx_delay, now),
            tx_delay: SavedDelay::save(&self.tx_delay, now),
            // The fields were loaded from a descriptor at these widths.
            ctx: SavedContext {
                ipcss: c.ipcss as u8,
                ipcso: c.ipcso as u8,
                ipcse: c.ipcse as u16,
                tucss: c.tucss as u8,
                tucso: c.tucso as u8,
                tucse: c.tucse as u16,
                tucmd: c.tucmd,
                hdrlen: c.hdrlen as u8,
                mss: c.mss as u16,
            },
            tx_segs_sent: self.tx_segs_sent,
            tx_error: self.tx_error,
            rx_error: self.rx_error,
        })
    }

    pub(super) fn restore_state(
        &mut self,
        port: &mut NetPort,
        state: &State,
    ) -> Result<(), RestoreError> {
        let s: Saved = crate::snapshot::from_state(state, "e1000")?;
        if s.regs.len() != self.regs.len() {
            return Err(RestoreError::new(format!(
                "e1000 registers: {} where the device has {}",
                s.regs.len(),
                self.regs.len()
            )));
        }
        for (off, bits, name) in MASKED {
            let v = s.regs[off / 4];
            if v & !bits != 0 {
                return Err(RestoreError::new(format!(
                    "e1000: {name} is {v:#x}, a value no write leaves there"
                )));
            }
        }
        let eeprom = eeprom::Eeprom::restore(&s.eeprom)?;
        // A TSO frame of at most 64 KiB has fewer segments than bytes.
        if s.tx_segs_sent > MAX_FRAME {
            return Err(RestoreError::new(format!(
                "e1000: {} TSO segments already sent",
                s.tx_segs_sent
            )));
        }

        let now = Instant::now();
        self.regs.copy_from_slice(&s.regs);
        self.eeprom = eeprom;
        self.phy = s.phy;
        self.io_addr = s.io_addr;
        self.wire_up = s.wire_up;
        self.link_up = s.link_up;
        self.an_started = s.an_started;
        self.line = s.line;
        self.last_irq = s
            .last_irq_ago_ns
            .map(Duration::from_nanos)
            .filter(|&ago| ago < ITR_LOOKBACK)
            .and_then(|ago| now.checked_sub(ago));
        self.itr_due = deadline_from_ns(s.itr_due_ns, now);
        self.rx_delay = s.rx_delay.restore(now);
        self.tx_delay = s.tx_delay.restore(now);
        let c = &s.ctx;
        self.ctx = TxContext {
            ipcss: c.ipcss as usize,
            ipcso: c.ipcso as usize,
            ipcse: c.ipcse as usize,
            tucss: c.tucss as usize,
            tucso: c.tucso as usize,
            tucse: c.tucse as usize,
            tucmd: c.tucmd,
            hdrlen: c.hdrlen as usize,
            mss: c.mss as usize,
        };
        self.tx_segs_sent = s.tx_segs_sent;
        self.tx_error = s.tx_error;
        self.rx_error = s.rx_error;
        // The frame that found no room waited in the old port; the next one is new.
        self.rx_no_buffers = false;
        self.tx_pieces.clear();
        self.tx_len = 0;
        self.tx_rs.clear();

        // The line as ICR & IMS and the ITR gate have it (asserted again if it was), the
        // timer for whatever is held back, and the TX ring walked from TDH: a frame the
        // backend refused, or descriptors the guest queued, go out without a new doorbell.
        self.update_irq();
        self.apply_line();
        self.timer_at = None;
        self.schedule_timer();
        self.process_tx(port);
        port.kick_rx();
        Ok(())
    }
}
