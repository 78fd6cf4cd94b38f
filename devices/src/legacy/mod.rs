//! The few PC devices a Linux guest expects without firmware: COM1, the i8042 reset line and
//! the CMOS real-time clock. The PIC, PIT and IOAPIC live in KVM.

mod cmos;
mod i8042;
mod serial;

pub use cmos::Cmos;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial};
