//! What every NIC model offers the I/O thread: the fds to watch and what to do when one fires.
//! The loop owns no NIC logic; it only keeps each backend fd's interest as the model asks
//! (readable while the guest has buffers, writable while a send is waiting).

use std::os::fd::RawFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetEvent {
    /// The guest posted frames to send (doorbell eventfd).
    TxKick,
    /// The guest posted receive buffers.
    RxKick,
    /// The backend fd is readable or writable.
    Backend,
    /// A model timer expired (interrupt mitigation, link-up delay).
    Timer,
}

/// Which readiness of the backend fd the model wants to hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendInterest {
    pub readable: bool,
    pub writable: bool,
}

pub trait NetFrontend: Send {
    /// The fds the I/O thread watches for this NIC; exactly one is [`NetEvent::Backend`].
    fn event_fds(&self) -> Vec<(RawFd, NetEvent)>;
    /// Handles one event; returns the backend interest from now on.
    fn handle(&mut self, ev: NetEvent) -> BackendInterest;
}

pub mod offload;
