//! Enough of the i8042 keyboard controller for Linux's reboot path: command 0xFE on port
//! 0x64 pulses the CPU reset line, which nicvm treats as the end of the guest.

use crate::bus::MutBusDevice;
use crate::lifecycle::{ExitReason, Lifecycle};
use crate::snapshot::{RestoreError, State};
use std::sync::Arc;

/// Inserted at port 0x60 with length 5 (0x60-0x64).
pub struct I8042 {
    lifecycle: Arc<Lifecycle>,
}

const CMD_RESET_CPU: u8 = 0xfe;

/// Nothing: the controller has no register the guest can change (its buffers always read
/// empty). An empty object, so the file says the device was there, and a later controller
/// with state can tell an old snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct I8042State {}

impl I8042 {
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        I8042 { lifecycle }
    }

    pub fn save(&self) -> State {
        crate::snapshot::to_state(&I8042State {})
    }

    /// Accepts only the empty state [`I8042::save`] writes.
    pub fn restore(&mut self, state: &State) -> Result<(), RestoreError> {
        let I8042State {} = crate::snapshot::from_state(state, "i8042")?;
        Ok(())
    }
}

impl MutBusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Output buffer empty, input buffer empty: nothing to read, ready for commands.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&CMD_RESET_CPU) {
            self.lifecycle.guest_shutdown(ExitReason::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_guest() {
        let l = Arc::new(Lifecycle::new().unwrap());
        let mut k = I8042::new(l.clone());
        k.write(0, &[0xfe]);
        assert!(
            !l.exit_requested(),
            "0xFE on the data port is not a command"
        );
        k.write(4, &[0xfe]);
        assert_eq!(l.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn snapshot_is_empty_and_strict() {
        let l = Arc::new(Lifecycle::new().unwrap());
        let mut k = I8042::new(l.clone());
        let text = serde_json::to_string(&k.save()).unwrap();
        assert_eq!(text, "{}");
        let mut k2 = I8042::new(l.clone());
        k2.restore(&serde_json::from_str(&text).unwrap()).unwrap();
        k2.write(4, &[0xfe]);
        assert_eq!(l.reason(), Some(ExitReason::Reboot), "still wired to reset");
        for bad in [
            serde_json::json!({"index": 1}),
            serde_json::json!(null),
            serde_json::json!("{}"),
            serde_json::json!(7),
        ] {
            assert!(k.restore(&bad).is_err(), "{bad} refused");
        }
    }
}
