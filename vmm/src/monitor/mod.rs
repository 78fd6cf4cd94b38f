//! The control channels QEMU users drive a VM with: QMP (JSON, `qmp`) and the human monitor
//! (`hmp`), on Unix or TCP sockets and on the console (`-serial mon:stdio`).
//!
//! [`Control`] is what both protocols act on: the run state, the NICs (links, receive
//! filters), the exit request and the event queue. [`Monitor`] is one thread polling the
//! listening sockets and every client: input is bounded per client, output is buffered and a
//! client that stops reading is dropped, so no client can stall or crash nicvm.

pub mod hmp;
pub mod qmp;

use crate::config::{Config, Endpoint, MonitorConfig, MonitorMode, NicConfig};
use devices::lifecycle::{ExitReason, Lifecycle};
use devices::net::NicControl;
use net_backends::{UsernetAnswer, UsernetAsk};
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Events waiting for the monitor thread to pass them on; beyond it the oldest go (with only a
/// console monitor there is no thread to take them, and operators' stop/cont add up).
const MAX_QUEUED_EVENTS: usize = 256;
/// Clients served at once; more are turned away.
const MAX_CLIENTS: usize = 16;
/// Output a client may leave unread before it is dropped (events pile up only for a client
/// that does not read: commands wait at [`OUTPUT_PAUSE`]).
const MAX_OUTPUT: usize = 1 << 20;
/// Unread output at which a client's commands wait and the client is not read, until it
/// has read some: a client that sends many commands at once gets every answer.
pub(crate) const OUTPUT_PAUSE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{option}: {what}{source}")]
pub struct MonitorError {
    option: String,
    /// What was tried, ending in ": " (the error of a connection says it itself).
    what: String,
    source: io::Error,
}

/// A NIC as the monitor sees it.
pub struct NicEntry {
    pub config: NicConfig,
    pub slot: u8,
    pub control: Arc<Mutex<dyn NicControl>>,
    /// Its backend as opened, in QEMU's words after the type (a tap's name and scripts).
    pub backend_info: Option<String>,
}

/// What QMP and HMP commands act on.
pub struct Control {
    pub name: Option<String>,
    pub lifecycle: Arc<Lifecycle>,
    pub nics: Vec<NicEntry>,
    /// Each NIC's backend as `info network` names it: its type, and for a user network
    /// QEMU's details (`user,net=10.0.2.0,restrict=off`).
    pub backends: Vec<String>,
    /// The netdevs no NIC uses, each with its description as in `backends`.
    pub unused_netdevs: Vec<(String, String)>,
    /// Those netdevs' backends (the first queue of each), running: a user network among them
    /// answers `info usernet` and `hostfwd_add` as one behind a NIC does.
    peerless: Vec<(String, crate::peerless::Shared)>,
    /// Each capture (`-object filter-dump`) as `info network` lists a filter: the netdev's
    /// id, and the line (`  - f0: type=filter-dump,file=...`).
    pub filters: Vec<(String, String)>,
    /// Every netdev's id, NICs' or not: net clients that are not NICs. In QEMU's order of
    /// making them: those of -netdev, then of -nic, then of -net, each in command-line order
    /// (the first user network of `hostfwd_add` is the first of them).
    pub netdev_ids: Vec<String>,
    /// The hub of each netdev on one (a `-net` backend's vlan), by id.
    pub hubs: Vec<(String, u32)>,
    /// The vCPU threads, for kicking them into a pause; emptied before they are joined.
    pub vcpus: Arc<Mutex<Vec<libc::pthread_t>>>,
    /// How many vCPUs the VM has (`cpu-index` names one of them).
    pub cpus: u8,
    pub topology: crate::config::Topology,
    /// -S and not yet continued.
    prelaunch: Mutex<bool>,
    /// What `migrate` saves.
    saver: Arc<crate::snapshot::Saver>,
    /// The last `migrate`, for query-migrate.
    migration: Mutex<Option<Migration>>,
    /// Stopped by a finished migrate and not continued since (QEMU's postmigrate).
    postmigrate: Mutex<bool>,
    /// Why the monitor asked the VM to end (the SHUTDOWN event's reason).
    shutdown_cause: Mutex<Option<&'static str>>,
    events: EventQueue,
}

/// Events waiting for the monitor thread to send them to every QMP client, each with its
/// number in the order they came.
pub struct EventQueue {
    queue: Mutex<Events>,
    wake: EventFd,
}

#[derive(Default)]
struct Events {
    waiting: Vec<(u64, String)>,
    /// The number the next event gets.
    next: u64,
}

impl Events {
    /// Sends `c` the waiting events it has not had yet.
    fn send_to(&self, c: &mut Client) {
        let from = c.next_event;
        for (n, ev) in self.waiting.iter().filter(|(n, _)| *n >= from) {
            qmp::send_text(c, ev);
            c.next_event = n + 1;
        }
    }
}

impl EventQueue {
    /// Queues `msg` (the oldest goes when [`MAX_QUEUED_EVENTS`] wait) and wakes the monitor
    /// thread.
    fn push(&self, msg: String) {
        let mut queue = self.queue.lock().unwrap();
        if queue.waiting.len() >= MAX_QUEUED_EVENTS {
            queue.waiting.remove(0);
        }
        let n = queue.next;
        queue.next += 1;
        queue.waiting.push((n, msg));
        drop(queue);
        let _ = self.wake.write(1);
    }

    /// Sends `c` the waiting events it has not had yet (they stay for the other clients):
    /// a command's events go before its answer, as QEMU sends them.
    fn send_waiting(&self, c: &mut Client) {
        self.queue.lock().unwrap().send_to(c);
    }

    /// The number the next event will get: a client that starts hearing events now hears
    /// that one first.
    fn next(&self) -> u64 {
        self.queue.lock().unwrap().next
    }
}

/// A finished `migrate`.
#[derive(Clone)]
pub struct Migration {
    pub error: Option<String>,
    pub total_ms: u64,
}

pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

fn timestamp() -> Value {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": t.as_secs(), "microseconds": t.subsec_micros()})
}

impl Control {
    /// The NICs by PCI slot, as QEMU lists a bus's devices (`info pci`, `query-pci`).
    pub fn nics_by_slot(&self) -> Vec<&NicEntry> {
        let mut nics: Vec<&NicEntry> = self.nics.iter().collect();
        nics.sort_by_key(|n| n.slot);
        nics
    }

    pub fn new(
        cfg: &Config,
        lifecycle: Arc<Lifecycle>,
        parts: crate::vm::MonitorParts,
        saver: Arc<crate::snapshot::Saver>,
    ) -> io::Result<Arc<Control>> {
        let crate::vm::MonitorParts {
            nics,
            vcpus,
            peerless,
        } = parts;
        let describe = |nd: &crate::config::NetdevConfig| match &nd.backend {
            crate::config::Backend::User(o) => format!(
                "user,net={},restrict={}",
                o.net,
                if o.restrict { "on" } else { "off" }
            ),
            // As QEMU lists it: a tap (with the helper, when one was named).
            crate::config::Backend::Bridge(o) => match &o.helper {
                Some(h) => format!("tap,helper={h},br={}", o.br),
                None => format!("tap,br={}", o.br),
            },
            b => b.kind().to_string(),
        };
        let backends = nics
            .iter()
            .map(|n| {
                let nd = n.config.netdev.as_deref().and_then(|id| cfg.netdev(id));
                match (&n.backend_info, nd) {
                    (Some(info), _) => format!("tap,{info}"),
                    (None, nd) => nd.map_or(String::new(), describe),
                }
            })
            .collect();
        let unused_netdevs = cfg
            .netdevs
            .iter()
            .filter(|nd| !nics.iter().any(|n| n.config.is_on(&nd.id)))
            .map(|nd| (nd.id.clone(), describe(nd)))
            .collect();
        // QEMU's properties of a filter-dump, in the order it lists them.
        let filters = cfg
            .dumps
            .iter()
            .map(|d| {
                (
                    d.netdev.clone(),
                    format!(
                        "  - {}: type=filter-dump,file={},maxlen={},position=tail,status=on,\
                         insert=behind,netdev={},queue=all",
                        d.id,
                        d.file.display(),
                        d.maxlen,
                        d.netdev
                    ),
                )
            })
            .collect();
        let control = Arc::new(Control {
            name: cfg.name.clone(),
            lifecycle,
            nics,
            backends,
            unused_netdevs,
            peerless,
            filters,
            hubs: cfg
                .netdevs
                .iter()
                .filter_map(|nd| Some((nd.id.clone(), nd.hub?)))
                .collect(),
            netdev_ids: {
                let mut n: Vec<_> = cfg.netdevs.iter().collect();
                n.sort_by_key(|nd| match nd.option.split([' ', ',']).next() {
                    Some("-netdev") => 0,
                    Some("-nic") => 1,
                    _ => 2,
                });
                n.into_iter().map(|nd| nd.id.clone()).collect()
            },
            vcpus,
            cpus: cfg.cpus,
            topology: cfg.topology,
            // A guest restored with -S was running before: QEMU calls it paused.
            prelaunch: Mutex::new(cfg.start_paused && cfg.incoming.is_none()),
            saver,
            migration: Mutex::new(None),
            postmigrate: Mutex::new(false),
            shutdown_cause: Mutex::new(None),
            events: EventQueue {
                queue: Mutex::new(Events::default()),
                wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            },
        });
        if cfg.start_paused {
            control.lifecycle.set_paused(true);
        }
        // NIC_RX_FILTER_CHANGED, as QEMU sends it: once, until the filter is queried. The
        // path is the device's QOM path as in QEMU 7.2: /machine/peripheral/ID, or
        // /machine/peripheral-anon/device[N] for the Nth -device without an id, and for
        // virtio-net the virtio device inside the PCI one (/virtio-backend). QEMU puts a NIC
        // of -nic or -net nic under /machine/unattached, numbered among the board's own
        // devices: nicvm says /machine/unattached/nic[N] there. QEMU sends the event for
        // virtio-net only; nicvm for every model, since every one has a filter to query.
        let (mut anonymous, mut board) = (0, 0);
        for n in &control.nics {
            let weak = Arc::downgrade(&control);
            let name = n.config.id.clone();
            let mut path = match &name {
                Some(id) => format!("/machine/peripheral/{id}"),
                None if n.config.from_device => {
                    anonymous += 1;
                    format!("/machine/peripheral-anon/device[{}]", anonymous - 1)
                }
                None => {
                    board += 1;
                    format!("/machine/unattached/nic[{}]", board - 1)
                }
            };
            if n.config.model == crate::config::NicModel::VirtioNetPci {
                path.push_str("/virtio-backend");
            }
            n.control.lock().unwrap().watch_rx_filter(Box::new(move || {
                if let Some(c) = weak.upgrade() {
                    let mut data = json!({ "path": path });
                    if let Some(name) = &name {
                        data["name"] = json!(name);
                    }
                    c.emit("NIC_RX_FILTER_CHANGED", data);
                }
            }));
        }
        Ok(control)
    }

    /// Queues an event for every QMP client.
    pub fn emit(&self, event: &str, data: Value) {
        // As QEMU: an event without data (STOP, RESUME) has no "data" member.
        let mut msg = json!({"event": event, "timestamp": timestamp()});
        if data.as_object().is_none_or(|d| !d.is_empty()) {
            msg["data"] = data;
        }
        self.events.push(msg.to_string());
    }

    pub fn running(&self) -> bool {
        !self.lifecycle.paused()
    }

    pub fn status(&self) -> &'static str {
        if self.lifecycle.exit_requested() || self.lifecycle.held().is_some() {
            "shutdown"
        } else if *self.prelaunch.lock().unwrap() {
            "prelaunch"
        } else if *self.postmigrate.lock().unwrap() {
            "postmigrate"
        } else if self.lifecycle.paused() {
            "paused"
        } else {
            "running"
        }
    }

    /// Stops the vCPUs: returns once every one is parked (or after a second).
    pub fn stop(&self) {
        // Not while guest RAM leaves its snapshot file (which resumes the vCPUs after it).
        let _no_save = self.saver.saving.lock().unwrap();
        if self.lifecycle.paused() {
            return;
        }
        let parked = crate::vcpu::pause_all(&self.lifecycle, &self.vcpus, self.cpus.into());
        if !parked && self.lifecycle.exit_requested() {
            return; // the VM is ending: nothing stopped
        }
        self.emit("STOP", json!({}));
    }

    /// The guest shut down and is held (`-no-shutdown`): SHUTDOWN, as QEMU sends it then,
    /// and STOP once every vCPU is parked.
    pub fn guest_held(&self) {
        let Some(reason) = self.lifecycle.held() else {
            return;
        };
        self.shutdown_events(&reason);
        crate::vcpu::pause_all(&self.lifecycle, &self.vcpus, self.cpus.into());
        self.emit("STOP", json!({}));
    }

    /// Resumes the guest, unless it shut down (held by `-no-shutdown`): then, as QEMU
    /// says, it would need a reset, which nicvm does not do.
    pub fn cont(&self) -> Result<(), QmpError> {
        if self.lifecycle.held().is_some() {
            return Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            ));
        }
        // Not while a snapshot is being written (by -save-on, or another monitor).
        let _no_save = self.saver.saving.lock().unwrap();
        *self.prelaunch.lock().unwrap() = false;
        *self.postmigrate.lock().unwrap() = false;
        if !self.lifecycle.paused() {
            return Ok(());
        }
        // Checked again with the pause: the guest may have shut down since.
        if !self.lifecycle.resume() {
            return Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            ));
        }
        self.emit("RESUME", json!({}));
        Ok(())
    }

    /// QMP/HMP `migrate` to `file:PATH`: stops the guest (if running), writes the snapshot,
    /// and leaves the guest stopped (`cont` resumes it; a failed save resumes a guest that
    /// was running, as QEMU does). Done before the command returns.
    pub fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        let path = match uri.strip_prefix("file:") {
            Some(p) if !p.is_empty() && !p.contains(',') => std::path::PathBuf::from(p),
            Some(_) => {
                return Err(QmpError::generic(
                    "file: needs a path (offset= is not supported)",
                ))
            }
            None => {
                return Err(QmpError::generic(format!(
                    "nicvm migrates to a file only (file:PATH), not '{uri}'"
                )))
            }
        };
        if self.lifecycle.exit_requested() {
            return Err(QmpError::generic("the guest has ended"));
        }
        if self.lifecycle.held().is_some() {
            return Err(QmpError::generic(
                "the guest has shut down: there is nothing to migrate",
            ));
        }
        let t0 = Instant::now();
        let was_running = !self.lifecycle.paused();
        self.stop();
        if self.lifecycle.exit_requested() {
            return Err(QmpError::generic("the guest has ended"));
        }
        self.emit("MIGRATION", json!({"status": "active"}));
        let result = self.saver.save(&path);
        let total_ms = t0.elapsed().as_millis() as u64;
        let error = result.as_ref().err().map(|e| e.to_string());
        *self.migration.lock().unwrap() = Some(Migration {
            error: error.clone(),
            total_ms,
        });
        match error {
            None => {
                // Stopped by the migration now, also if it had not started yet (as QEMU).
                *self.prelaunch.lock().unwrap() = false;
                *self.postmigrate.lock().unwrap() = true;
                self.emit("MIGRATION", json!({"status": "completed"}));
                Ok(())
            }
            Some(e) => {
                self.emit("MIGRATION", json!({"status": "failed"}));
                if was_running {
                    let _ = self.cont();
                }
                Err(QmpError::generic(e))
            }
        }
    }

    /// The last migration, as QMP's query-migrate shows it.
    pub fn query_migrate(&self) -> Value {
        match &*self.migration.lock().unwrap() {
            None => json!({}),
            Some(Migration {
                error: None,
                total_ms,
            }) => {
                json!({"status": "completed", "total-time": total_ms})
            }
            Some(Migration {
                error: Some(e),
                total_ms,
            }) => json!({"status": "failed", "error-desc": e, "total-time": total_ms}),
        }
    }

    /// Ends the VM on the monitor's behalf, `cause` as the SHUTDOWN event will say.
    pub fn request_exit(&self, cause: &'static str, reason: ExitReason) {
        self.shutdown_cause.lock().unwrap().get_or_insert(cause);
        self.lifecycle.request_exit(reason);
    }

    /// Whether the VM is ending (a monitor's `quit`, among others): a monitor then answers
    /// nothing more, not even its prompt, as QEMU's.
    pub fn exiting(&self) -> bool {
        self.lifecycle.exit_requested()
    }

    /// A NIC by its id, the name listings give it (MODEL.N for one without an id, as from
    /// -nic), or its netdev's id.
    pub fn nic(&self, name: &str) -> Option<&NicEntry> {
        self.nics
            .iter()
            .find(|n| n.config.id.as_deref() == Some(name))
            .or_else(|| {
                let i = (0..self.nics.len()).find(|&i| self.nic_name(i) == name)?;
                Some(&self.nics[i])
            })
            .or_else(|| self.nics.iter().find(|n| n.config.is_on(name)))
    }

    /// Asks the user network of netdev `id` (behind a NIC or not): the answer comes on the
    /// receiver; None if the netdev is not a user network. Asked under the backend's lock,
    /// waited for without it (a vCPU may want the NIC meanwhile).
    pub fn usernet(&self, id: &str, ask: UsernetAsk) -> Option<Receiver<UsernetAnswer>> {
        if let Some(n) = self.nics.iter().find(|n| n.config.is_on(id)) {
            return n.control.lock().unwrap().usernet(ask);
        }
        let (_, backend) = self.peerless.iter().find(|(p, _)| p == id)?;
        let asked = backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .usernet(ask);
        asked
    }

    /// Whether netdev `id` is a user network.
    pub fn is_usernet(&self, id: &str) -> bool {
        let nic = self.nics.iter().position(|n| n.config.is_on(id));
        match nic {
            Some(i) => self.backends[i].starts_with("user"),
            None => self
                .unused_netdevs
                .iter()
                .any(|(n, desc)| n == id && desc.starts_with("user")),
        }
    }

    /// The name QEMU gives a NIC in listings: its id, or MODEL.N.
    pub fn nic_name(&self, i: usize) -> String {
        crate::config::nic_name(self.nics.iter().map(|n| &n.config), i)
    }

    pub fn set_link(&self, name: &str, up: bool) -> Result<(), QmpError> {
        let nic = self.nic(name).ok_or_else(|| QmpError {
            class: "DeviceNotFound",
            desc: format!("Device '{name}' not found"),
        })?;
        nic.control.lock().unwrap().set_link(up);
        Ok(())
    }

    /// The events the end of the VM gives: GUEST_PANICKED for a panic, then SHUTDOWN.
    pub fn shutdown_events(&self, reason: &ExitReason) {
        let monitor_cause = *self.shutdown_cause.lock().unwrap();
        let (guest, cause) = match reason {
            ExitReason::PowerOff => (true, "guest-shutdown"),
            ExitReason::Reboot => (true, monitor_cause.unwrap_or("guest-reset")),
            ExitReason::GuestPanic => {
                self.emit("GUEST_PANICKED", json!({"action": "poweroff"}));
                (true, "guest-panic")
            }
            ExitReason::GuestCrash(_) => (true, "guest-reset"),
            ExitReason::User(why) if why.starts_with("SIG") => (false, "host-signal"),
            ExitReason::User(_) => (false, monitor_cause.unwrap_or("host-ui")),
            ExitReason::Error(_) => (false, "host-error"),
        };
        let guest = guest && monitor_cause.is_none();
        self.emit("SHUTDOWN", json!({"guest": guest, "reason": cause}));
    }
}

