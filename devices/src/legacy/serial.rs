//! COM1: a 16550A (vm-superio) whose interrupt is an irqfd on ISA IRQ 4 and whose output goes
//! to stdout, a file or nowhere. Input the FIFO cannot take yet waits here until the guest
//! drains the receive buffer, so pasting into the console loses nothing.

use crate::bus::MutBusDevice;
use crate::snapshot::{RestoreError, State};
use std::collections::VecDeque;
use std::io::Write;
use vmm_sys_util::eventfd::EventFd;

pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
    pending: VecDeque<u8>,
}

const RBR: u64 = 0;
const LCR: u8 = 3;
const DLAB: u8 = 0x80;
/// The 16550A's receive FIFO (vm-superio's, which refuses a longer saved one).
const FIFO_SIZE: usize = 64;
/// Interrupt Enable bits a 16550A has (vm-superio keeps only these).
const IER_VALID: u8 = 0x0f;
/// Line Status bits vm-superio ever sets: data ready, THR empty, transmitter idle.
const LSR_DATA_READY: u8 = 0x01;
const LSR_KNOWN: u8 = 0x61;

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, which is not serde),
/// and the console input that waits for room in the FIFO: typed before the snapshot, it
/// reaches the guest after the restore.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    fifo: Vec<u8>,
    input_waiting: Vec<u8>,
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(EventFdTrigger(irq), out),
            pending: VecDeque::new(),
        }
    }

    /// Bytes typed by the user, for the guest to read.
    /// Input queued and not yet taken by the guest (a producer stops reading while it is large).
    pub fn input_pending(&self) -> usize {
        self.pending.len()
    }

    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.fill_fifo();
    }

    /// The UART's registers and buffered input, for a snapshot.
    pub fn save(&self) -> State {
        let u = self.uart.state();
        crate::snapshot::to_state(&SerialSnapshot {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            fifo: u.in_buffer,
            input_waiting: self.pending.iter().copied().collect(),
        })
    }

    /// Rebuilds the UART from a saved state around this device's output and interrupt
    /// eventfd (vm-superio builds a UART only whole). An interrupt the guest had pending and
    /// enabled is raised again. Register values the UART could never hold are refused, and
    /// then nothing changes.
    pub fn restore(&mut self, state: &State) -> Result<(), RestoreError> {
        let s: SerialSnapshot = crate::snapshot::from_state(state, "serial")?;
        let bad = |what: String| Err(RestoreError(format!("serial: {what}")));
        if s.fifo.len() > FIFO_SIZE {
            return bad(format!(
                "{} bytes in the {FIFO_SIZE}-byte FIFO",
                s.fifo.len()
            ));
        }
        if s.interrupt_enable & !IER_VALID != 0 {
            return bad(format!(
                "IER {:#04x} has bits a 16550A lacks",
                s.interrupt_enable
            ));
        }
        // No interrupt (bit 0), or THR empty and/or data available.
        if ![0x01, 0x02, 0x04, 0x06].contains(&s.interrupt_identification) {
            return bad(format!(
                "IIR {:#04x} is no interrupt state",
                s.interrupt_identification
            ));
        }
        if s.line_status & !LSR_KNOWN != 0
            || (s.line_status & LSR_DATA_READY != 0) == s.fifo.is_empty()
        {
            return bad(format!(
                "LSR {:#04x} does not match {} bytes in the FIFO",
                s.line_status,
                s.fifo.len()
            ));
        }
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.fifo,
        };
        let dup = |u: &Uart| {
            u.interrupt_evt()
                .0
                .try_clone()
                .map(EventFdTrigger)
                .map_err(|e| RestoreError(format!("serial: cannot duplicate its eventfd: {e}")))
        };
        // The old UART gives up its writer; a stand-in holds the place meanwhile.
        let (irq, stand_in) = (dup(&self.uart)?, dup(&self.uart)?);
        let old = std::mem::replace(
            &mut self.uart,
            Uart::new(stand_in, Box::new(std::io::sink())),
        );
        let out = old.into_writer();
        self.uart = Uart::from_state(&uart_state, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| RestoreError(format!("serial: {e}")))?;
        self.pending = s.input_waiting.into();
        self.fill_fifo();
        Ok(())
    }

    fn fill_fifo(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let room = self.uart.fifo_capacity();
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..room.min(self.pending.len())).collect();
        if let Ok(n) = self.uart.enqueue_raw_bytes(&chunk) {
            // Put back whatever did not fit, in order.
            for &b in chunk[n..].iter().rev() {
                self.pending.push_front(b);
            }
        }
    }
}

