//! The MC146818 CMOS RTC behind ports 0x70 (index) and 0x71 (data), read-only: the current
//! UTC time in BCD, 24-hour mode, never "update in progress". Linux reads it once at boot.

use crate::bus::MutBusDevice;
use crate::snapshot::{RestoreError, State};

#[derive(Default)]
pub struct Cmos {
    index: u8,
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// The selected register: the time itself is the host's, read anew after restore.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CmosState {
    index: u8,
}

impl Cmos {
    /// The register index the guest selected, for a snapshot.
    pub fn save(&self) -> State {
        crate::snapshot::to_state(&CmosState { index: self.index })
    }

    /// The selected index again; one the guest cannot select (bit 7 is the NMI mask, never
    /// kept) is refused.
    pub fn restore(&mut self, state: &State) -> Result<(), RestoreError> {
        let s: CmosState = crate::snapshot::from_state(state, "CMOS")?;
        if s.index > 0x7f {
            return Err(RestoreError(format!(
                "CMOS: register index {:#04x} out of range",
                s.index
            )));
        }
        self.index = s.index;
        Ok(())
    }

    fn register(&self, now: i64) -> u8 {
        let (days, secs) = (now.div_euclid(86_400), now.rem_euclid(86_400) as u32);
        let (y, m, d) = civil(days);
        match self.index {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u32),
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd((y % 100) as u32),
            0x0a => 0x26, // divider on, 1024 Hz, UIP clear
            0x0b => 0x02, // 24-hour, BCD, no interrupts
            0x0d => 0x80, // valid RAM and time
            0x32 => bcd((y / 100) as u32),
            _ => 0,
        }
    }
}

impl MutBusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let v = if offset == 1 {
            self.register(now)
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(&i) = data.first() {
                self.index = i & 0x7f; // bit 7 is the NMI mask
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instant_in_bcd() {
        // 2026-11-29 10:08:58 UTC, a Sunday.
        let now = 1_795_946_938;
        let mut c = Cmos::default();
        let mut read = |i: u8| {
            c.index = i;
            c.register(now)
        };
        assert_eq!(
            [
                read(0x32),
                read(9),
                read(8),
                read(7),
                read(4),
                read(2),
                read(0),
                read(6)
            ],
            [0x20, 0x26, 0x11, 0x29, 0x10, 0x08, 0x58, 0x01]
        );
    }

    #[test]
    fn selected_register_survives_a_snapshot() {
        let mut c = Cmos::default();
        c.write(0, &[0x80 | 0x09]);
        let text = serde_json::to_string(&c.save()).unwrap();
        let mut d = Cmos::default();
        d.restore(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(d.index, 0x09);
        let (mut a, mut b) = ([0u8], [0u8]);
        c.read(1, &mut a);
        d.read(1, &mut b);
        assert_eq!(a, b, "the year, read through the restored index");

        for bad in [
            serde_json::json!({"index": 0x80}),
            serde_json::json!({"index": 300}),
            serde_json::json!({"index": "9"}),
            serde_json::json!({"index": 9, "nmi": true}),
            serde_json::json!(9),
        ] {
            assert!(d.restore(&bad).is_err(), "{bad} refused");
        }
        assert_eq!(d.index, 0x09, "a refused state changes nothing");
    }
}
