//! Opening netdevs: a checked [`NetdevConfig`](crate::config::NetdevConfig) in, the backend
//! and a [`NetdevGuard`] out. The guard undoes what opening did (downscript, socket files,
//! directories) when it is dropped, which the caller does once the VM has ended.
//!
//! `open` builds the backends, `script` runs the tap's scripts, `bridge` makes a bridge's tap,
//! `guard` holds what is undone.

pub mod bridge;
mod guard;
pub mod open;
pub mod script;

pub use guard::NetdevGuard;
pub use open::{open, OpenError, Opened};