impl MutBusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        let dlab = self.uart.read(LCR) & DLAB != 0;
        data[0] = self.uart.read(offset as u8);
        if offset == RBR && !dlab {
            self.fill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset <= 7 {
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_buffered_input() {
        let sink = Sink::default();
        let irq = EventFd::new(0).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        let input: Vec<u8> = (0..200u8).collect();
        s.queue_input(&input);
        let mut got = vec![];
        let mut b = [0u8];
        for _ in 0..200 {
            s.read(RBR, &mut b);
            got.push(b[0]);
        }
        assert_eq!(
            got, input,
            "input beyond the 64-byte FIFO is delivered in order"
        );
    }

    #[test]
    fn registers_and_input_survive_a_snapshot() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(Sink::default()));
        // 115200 8N1 through DLAB, scratch, MCR with OUT2, then RX-data interrupts on.
        s.write(3, &[0x83]);
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]);
        s.write(4, &[0x0b]);
        s.write(1, &[0x01]);
        let input: Vec<u8> = (0..100u8).collect();
        s.queue_input(&input);
        let mut b = [0u8];
        s.read(RBR, &mut b);
        assert_eq!(b[0], 0);
        let text = serde_json::to_string(&s.save()).unwrap();

        let sink = Sink::default();
        let irq2 = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut r = Serial::new(irq2.try_clone().unwrap(), Box::new(sink.clone()));
        r.restore(&serde_json::from_str(&text).unwrap()).unwrap();
        assert!(
            irq2.read().is_ok(),
            "the pending data interrupt is raised again on the restored eventfd"
        );
        let reg = |r: &mut Serial, off: u64| {
            let mut b = [0u8];
            r.read(off, &mut b);
            b[0]
        };
        assert_eq!(reg(&mut r, 7), 0x5a, "scratch");
        assert_eq!(reg(&mut r, 4), 0x0b, "MCR");
        assert_eq!(reg(&mut r, 1), 0x01, "IER");
        assert_eq!(reg(&mut r, 3), 0x03, "LCR");
        r.write(3, &[0x83]);
        assert_eq!((reg(&mut r, 0), reg(&mut r, 1)), (0x01, 0x00), "divisor");
        r.write(3, &[0x03]);
        let got: Vec<u8> = (1..100).map(|_| reg(&mut r, RBR)).collect();
        assert_eq!(got, input[1..], "FIFO and waiting input, in order");
        assert_eq!(reg(&mut r, 5) & 1, 0, "drained");
        r.write(0, b"x");
        assert_eq!(&*sink.0.lock().unwrap(), b"x", "output to the new writer");
        assert_eq!(r.save(), {
            let mut again = Serial::new(irq2.try_clone().unwrap(), Box::new(Sink::default()));
            again.restore(&r.save()).unwrap();
            again.save()
        });
    }

    #[test]
    fn hostile_serial_state_is_refused() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(Sink::default()));
        s.queue_input(b"abc");
        let good = s.save();
        let mut r = Serial::new(irq.try_clone().unwrap(), Box::new(Sink::default()));
        let with = |k: &str, v: serde_json::Value| {
            let mut st = good.clone();
            st[k] = v;
            st
        };
        for bad in [
            with("fifo", serde_json::json!(vec![0u8; 65])),
            with("interrupt_enable", serde_json::json!(0xff)),
            with("interrupt_identification", serde_json::json!(0x08)),
            with("line_status", serde_json::json!(0x60)),
            with("line_status", serde_json::json!(0xff)),
            with("scratch", serde_json::json!(256)),
            with("scratch", serde_json::json!("a")),
            with("extra", serde_json::json!(1)),
            serde_json::json!(null),
        ] {
            assert!(r.restore(&bad).is_err(), "{bad} refused");
        }
        let mut b = [0u8];
        r.read(RBR, &mut b);
        assert_eq!(b[0], 0, "a refused state left the UART as it was");
        r.restore(&good).unwrap();
        r.read(RBR, &mut b);
        assert_eq!(b[0], b'a');
    }
}
