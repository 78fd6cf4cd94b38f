//! The I/O thread: one epoll loop over every NIC's doorbells and backend fd. Each backend fd's
//! interest follows what its NIC model asks for, so a guest without RX buffers leaves frames
//! queued in the backend instead of spinning or dropping.

use devices::net::{BackendInterest, NetEvent, NetFrontend};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

struct Watch {
    nic: usize,
    ev: NetEvent,
    fd: RawFd,
}

fn events_for(i: BackendInterest) -> EventSet {
    let mut e = EventSet::empty();
    if i.readable {
        e |= EventSet::IN;
    }
    if i.writable {
        e |= EventSet::OUT;
    }
    e
}

pub fn spawn(nics: Vec<Arc<Mutex<dyn NetFrontend>>>) -> std::io::Result<()> {
    if nics.is_empty() {
        return Ok(());
    }
    let epoll = Epoll::new()?;
    let mut watches: Vec<Watch> = vec![];
    let mut interest: Vec<BackendInterest> = vec![];
    for (n, nic) in nics.iter().enumerate() {
        for (fd, ev) in nic.lock().unwrap().event_fds() {
            let token = watches.len() as u64;
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
            watches.push(Watch { nic: n, ev, fd });
        }
        interest.push(BackendInterest {
            readable: true,
            writable: false,
        });
    }
    std::thread::Builder::new()
        .name("io".into())
        .spawn(move || {
            let mut events = vec![EpollEvent::default(); 64];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("I/O thread: epoll_wait: {e}");
                        return;
                    }
                };
                for e in &events[..n] {
                    let w = &watches[e.data() as usize];
                    let want = nics[w.nic].lock().unwrap().handle(w.ev);
                    // An fd in error or hung up (a deleted tap) is reported on every wait
                    // whatever the interest: the model has seen it once, now stop watching.
                    let broken = EventSet::ERROR | EventSet::HANG_UP;
                    if w.ev == NetEvent::Backend && e.event_set().intersects(broken) {
                        log::warn!("I/O thread: a backend fd failed or hung up; no longer watched");
                        let _ = epoll.ctl(ControlOperation::Delete, w.fd, EpollEvent::default());
                        continue;
                    }
                    if want != interest[w.nic] {
                        interest[w.nic] = want;
                        if let Some(b) = watches
                            .iter()
                            .enumerate()
                            .find(|(_, x)| x.nic == w.nic && x.ev == NetEvent::Backend)
                        {
                            let _ = epoll.ctl(
                                ControlOperation::Modify,
                                b.1.fd,
                                EpollEvent::new(events_for(want), b.0 as u64),
                            );
                        }
                    }
                }
            }
        })?;
    Ok(())
}
