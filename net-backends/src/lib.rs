//! The backends behind nicvm's NICs, and the frame-level helpers they share.

pub mod mac;

pub use mac::MacAddr;
