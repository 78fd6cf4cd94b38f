//! nicvm's own lines on stderr.
//!
//! Writing one never fails nicvm: a stderr nobody reads any more (a pipe whose reader went)
//! loses the line, and nicvm goes on to its clean exit. While the VM is set up, notes (info
//! and warning lines) are held back: a set-up that fails says so in one line naming the
//! option, and what it would have noted no longer matters; one that succeeds prints them
//! before the guest runs.

use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// Notes held back while the VM is set up; `None` when they go out as they come.
static HELD: Mutex<Option<Vec<String>>> = Mutex::new(None);

/// Writes `text` to stderr as it is (the caller ends its line with `\n`: the console's raw
/// mode keeps the terminal's output processing, which makes it `\r\n` there, as QEMU's
/// lines); an error is ignored.
pub fn write(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// A note: held back while set-up holds notes, else written at once.
pub fn note(text: String) {
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    match held.as_mut() {
        Some(h) => h.push(text),
        None => {
            drop(held);
            write(&text);
        }
    }
}

/// From now on notes are held back.
pub fn hold() {
    *HELD.lock().unwrap_or_else(PoisonError::into_inner) = Some(Vec::new());
}

/// The notes held back go out, and later ones as they come.
pub fn release() {
    let held = HELD.lock().unwrap_or_else(PoisonError::into_inner).take();
    for text in held.into_iter().flatten() {
        write(&text);
    }
}

/// The notes held back are dropped (set-up failed: its one line says why); later ones go
/// out as they come.
pub fn discard() {
    HELD.lock().unwrap_or_else(PoisonError::into_inner).take();
}

/// A line on stderr, as `eprintln!` writes it but never failing.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::stderr::write(&format!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_notes_go_out_on_release_and_are_dropped_on_discard() {
        hold();
        note("a\n".into());
        note("b\n".into());
        assert_eq!(
            HELD.lock().unwrap().as_deref(),
            Some(&["a\n".to_string(), "b\n".into()][..])
        );
        discard();
        assert!(HELD.lock().unwrap().is_none());
        hold();
        note("c\n".into());
        release();
        assert!(
            HELD.lock().unwrap().is_none(),
            "released, and no longer held"
        );
    }
}
