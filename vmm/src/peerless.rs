//! The netdevs no NIC uses, kept as QEMU keeps them: opened and running, so a user network's
//! forwards listen (and `info usernet` and `hostfwd_add` reach it), a tap exists with its
//! scripts run, a stream server accepts and a client connects. What such a netdev receives is
//! dropped, as QEMU drops a frame for a net client with no peer (before its filters: a
//! capture of it holds no frame); it is read all the same, so that nothing piles up in it.
//! QEMU warns that the netdev has no peer, and so does nicvm.

use crate::io_thread::Subscriber;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use net_backends::NetBackend;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

/// A backend the I/O thread drains and the monitor asks (a user network's table, forwards).
pub type Shared = Arc<Mutex<Box<dyn NetBackend>>>;

/// Frames read and dropped per event at most: a peer that floods the netdev cannot hold the
/// I/O thread (what is left is read on the next turns, the fd still being readable).
const DRAIN_PER_EVENT: usize = 64;

/// One queue of a netdev no NIC uses, as a subscriber of the first I/O thread.
struct Drain {
    name: String,
    backend: Shared,
    /// The backend's fds as registered, with the events asked for.
    watched: Vec<(RawFd, EventSet)>,
    /// The backend failed or hung up on an fd it still wants watched: no longer watched, so
    /// that the loop does not spin on it.
    dead: bool,
    buf: Vec<u8>,
}

/// The subscribers that keep `backends` (the queues of the netdev `name`) running.
pub fn subscribers(name: &str, backends: &[Shared]) -> Vec<Subscriber> {
    backends
        .iter()
        .map(|b| {
            Box::new(Drain {
                name: name.to_string(),
                backend: b.clone(),
                watched: vec![],
                dead: false,
                buf: vec![0; 65536 + 128],
            }) as Subscriber
        })
        .collect()
}

fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Box<dyn NetBackend>> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drain {
    /// Registers what the backend wants watched now (frames wanted, nothing to send), and
    /// takes out what it no longer does.
    fn sync(&mut self, ops: &mut EventOps) {
        let mut want = vec![];
        if !self.dead {
            lock(&self.backend).watch(true, false, &mut want);
        }
        self.watched
            .retain(|&(fd, ev)| match want.iter().find(|w| w.0 == fd) {
                Some(&(_, new)) if new == ev => true,
                Some(&(_, new)) => {
                    ops.modify(Events::new_raw(fd, new)).is_ok() || {
                        let _ = ops.remove(Events::new_raw(fd, ev));
                        false
                    }
                }
                None => {
                    let _ = ops.remove(Events::new_raw(fd, ev));
                    false
                }
            });
        for &(fd, ev) in &want {
            if let Some(w) = self.watched.iter_mut().find(|w| w.0 == fd) {
                w.1 = ev;
            } else {
                match ops.add(Events::new_raw(fd, ev)) {
                    Ok(()) => self.watched.push((fd, ev)),
                    Err(e) => log::error!("netdev {}: cannot watch fd {fd}: {e}", self.name),
                }
            }
        }
    }
}

impl MutEventSubscriber for Drain {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (fd, set) = (events.fd(), events.event_set());
        let mut b = lock(&self.backend);
        b.ready(fd, set);
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            let mut still = vec![];
            b.watch(true, false, &mut still);
            if still.iter().any(|(f, _)| *f == fd) {
                log::warn!(
                    "netdev {}: the backend failed or hung up; no longer watched",
                    self.name
                );
                self.dead = true;
            }
        }
        if set.contains(EventSet::IN) {
            for _ in 0..DRAIN_PER_EVENT {
                match b.recv(&mut self.buf) {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }
        drop(b);
        self.sync(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use net_backends::mem::pair;

    /// What a netdev no NIC uses receives is read and dropped, at most DRAIN_PER_EVENT
    /// frames an event; the rest on the next ones.
    #[test]
    fn a_peerless_backend_is_drained_a_bounded_burst_at_a_time() {
        let (backend, peer) = pair(net_backends::Capabilities::default());
        let shared: Shared = Arc::new(Mutex::new(Box::new(backend)));
        let mut em: EventManager<Subscriber> = EventManager::new().unwrap();
        for s in subscribers("n0", std::slice::from_ref(&shared)) {
            em.add_subscriber(s);
        }
        for i in 0..(DRAIN_PER_EVENT * 2 + 5) {
            peer.inject(&[i as u8; 60]);
        }
        assert_eq!(peer.pending(), DRAIN_PER_EVENT * 2 + 5);
        em.run_with_timeout(1000).unwrap();
        assert_eq!(peer.pending(), DRAIN_PER_EVENT + 5, "one burst an event");
        em.run_with_timeout(1000).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(peer.pending(), 0, "the rest on the next events");
        // Nothing left to read: the loop sleeps.
        assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    }
}
