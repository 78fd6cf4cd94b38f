//! COM1: a 16550A (vm-superio) whose interrupt is an irqfd on ISA IRQ 4 and whose output goes
//! to stdout, a file or nowhere. Input the FIFO cannot take yet waits here until the guest
//! drains the receive buffer, so pasting into the console loses nothing.

use crate::bus::MutBusDevice;
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
}
