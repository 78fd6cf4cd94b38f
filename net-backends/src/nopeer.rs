//! The backend of a NIC given no netdev (`-device e1000` alone), as QEMU's NIC without a
//! peer: the guest sees the link up, what it sends is dropped, and nothing ever arrives.

use crate::{Capabilities, EventSet, NetBackend};
use std::io::{self, IoSlice};
use std::os::fd::RawFd;

#[derive(Debug, Default)]
pub struct NoPeer {
    dropped: u64,
}

impl NetBackend for NoPeer {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn send(&mut self, _frame: &[IoSlice<'_>]) -> io::Result<()> {
        self.dropped = self.dropped.saturating_add(1);
        Ok(())
    }

    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }

    /// No descriptor: [`NoPeer::watch`] lists none, so nothing ever waits on this.
    fn fd(&self) -> RawFd {
        -1
    }

    fn watch(&self, _rx: bool, _tx: bool, _out: &mut Vec<(RawFd, EventSet)>) {}

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_sent_is_counted_and_dropped_and_nothing_arrives() {
        let mut b = NoPeer::default();
        let frame = [0u8; 60];
        for _ in 0..3 {
            b.send(&[IoSlice::new(&frame)]).unwrap();
        }
        assert_eq!(b.dropped(), 3);
        assert_eq!(b.recv(&mut [0u8; 1514]).unwrap(), None);
        let mut fds = vec![];
        b.watch(true, true, &mut fds);
        assert!(fds.is_empty(), "nothing to wait on");
        assert!(b.link_up(), "QEMU's NIC without a peer has its link up");
    }
}
