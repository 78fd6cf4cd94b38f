//! Device state for snapshots (QMP `migrate` to a file, `-incoming`).
//!
//! Each device saves what the guest can observe — registers, ring positions, timers, EEPROM
//! and PHY state — as a JSON value, and restores it into a freshly built device of the same
//! kind. What only the host sees (the backend, fds, scratch buffers, counters) is not saved:
//! the restoring command line builds it anew. Saving happens with the vCPUs stopped and the
//! device's lock held, so no guest access or backend event interleaves.
//!
//! A snapshot file comes from outside: `restore` checks every value before using it (indexes
//! inside their rings, lengths that match the device) and says what is wrong instead of
//! panicking, and a device's read-only config space must match the device being restored into
//! (a snapshot of an e1000 does not restore into an rtl8139).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::{Duration, Instant};

/// One device's saved state.
pub type State = serde_json::Value;

/// Why a saved state cannot be restored: one line, naming the device part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RestoreError(pub String);

impl RestoreError {
    pub fn new(what: impl Into<String>) -> RestoreError {
        RestoreError(what.into())
    }
}

/// `t` as a saved state (state structs hold only plain data, so this cannot fail).
pub fn to_state<T: Serialize>(t: &T) -> State {
    serde_json::to_value(t).expect("device state serializes")
}

/// The state struct `T` from a saved state; `what` names the device in the error.
pub fn from_state<T: DeserializeOwned>(state: &State, what: &str) -> Result<T, RestoreError> {
    T::deserialize(state).map_err(|e| RestoreError(format!("{what}: {e}")))
}

/// A deadline as the nanoseconds left until it (0 if already past), for saving.
pub fn deadline_to_ns(deadline: Option<Instant>, now: Instant) -> Option<u64> {
    deadline.map(|d| {
        d.saturating_duration_since(now)
            .as_nanos()
            .min(u64::MAX as u128) as u64
    })
}

/// The deadline again, counted from `now` (a restored guest's timers continue where they
/// stood, as its clock does).
pub fn deadline_from_ns(ns: Option<u64>, now: Instant) -> Option<Instant> {
    ns.map(|ns| {
        now.checked_add(Duration::from_nanos(ns))
            .unwrap_or_else(|| now + Duration::from_secs(1 << 20))
    })
}

/// A fixed-size array from a saved list, refusing any other length.
pub fn array<const N: usize, T: Copy + Default>(
    v: &[T],
    what: &str,
) -> Result<[T; N], RestoreError> {
    if v.len() != N {
        return Err(RestoreError(format!(
            "{what}: {} entries where the device has {N}",
            v.len()
        )));
    }
    let mut a = [T::default(); N];
    a.copy_from_slice(v);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_survive_as_durations() {
        let now = Instant::now();
        let later = now + Duration::from_millis(5);
        let ns = deadline_to_ns(Some(later), now);
        assert_eq!(ns, Some(5_000_000));
        assert_eq!(deadline_to_ns(Some(now), later), Some(0));
        let then = Instant::now();
        assert_eq!(
            deadline_from_ns(ns, then),
            Some(then + Duration::from_millis(5))
        );
        // A hostile value does not overflow the clock.
        assert!(deadline_from_ns(Some(u64::MAX), then).is_some());
    }

    #[test]
    fn arrays_keep_their_length() {
        assert_eq!(array::<3, u8>(&[1, 2, 3], "x"), Ok([1, 2, 3]));
        assert!(array::<3, u8>(&[1, 2], "x")
            .unwrap_err()
            .0
            .contains("2 entries"));
    }
}