/// A listening socket.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn io(&mut self) -> (&mut dyn Read, RawFd) {
        match self {
            Stream::Unix(s) => {
                let fd = s.as_raw_fd();
                (s, fd)
            }
            Stream::Tcp(s) => {
                let fd = s.as_raw_fd();
                (s, fd)
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn write_some(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
}

/// One connected client and its protocol's state.
struct Client {
    stream: Stream,
    mode: MonitorMode,
    /// QMP: answers and events indented (`-mon ...,pretty=on`).
    pretty: bool,
    /// A telnet client's place in its byte stream (on a `telnet` socket).
    telnet: Option<crate::serial_io::Telnet>,
    input: Vec<u8>,
    output: Vec<u8>,
    /// QMP: capabilities negotiated (events are sent from then on).
    negotiated: bool,
    /// HMP: input is skipped up to the next newline (after an overlong line).
    skip_line: bool,
    /// HMP: the last line ended with a CR: a LF first in what comes next belongs to it.
    after_cr: bool,
    /// QMP: where the reading of the input stands.
    scan: qmp::Scan,
    /// QMP: the number of the first event this client has not had.
    next_event: u64,
    /// Ended: dropped once its output is flushed.
    closing: bool,
}

/// What a listener's clients are: their mode, whether their QMP output is pretty and
/// whether they speak telnet.
#[derive(Clone, Copy)]
struct Kind {
    mode: MonitorMode,
    pretty: bool,
    telnet: bool,
}

/// The listening sockets, bound while nicvm sets up (a busy address is a set-up error);
/// Unix socket files are removed when dropped.
pub struct Listening {
    /// Each with what its clients are.
    listeners: Vec<(Listener, Kind)>,
    paths: Vec<PathBuf>,
    /// Where each listener listens, in the same order.
    endpoints: Vec<Endpoint>,
    /// Clients connected at set-up (`server=off`, an inherited connected socket).
    connected: Vec<(Stream, Kind)>,
}

impl Listening {
    /// The listening socket at `at`, if a monitor listens there.
    pub fn fd(&self, at: &Endpoint) -> Option<RawFd> {
        let i = self.endpoints.iter().position(|e| e == at)?;
        Some(match &self.listeners[i].0 {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        })
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds every socket monitor of `monitors` (the console one is the console's).
pub fn bind(monitors: &[MonitorConfig]) -> Result<Listening, MonitorError> {
    let mut l = Listening {
        listeners: vec![],
        paths: vec![],
        endpoints: vec![],
        connected: vec![],
    };
    for m in monitors {
        let e = |at: String| {
            let option = m.option.clone();
            let what = match &m.endpoint {
                Endpoint::Unix(_) | Endpoint::Tcp(_) => format!("cannot listen on {at}: "),
                Endpoint::Fd { fd, .. } => format!("its -chardev's fd={fd}: "),
                _ => String::new(),
            };
            move |source| MonitorError {
                option,
                what,
                source,
            }
        };
        let kind = Kind {
            mode: m.mode,
            pretty: m.pretty,
            telnet: m.telnet,
        };
        match &m.endpoint {
            Endpoint::Stdio => continue,
            Endpoint::Unix(p) => {
                // A socket file left by an earlier run is replaced, as QEMU does.
                let s = crate::serial_io::listen_unix(p).map_err(e(p.display().to_string()))?;
                l.paths.push(p.clone());
                s.set_nonblocking(true)
                    .map_err(e(p.display().to_string()))?;
                l.listeners.push((Listener::Unix(s), kind));
                l.endpoints.push(m.endpoint.clone());
            }
            Endpoint::Tcp(a) => {
                let s = TcpListener::bind(a).map_err(e(a.to_string()))?;
                s.set_nonblocking(true).map_err(e(a.to_string()))?;
                l.listeners.push((Listener::Tcp(s), kind));
                l.endpoints.push(m.endpoint.clone());
            }
            Endpoint::UnixClient(p) => {
                let fd =
                    crate::serial_io::connect(&m.endpoint).map_err(e(p.display().to_string()))?;
                l.connected.push((Stream::Unix(UnixStream::from(fd)), kind));
            }
            Endpoint::TcpClient(a) => {
                let fd = crate::serial_io::connect(&m.endpoint).map_err(e(a.to_string()))?;
                l.connected.push((Stream::Tcp(TcpStream::from(fd)), kind));
            }
            Endpoint::Fd { fd, listening } => {
                let at = String::new();
                let family = socket_family(*fd).map_err(e(at.clone()))?;
                match crate::serial_io::inherited_socket(*fd, *listening).map_err(e(at))? {
                    crate::serial_io::InheritedSocket::Listener(s) => {
                        l.listeners.push((
                            if family == libc::AF_UNIX {
                                Listener::Unix(UnixListener::from(s))
                            } else {
                                Listener::Tcp(TcpListener::from(s))
                            },
                            kind,
                        ));
                        l.endpoints.push(m.endpoint.clone());
                    }
                    crate::serial_io::InheritedSocket::Stream(s) => l.connected.push((
                        if family == libc::AF_UNIX {
                            Stream::Unix(UnixStream::from(s))
                        } else {
                            Stream::Tcp(TcpStream::from(s))
                        },
                        kind,
                    )),
                }
            }
        }
    }
    Ok(l)
}

/// The address family of socket `fd` (AF_UNIX, AF_INET, ...).
fn socket_family(fd: RawFd) -> io::Result<libc::c_int> {
    crate::serial_io::socket_option(fd, libc::SO_DOMAIN)
        .map_err(|_| io::Error::other(format!("descriptor {fd} is not a socket")))
}

/// The monitor thread; dropping it flushes what clients have not read yet (a second at
/// most), closes them and removes the socket files.
pub struct Monitor {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    pub fn start(listening: Listening, control: Arc<Control>) -> io::Result<Option<Monitor>> {
        if listening.listeners.is_empty() && listening.connected.is_empty() {
            return Ok(None);
        }
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let thread_stop = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || serve(listening, control, thread_stop))?;
        Ok(Some(Monitor {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// A new client of `kind` on `stream`, greeted.
fn client(stream: Stream, kind: Kind) -> Client {
    let mut c = Client {
        stream,
        mode: kind.mode,
        pretty: kind.pretty,
        telnet: kind.telnet.then(crate::serial_io::Telnet::unasked),
        input: vec![],
        output: vec![],
        negotiated: false,
        skip_line: false,
        after_cr: false,
        scan: qmp::Scan::default(),
        next_event: 0,
        closing: false,
    };
    match kind.mode {
        MonitorMode::Control => qmp::greet(&mut c),
        MonitorMode::Readline => hmp::greet(&mut c.output),
    }
    c
}

fn serve(mut listening: Listening, control: Arc<Control>, stop: EventFd) {
    let mut clients: Vec<Client> = std::mem::take(&mut listening.connected)
        .into_iter()
        .map(|(s, kind)| client(s, kind))
        .collect();
    let mut stopping: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut turned_away = false;
    let mut rest = crate::serial_io::AcceptRest::default();
    loop {
        // Events to every negotiated QMP client (those it has not had yet: a command's own
        // went with its answer).
        let _ = control.events.wake.read();
        let mut events = control.events.queue.lock().unwrap();
        for c in clients
            .iter_mut()
            .filter(|c| c.mode == MonitorMode::Control && c.negotiated)
        {
            events.send_to(c);
        }
        // Under the same lock: one that comes meanwhile waits for the next turn.
        events.waiting.clear();
        drop(events);
        clients.retain(|c| c.output.len() <= MAX_OUTPUT);
        if let Some(t0) = stopping {
            if clients.iter().all(|c| c.output.is_empty()) || t0.elapsed() > Duration::from_secs(1)
            {
                return;
            }
        }

        let mut fds = vec![
            pollfd(stop.as_raw_fd(), libc::POLLIN),
            pollfd(control.events.wake.as_raw_fd(), libc::POLLIN),
        ];
        let first_listener = fds.len();
        let resting = rest.resting();
        if stopping.is_none() {
            for (l, _) in &listening.listeners {
                let fd = match l {
                    Listener::Unix(s) => s.as_raw_fd(),
                    Listener::Tcp(s) => s.as_raw_fd(),
                };
                // Resting: a negative fd is skipped.
                fds.push(pollfd(
                    if resting.is_some() { -1 } else { fd },
                    libc::POLLIN,
                ));
            }
        }
        let first_client = fds.len();
        for c in &clients {
            let mut ev = 0;
            if stopping.is_none() && !c.closing && c.output.len() < OUTPUT_PAUSE {
                ev |= libc::POLLIN;
            }
            if !c.output.is_empty() {
                ev |= libc::POLLOUT;
            }
            fds.push(pollfd(c.stream.fd(), ev));
        }
        let timeout = match (stopping, resting) {
            (Some(_), _) => 50,
            (None, Some(ms)) => ms,
            (None, None) => -1,
        };
        // SAFETY: polling descriptors we own, array length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 && stopping.is_none() {
            stopping = Some(Instant::now());
        }
        // New clients.
        for (i, (l, kind)) in listening.listeners.iter().enumerate() {
            if stopping.is_some() || fds[first_listener + i].revents == 0 {
                continue;
            }
            let stream = match l {
                Listener::Unix(s) => s.accept().map(|(c, _)| {
                    let _ = c.set_nonblocking(true);
                    Stream::Unix(c)
                }),
                Listener::Tcp(s) => s.accept().map(|(c, _)| {
                    let _ = c.set_nonblocking(true);
                    let _ = c.set_nodelay(true);
                    Stream::Tcp(c)
                }),
            };
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    rest.failed("monitor", &e);
                    continue;
                }
            };
            if clients.len() >= MAX_CLIENTS {
                // Said once: a local client could otherwise fill the log.
                if !turned_away {
                    log::warn!("monitor: {MAX_CLIENTS} clients already; more are turned away");
                    turned_away = true;
                }
                continue;
            }
            clients.push(client(stream, *kind));
        }
        // Client I/O.
        let mut gone = vec![];
        for (i, c) in clients.iter_mut().enumerate() {
            let re = fds.get(first_client + i).map_or(0, |p| p.revents);
            if re & libc::POLLIN != 0 {
                let (r, _) = c.stream.io();
                match r.read(&mut buf) {
                    Ok(0) => c.closing = true,
                    Ok(n) => {
                        let n = match &mut c.telnet {
                            Some(t) => t.filter(&mut buf[..n]),
                            None => n,
                        };
                        c.input.extend_from_slice(&buf[..n]);
                        match c.mode {
                            MonitorMode::Control => qmp::process(&control, c),
                            MonitorMode::Readline => hmp::process(&control, c),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => c.closing = true,
                }
            } else if re & (libc::POLLHUP | libc::POLLERR) != 0 && c.output.is_empty() {
                c.closing = true;
            }
            if !c.output.is_empty() && (re & libc::POLLOUT != 0 || re == 0) {
                match c.stream.write_some(&c.output) {
                    Ok(n) => {
                        c.output.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        c.output.clear();
                        c.closing = true;
                    }
                }
            }
            // Commands that waited for the client to read its answers.
            if !c.input.is_empty() && c.output.len() < OUTPUT_PAUSE {
                match c.mode {
                    MonitorMode::Control => qmp::process(&control, c),
                    MonitorMode::Readline => hmp::process(&control, c),
                }
            }
            if c.closing && c.output.is_empty() {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_nobody_takes_keep_only_the_newest() {
        let q = EventQueue {
            queue: Mutex::new(Events::default()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
        };
        for i in 0..MAX_QUEUED_EVENTS + 10 {
            q.push(i.to_string());
        }
        let queue = q.queue.lock().unwrap();
        assert_eq!(queue.waiting.len(), MAX_QUEUED_EVENTS);
        assert_eq!(queue.waiting[0], (10, "10".to_string()));
        let last = MAX_QUEUED_EVENTS as u64 + 9;
        assert_eq!(queue.waiting.last().unwrap(), &(last, last.to_string()));
    }
}
