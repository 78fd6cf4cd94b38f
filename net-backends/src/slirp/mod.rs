//! User-mode networking (`-netdev user`) on libslirp: DHCP, DNS forwarding, NAT to the host's
//! sockets and host port forwarding, with no privileges and no host interface.
//!
//! libslirp is not thread-safe, so each instance lives on a thread of its own, sleeping in
//! poll() on slirp's sockets and a wake-up eventfd until the next slirp timer: an idle guest
//! costs nothing. Frames from the guest reach that thread through a queue; frames for the
//! guest come back through another, with an eventfd the I/O thread watches.

mod ffi;
#[doc(hidden)]
pub mod handshake;

use crate::{Capabilities, NetBackend, UsernetAnswer, UsernetAsk};
use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Frames waiting for the guest beyond this are dropped (and counted); TCP recovers.
const RX_QUEUE_LIMIT: usize = 4096;
/// Frames from the guest waiting for the slirp thread beyond this are dropped (and counted):
/// a guest sending faster than slirp's sockets take the data cannot grow the queue without
/// bound.
const TX_QUEUE_LIMIT: usize = 4096;
/// Frames for the guest are announced to the I/O thread when the slirp thread has nothing
/// more to do at once, or when this many wait unannounced: libslirp reads one datagram a
/// socket a turn, and a wake-up for each had the two threads switching once a frame.
const RX_ANNOUNCE_BATCH: u32 = 32;

/// A `hostfwd=`/`guestfwd=` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwdSyntaxError {
    #[error("'{0}' is not [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport")]
    HostFwd(String),
    #[error("'{0}': the guest port cannot be 0")]
    GuestPortZero(String),
    #[error("'{0}' is not [tcp]:server:port-cmd:COMMAND or [tcp]:server:port-unix:PATH")]
    GuestFwd(String),
    #[error("'{0}': nicvm forwards to cmd:COMMAND or unix:PATH")]
    GuestFwdTarget(String),
}

/// Why a slirp backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum SlirpError {
    #[error("cannot create the {what} the slirp backend needs: {source}")]
    Resource {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the slirp thread died while starting")]
    ThreadDied,
    #[error("libslirp refused the configuration")]
    Refused,
    #[error("hostfwd: cannot listen on {proto} {addr}:{port} (port in use or not allowed)")]
    HostFwd {
        proto: &'static str,
        addr: Ipv4Addr,
        port: u16,
    },
    #[error(
        "guestfwd: cannot forward {addr}:{port} to {what} (address taken or not in the network)"
    )]
    GuestFwd {
        addr: Ipv4Addr,
        port: u16,
        what: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    /// 0.0.0.0: the first DHCP address.
    pub guest_addr: Ipv4Addr,
    pub guest_port: u16,
}

impl std::str::FromStr for HostFwd {
    type Err = FwdSyntaxError;
    /// `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`
    fn from_str(s: &str) -> Result<Self, FwdSyntaxError> {
        HostFwd::parse(s).map_err(|why| match why {
            "Bad guest port" if s.ends_with(":0") => FwdSyntaxError::GuestPortZero(s.into()),
            _ => FwdSyntaxError::HostFwd(s.into()),
        })
    }
}

impl HostFwd {
    /// Why `s` is not a forward, in QEMU's words, or None if it is one.
    pub fn syntax_error(s: &str) -> Option<&'static str> {
        HostFwd::parse(s).err()
    }

    /// A forward as QEMU reads one: its checks in its order, each failure with its reason.
    fn parse(s: &str) -> Result<HostFwd, &'static str> {
        let (proto, rest) = s.split_once(':').ok_or("No : separators")?;
        let udp = match proto {
            "" | "tcp" => false,
            "udp" => true,
            _ => return Err("Bad protocol name"),
        };
        let addr = |a: &str, why| match a {
            "" => Ok(Ipv4Addr::UNSPECIFIED),
            a => a.parse::<Ipv4Addr>().map_err(|_| why),
        };
        let (host, rest) = rest.split_once(':').ok_or("Missing : separator")?;
        let host_addr = addr(host, "Bad host address")?;
        let (host_port, rest) = rest.split_once('-').ok_or("Bad host port separator")?;
        let host_port = host_port.parse::<u16>().map_err(|_| "Bad host port")?;
        let (guest, guest_port) = rest.split_once(':').ok_or("Missing guest address")?;
        let guest_addr = addr(guest, "Bad guest address")?;
        let guest_port = match guest_port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err("Bad guest port"),
        };
        Ok(HostFwd {
            udp,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        })
    }
}

/// Where a `guestfwd=` connection goes on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFwdTarget {
    /// `cmd:COMMAND`: a command started per connection, its stdin/stdout the connection.
    Cmd(String),
    /// `unix:PATH`: a Unix stream socket.
    Unix(String),
}

/// `guestfwd=[tcp]:server:port-cmd:COMMAND` or `...-unix:PATH`: guest connections to
/// server:port go to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFwd {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub target: GuestFwdTarget,
}

impl std::str::FromStr for GuestFwd {
    type Err = FwdSyntaxError;
    fn from_str(s: &str) -> Result<Self, FwdSyntaxError> {
        let bad = || FwdSyntaxError::GuestFwd(s.to_string());
        let (fwd, target) = s.split_once('-').ok_or_else(bad)?;
        let fwd = fwd.strip_prefix("tcp").unwrap_or(fwd);
        let (addr, port) = fwd
            .strip_prefix(':')
            .ok_or_else(bad)?
            .rsplit_once(':')
            .ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let target = if let Some(c) = target.strip_prefix("cmd:") {
            GuestFwdTarget::Cmd(c.to_string())
        } else if let Some(p) = target.strip_prefix("unix:") {
            GuestFwdTarget::Unix(p.to_string())
        } else {
            return Err(FwdSyntaxError::GuestFwdTarget(s.to_string()));
        };
        if port == 0
            || matches!(&target, GuestFwdTarget::Cmd(c) | GuestFwdTarget::Unix(c) if c.is_empty())
        {
            return Err(bad());
        }
        Ok(GuestFwd { addr, port, target })
    }
}

/// `-netdev user` options, with QEMU's defaults.
#[derive(Debug, Clone)]
pub struct SlirpOptions {
    pub ipv4: bool,
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub host: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub ipv6: bool,
    pub ipv6_prefix: Ipv6Addr,
    pub ipv6_prefix_len: u8,
    pub ipv6_host: Ipv6Addr,
    pub ipv6_dns: Ipv6Addr,
    pub restrict: bool,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub dnssearch: Vec<String>,
    pub tftp: Option<String>,
    /// `tftp-server-name=`: the name DHCP gives as the TFTP server's (option 66).
    pub tftp_server_name: Option<String>,
    pub bootfile: Option<String>,
    pub hostfwd: Vec<HostFwd>,
    pub guestfwd: Vec<GuestFwd>,
}

impl Default for SlirpOptions {
    fn default() -> Self {
        SlirpOptions {
            ipv4: true,
            net: Ipv4Addr::new(10, 0, 2, 0),
            prefix: 24,
            host: Ipv4Addr::new(10, 0, 2, 2),
            dhcp_start: Ipv4Addr::new(10, 0, 2, 15),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            ipv6: true,
            ipv6_prefix: "fec0::".parse().unwrap(),
            ipv6_prefix_len: 64,
            ipv6_host: "fec0::2".parse().unwrap(),
            ipv6_dns: "fec0::3".parse().unwrap(),
            restrict: false,
            hostname: None,
            domainname: None,
            dnssearch: vec![],
            tftp: None,
            tftp_server_name: None,
            bootfile: None,
            hostfwd: vec![],
            guestfwd: vec![],
        }
    }
}

impl SlirpOptions {
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0))
    }

    /// Whether `a` is inside `net=`.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & u32::from(self.mask()) == u32::from(self.net)
    }
}

fn in_addr(a: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(a).to_be(),
    }
}

fn in6_addr(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: a.octets(),
    }
}

struct Timer {
    cb: Option<ffi::SlirpTimerCb>,
    cb_opaque: *mut libc::c_void,
    /// Expiry in ms on the clock_get_ns clock.
    expire_ms: Option<i64>,
}

/// Everything the C callbacks reach through their opaque pointer; owned by the slirp thread.
struct State {
    epoch: Instant,
    to_guest: FrameQueue,
    rx_ready: EventFd,
    dropped: Arc<AtomicU64>,
    timers: Vec<*mut Timer>,
    pollfds: Vec<libc::pollfd>,
    /// Frames queued for the guest and not yet announced on `rx_ready`: counted from a push
    /// onto an empty queue (the I/O thread may be asleep) to the next announcement (see
    /// [`RX_ANNOUNCE_BATCH`]).
    unannounced: std::cell::Cell<u32>,
}

impl State {
    /// Tells the I/O thread that frames wait, if any were queued unannounced.
    fn announce(&self) {
        if self.unannounced.replace(0) > 0 {
            let _ = self.rx_ready.write(1);
        }
    }

    fn now_ms(&self) -> i64 {
        (self.epoch.elapsed().as_nanos() / 1_000_000) as i64
    }
}

unsafe extern "C" fn cb_send_packet(
    buf: *const libc::c_void,
    len: libc::size_t,
    opaque: *mut libc::c_void,
) -> libc::ssize_t {
    // SAFETY: opaque is the State this slirp instance was created with; buf/len come from
    // libslirp and describe one frame.
    let (st, frame) = unsafe {
        (
            &*(opaque as *const State),
            std::slice::from_raw_parts(buf as *const u8, len),
        )
    };
    let mut q = st.to_guest.lock().unwrap();
    if q.frames.len() >= RX_QUEUE_LIMIT {
        st.dropped.fetch_add(1, Ordering::Relaxed);
        return len as libc::ssize_t;
    }
    // The reader drains until empty, so only frames that reach an empty queue need a
    // wake-up; it comes once this turn's work is done (see `RX_ANNOUNCE_BATCH`).
    let was_empty = q.frames.is_empty();
    q.push([frame]);
    drop(q);
    let owed = st.unannounced.get();
    if was_empty || owed > 0 {
        st.unannounced.set(owed + 1);
        if owed + 1 >= RX_ANNOUNCE_BATCH {
            st.announce();
        }
    }
    len as libc::ssize_t
}

unsafe extern "C" fn cb_guest_error(msg: *const libc::c_char, _opaque: *mut libc::c_void) {
    // SAFETY: libslirp passes a NUL-terminated message.
    let m = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    log::debug!("slirp: guest error: {m}");
}

unsafe extern "C" fn cb_clock_get_ns(opaque: *mut libc::c_void) -> i64 {
    // SAFETY: opaque is our State.
    let st = unsafe { &*(opaque as *const State) };
    st.epoch.elapsed().as_nanos() as i64
}

unsafe extern "C" fn cb_timer_new(
    cb: ffi::SlirpTimerCb,
    cb_opaque: *mut libc::c_void,
    opaque: *mut libc::c_void,
) -> *mut libc::c_void {
    // SAFETY: opaque is our State, used only on this thread.
    let st = unsafe { &mut *(opaque as *mut State) };
    let t = Box::into_raw(Box::new(Timer {
        cb: Some(cb),
        cb_opaque,
        expire_ms: None,
    }));
    st.timers.push(t);
    t.cast()
}

unsafe extern "C" fn cb_timer_free(timer: *mut libc::c_void, opaque: *mut libc::c_void) {
    // SAFETY: opaque is our State; timer is a pointer cb_timer_new returned.
    let st = unsafe { &mut *(opaque as *mut State) };
    let t = timer as *mut Timer;
    if let Some(i) = st.timers.iter().position(|&x| x == t) {
        st.timers.swap_remove(i);
        // SAFETY: created by Box::into_raw in cb_timer_new and removed from the list once.
        drop(unsafe { Box::from_raw(t) });
    }
}

unsafe extern "C" fn cb_timer_mod(
    timer: *mut libc::c_void,
    expire_time: i64,
    _opaque: *mut libc::c_void,
) {
    // SAFETY: timer is a live pointer from cb_timer_new.
    unsafe { (*(timer as *mut Timer)).expire_ms = Some(expire_time) };
}

unsafe extern "C" fn cb_register_poll_fd(_fd: libc::c_int, _opaque: *mut libc::c_void) {}
unsafe extern "C" fn cb_unregister_poll_fd(_fd: libc::c_int, _opaque: *mut libc::c_void) {}
unsafe extern "C" fn cb_notify(_opaque: *mut libc::c_void) {}

unsafe extern "C" fn cb_add_poll(
    fd: libc::c_int,
    events: libc::c_int,
    opaque: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: opaque is our State.
    let st = unsafe { &mut *(opaque as *mut State) };
    let mut ev = 0;
    if events & ffi::SLIRP_POLL_IN != 0 {
        ev |= libc::POLLIN;
    }
    if events & ffi::SLIRP_POLL_OUT != 0 {
        ev |= libc::POLLOUT;
    }
    if events & ffi::SLIRP_POLL_PRI != 0 {
        ev |= libc::POLLPRI;
    }
    st.pollfds.push(libc::pollfd {
        fd,
        events: ev,
        revents: 0,
    });
    (st.pollfds.len() - 1) as libc::c_int
}

unsafe extern "C" fn cb_get_revents(idx: libc::c_int, opaque: *mut libc::c_void) -> libc::c_int {
    // SAFETY: opaque is our State.
    let st = unsafe { &*(opaque as *const State) };
    let Some(p) = st.pollfds.get(idx as usize) else {
        return 0;
    };
    let r = p.revents;
    let mut out = 0;
    if r & libc::POLLIN != 0 {
        out |= ffi::SLIRP_POLL_IN;
    }
    if r & libc::POLLOUT != 0 {
        out |= ffi::SLIRP_POLL_OUT;
    }
    if r & libc::POLLPRI != 0 {
        out |= ffi::SLIRP_POLL_PRI;
    }
    if r & libc::POLLERR != 0 {
        out |= ffi::SLIRP_POLL_ERR;
    }
    if r & libc::POLLHUP != 0 {
        out |= ffi::SLIRP_POLL_HUP;
    }
    out
}

static CALLBACKS: ffi::SlirpCb = ffi::SlirpCb {
    send_packet: cb_send_packet,
    guest_error: cb_guest_error,
    clock_get_ns: cb_clock_get_ns,
    timer_new: cb_timer_new,
    timer_free: cb_timer_free,
    timer_mod: cb_timer_mod,
    register_poll_fd: cb_register_poll_fd,
    unregister_poll_fd: cb_unregister_poll_fd,
    notify: cb_notify,
    init_completed: None,
    timer_new_opaque: None,
};

/// Frames crossing between the I/O thread and the slirp thread (one queue each way), and the
/// buffers the receiving side emptied, which go back to the sending side: a frame costs two
/// copies and no allocation once the queue has warmed up.
type FrameQueue = Arc<Mutex<Frames>>;

#[derive(Default)]
struct Frames {
    frames: VecDeque<Vec<u8>>,
    /// Frames the slirp thread took in one go and has not finished with: they count
    /// against the queue's limit until their buffers come back.
    in_flight: usize,
    spare: Vec<Vec<u8>>,
}

/// Emptied buffers kept for reuse, per direction, and the largest kept (a full-size frame
/// fits; a buffer that held a 64 KiB frame is freed): at most 1 MiB held.
const SPARE_BUFFERS: usize = 256;
const SPARE_CAPACITY: usize = 4096;

impl Frames {
    /// Queues the frame made of `pieces`, in a spare buffer when there is one.
    fn push<'a>(&mut self, pieces: impl IntoIterator<Item = &'a [u8]>) {
        let mut v = self.spare.pop().unwrap_or_default();
        for p in pieces {
            v.extend_from_slice(p);
        }
        self.frames.push_back(v);
    }

    /// Takes back a buffer whose frame was used.
    fn recycle(&mut self, mut v: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS && v.capacity() <= SPARE_CAPACITY {
            v.clear();
            self.spare.push(v);
        }
    }
}

pub struct SlirpBackend {
    to_slirp: FrameQueue,
    wake: EventFd,
    to_guest: FrameQueue,
    rx_ready: EventFd,
    dropped: Arc<AtomicU64>,
    /// Asks the slirp thread to end; it is joined when the backend is dropped.
    stop: Arc<AtomicBool>,
    /// What monitors asked of libslirp, which is only called on the slirp thread.
    asks: Asks,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Monitors' pending requests (two monitors may ask at once): the slirp thread takes them and
/// answers each on its sender.
type Asks = Arc<Mutex<Vec<(UsernetAsk, Sender<UsernetAnswer>)>>>;

impl Drop for SlirpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SlirpBackend {
    /// Starts the slirp thread; errors (a forward that cannot bind) come back before it runs.
    pub fn new(opts: SlirpOptions) -> Result<SlirpBackend, SlirpError> {
        let resource = |what| move |source| SlirpError::Resource { what, source };
        let to_slirp = FrameQueue::default();
        let from_guest = to_slirp.clone();
        let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(resource("wake-up eventfd"))?;
        let rx_ready =
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(resource("receive eventfd"))?;
        let to_guest = FrameQueue::default();
        let dropped = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = channel::<Result<(), SlirpError>>();
        let (q, ready_fd, drops) = (
            to_guest.clone(),
            rx_ready.try_clone().map_err(resource("receive eventfd"))?,
            dropped.clone(),
        );
        let thread_wake = wake.try_clone().map_err(resource("wake-up eventfd"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let asks = Asks::default();
        let thread_asks = asks.clone();
        let thread = std::thread::Builder::new()
            .name("slirp".into())
            .spawn(move || {
                let st = State {
                    epoch: Instant::now(),
                    to_guest: q,
                    rx_ready: ready_fd,
                    dropped: drops,
                    timers: vec![],
                    pollfds: vec![],
                    unannounced: Default::default(),
                };
                let links = Links {
                    from_guest,
                    wake: thread_wake,
                    stop: &thread_stop,
                    asks: thread_asks,
                };
                run(opts, st, links, ready_tx)
            })
            .map_err(resource("thread"))?;
        let started = ready_rx.recv().unwrap_or(Err(SlirpError::ThreadDied));
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        Ok(SlirpBackend {
            to_slirp,
            wake,
            to_guest,
            rx_ready,
            dropped,
            stop,
            asks,
            thread: Some(thread),
        })
    }

    /// Queues frames for the slirp thread (`None`: a frame whose pieces were not given),
    /// reporting each one's fate: the whole batch under one lock and with at most one
    /// wake-up. A frame past the queue's limit is dropped and counted, as on a wire.
    fn enqueue<'a, 'b: 'a>(
        &mut self,
        frames: impl IntoIterator<Item = Option<&'a [IoSlice<'b>]>>,
        mut report: impl FnMut(io::Result<()>),
    ) {
        let mut q = self.to_slirp.lock().unwrap();
        let was_empty = q.frames.is_empty();
        for frame in frames {
            let Some(frame) = frame else {
                report(Err(io::Error::from(io::ErrorKind::InvalidInput)));
                continue;
            };
            if q.frames.len() + q.in_flight >= TX_QUEUE_LIMIT {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                q.push(frame.iter().map(|p| &**p));
            }
            report(Ok(()));
        }
        let queued = !q.frames.is_empty();
        drop(q);
        // The slirp thread drains until empty: wake it only for the first frames of a burst.
        if was_empty && queued {
            let _ = self.wake.write(1);
        }
    }
}

/// A live libslirp instance and the state its callbacks reach. libslirp calls back only from
/// within the calls made into it, and every callback makes its own reference to the state from
/// the raw pointer; so the thread itself reaches the state through the same pointer, only in
/// scopes that end before the next call into libslirp, and two references never overlap.
struct Instance {
    slirp: *mut ffi::Slirp,
    st: *mut State,
}

impl Instance {
    /// The state, while no call into libslirp is in progress.
    ///
    /// # Safety
    /// The caller holds the result only while it calls nothing in libslirp.
    unsafe fn state(&mut self) -> &mut State {
        // SAFETY: `st` came from Box::into_raw and lives until drop; the caller's contract
        // rules out a callback holding another reference at the same time.
        unsafe { &mut *self.st }
    }

    fn opaque(&self) -> *mut libc::c_void {
        self.st.cast()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.slirp.is_null() {
            // SAFETY: the instance is live; cleanup may call timer_free through the state,
            // which is still allocated.
            unsafe { ffi::slirp_cleanup(self.slirp) };
        }
        // SAFETY: from Box::into_raw in `run`; libslirp is gone, so nothing else refers to it.
        let st = unsafe { Box::from_raw(self.st) };
        for t in st.timers.iter() {
            // SAFETY: timers still in the list were never freed by libslirp.
            drop(unsafe { Box::from_raw(*t) });
        }
    }
}

/// What the slirp thread shares with its backend.
struct Links<'a> {
    from_guest: FrameQueue,
    wake: EventFd,
    stop: &'a AtomicBool,
    asks: Asks,
}

/// Out of file descriptors, libslirp's `accept` on a `hostfwd` listener fails and leaves the
/// client queued: the listener stays readable and the thread would poll it in a busy loop (a
/// guest can take the descriptors itself, each flow it opens holding a host socket). When the
/// thread turns over more than [`Starved::TURNS`] times in a second, it asks whether a
/// descriptor can be had; if not, the listeners that were readable rest for [`Starved::REST`]
/// (left out of the poll), as nicvm's own listeners do.
#[derive(Default)]
struct Starved {
    window: Option<Instant>,
    turns: u32,
    resting: Vec<RawFd>,
    until: Option<Instant>,
    warned: bool,
}

impl Starved {
    const TURNS: u32 = 100;
    const REST: Duration = Duration::from_millis(200);

    /// Leaves the resting listeners out of this poll; the timeout, shortened to the rest's end.
    fn mask(&mut self, fds: &mut [libc::pollfd], ms: libc::c_int) -> libc::c_int {
        let Some(until) = self.until else { return ms };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.until = None;
            self.resting.clear();
            return ms;
        }
        for p in fds.iter_mut().filter(|p| self.resting.contains(&p.fd)) {
            // A negative fd is skipped by poll and reported as no event.
            p.fd = -1;
        }
        let left = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        if ms < 0 {
            left
        } else {
            ms.min(left)
        }
    }

    /// After a poll: counts the turn; when [`Self::TURNS`] of them took less than a second,
    /// looks for starvation. The clock is read once per `TURNS` turns, not on every one.
    fn turned(&mut self, fds: &[libc::pollfd], probe: RawFd) {
        self.turns += 1;
        if self.turns < Self::TURNS || self.until.is_some() {
            return;
        }
        self.turns = 0;
        let now = Instant::now();
        let since = self.window.replace(now);
        if since.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            return;
        }
        // SAFETY: F_DUPFD_CLOEXEC of a descriptor we own; a new one is closed at once.
        let dup = unsafe { libc::fcntl(probe, libc::F_DUPFD_CLOEXEC, 0) };
        if dup >= 0 {
            // SAFETY: closing the descriptor just made.
            unsafe { libc::close(dup) };
            return;
        }
        let why = io::Error::last_os_error();
        let listening = |fd: RawFd| {
            let mut on: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into an int we own, its length given.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut on as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            r == 0 && on != 0
        };
        self.resting = fds
            .iter()
            .filter(|p| p.fd >= 0 && p.revents & libc::POLLIN != 0 && listening(p.fd))
            .map(|p| p.fd)
            .collect();
        if self.resting.is_empty() {
            return;
        }
        self.until = Some(now + Self::REST);
        if !std::mem::replace(&mut self.warned, true) {
            log::warn!(
                "slirp: no file descriptor to be had ({why}); hostfwd listeners are tried \
                 every {} ms",
                Self::REST.as_millis()
            );
        }
    }
}

fn run(opts: SlirpOptions, st: State, links: Links, ready: Sender<Result<(), SlirpError>>) {
    let Links {
        from_guest,
        wake,
        stop,
        asks,
    } = links;
    let cstr = |s: &Option<String>| {
        s.as_ref()
            .map(|v| CString::new(v.as_str()).unwrap_or_default())
    };
    let hostname = cstr(&opts.hostname);
    let domainname = cstr(&opts.domainname);
    let tftp = cstr(&opts.tftp);
    let tftp_server_name = cstr(&opts.tftp_server_name);
    let bootfile = cstr(&opts.bootfile);
    let search: Vec<CString> = opts
        .dnssearch
        .iter()
        .map(|s| CString::new(s.as_str()).unwrap_or_default())
        .collect();
    let mut search_ptrs: Vec<*const libc::c_char> = search.iter().map(|c| c.as_ptr()).collect();
    search_ptrs.push(std::ptr::null());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let cfg = ffi::SlirpConfig {
        version: 4,
        restricted: opts.restrict as libc::c_int,
        in_enabled: opts.ipv4,
        vnetwork: in_addr(opts.net),
        vnetmask: in_addr(opts.mask()),
        vhost: in_addr(opts.host),
        in6_enabled: opts.ipv6,
        vprefix_addr6: in6_addr(opts.ipv6_prefix),
        vprefix_len: opts.ipv6_prefix_len,
        vhost6: in6_addr(opts.ipv6_host),
        vhostname: ptr(&hostname),
        tftp_server_name: ptr(&tftp_server_name),
        tftp_path: ptr(&tftp),
        bootfile: ptr(&bootfile),
        vdhcp_start: in_addr(opts.dhcp_start),
        vnameserver: in_addr(opts.dns),
        vnameserver6: in6_addr(opts.ipv6_dns),
        vdnssearch: if search.is_empty() {
            std::ptr::null()
        } else {
            search_ptrs.as_ptr()
        },
        vdomainname: ptr(&domainname),
        if_mtu: 0,
        if_mru: 0,
        disable_host_loopback: false,
        enable_emu: false,
        outbound_addr: std::ptr::null(),
        outbound_addr6: std::ptr::null(),
        disable_dns: false,
        disable_dhcp: false,
    };
    let mut inst = Instance {
        slirp: std::ptr::null_mut(),
        st: Box::into_raw(Box::new(st)),
    };
    let opaque = inst.opaque();
    // SAFETY: cfg and the strings it points to outlive the instance (they live on this stack
    // frame and `inst` is dropped before them); CALLBACKS is static; opaque is the state the
    // instance owns.
    inst.slirp = unsafe { ffi::slirp_new(&cfg, &CALLBACKS, opaque) };
    let slirp = inst.slirp;
    if slirp.is_null() {
        let _ = ready.send(Err(SlirpError::Refused));
        return;
    }
    for f in &opts.hostfwd {
        // SAFETY: slirp is the live instance created above.
        if !unsafe { add_hostfwd(slirp, f) } {
            let proto = if f.udp { "udp" } else { "tcp" };
            let _ = ready.send(Err(SlirpError::HostFwd {
                proto,
                addr: f.host_addr,
                port: f.host_port,
            }));
            return;
        }
    }
    for f in &opts.guestfwd {
        let addr = in_addr(f.addr);
        let (what, r) = match &f.target {
            GuestFwdTarget::Cmd(c) => {
                let c = CString::new(c.as_str()).unwrap_or_default();
                // SAFETY: slirp is live; the strings and address outlive the call.
                ("cmd", unsafe {
                    ffi::slirp_add_exec(slirp, c.as_ptr(), &addr, f.port as libc::c_int)
                })
            }
            GuestFwdTarget::Unix(p) => {
                let p = CString::new(p.as_str()).unwrap_or_default();
                // SAFETY: as above.
                ("unix", unsafe {
                    ffi::slirp_add_unix(slirp, p.as_ptr(), &addr, f.port as libc::c_int)
                })
            }
        };
        if r < 0 {
            let _ = ready.send(Err(SlirpError::GuestFwd {
                addr: f.addr,
                port: f.port,
                what,
            }));
            return;
        }
    }
    let _ = ready.send(Ok(()));

    let mut batch = VecDeque::new();
    let mut handshakes = handshake::HandshakeGuard::default();
    let mut starved = Starved::default();
    // The last turn gave libslirp frames from the guest.
    let mut fed = false;
    // Frames for the guest that waited unannounced at the start of the last turn.
    let mut owed_before = 0;
    while !stop.load(Ordering::Relaxed) {
        {
            // SAFETY: no call into libslirp while `st` is live.
            let st = unsafe { inst.state() };
            st.pollfds.clear();
            st.pollfds.push(libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut timeout: u32 = u32::MAX;
        // SAFETY: slirp is live; cb_add_poll reaches the state through opaque.
        unsafe { ffi::slirp_pollfds_fill(slirp, &mut timeout, cb_add_poll, opaque) };
        // SAFETY: no call into libslirp while `st` is live (until the poll below).
        let st = unsafe { inst.state() };
        let now = st.now_ms();
        for &t in &st.timers {
            // SAFETY: timers in the list are live allocations from cb_timer_new.
            if let Some(exp) = unsafe { (*t).expire_ms } {
                timeout = timeout.min((exp - now).clamp(0, u32::MAX as i64) as u32);
            }
        }
        let ms = if fed {
            // libslirp sends what waited for the guest (an ARP answer, say) when it is polled,
            // not when it is given the frame that lets it: at once, not on its next timer.
            0
        } else if timeout == u32::MAX {
            -1
        } else {
            timeout.min(i32::MAX as u32) as libc::c_int
        };
        let ms = starved.mask(&mut st.pollfds, ms);
        let poll = |fds: &mut Vec<libc::pollfd>, ms| {
            // SAFETY: polling the array we own, with its length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }
        };
        // Frames for the guest wait unannounced, the last turn queued some: first see whether
        // there is more to do at once (a burst of datagrams), and announce them only when
        // there is not, or when a turn queued none (whatever else kept the thread busy).
        let owed = st.unannounced.get();
        let growing = owed > owed_before;
        owed_before = owed;
        let mut n = if growing && ms != 0 {
            poll(&mut st.pollfds, 0)
        } else {
            0
        };
        if n <= 0 {
            st.announce();
            owed_before = 0;
            n = poll(&mut st.pollfds, ms);
        }
        starved.turned(&st.pollfds, wake.as_raw_fd());
        let woken = st.pollfds[0].revents & libc::POLLIN != 0;
        // SAFETY: slirp is live; cb_get_revents reads the poll results through opaque (`st`
        // is not used after this point in the iteration).
        unsafe { ffi::slirp_pollfds_poll(slirp, (n < 0) as libc::c_int, cb_get_revents, opaque) };
        if woken {
            let _ = wake.read();
        }
        let asked = std::mem::take(&mut *asks.lock().unwrap());
        for (ask, answer) in asked {
            let added = match &ask {
                UsernetAsk::AddHostFwd(f) => Some(f.clone()),
                _ => None,
            };
            // SAFETY: slirp is live, and no reference to the state is held across the call.
            let result = unsafe { answer_ask(slirp, ask) };
            let heard = answer.send(result.clone()).is_ok();
            if let (false, Some(f), Ok(_)) = (heard, added, result) {
                // The monitor stopped waiting and told its user it did not happen: undone.
                let undo = UsernetAsk::RemoveHostFwd {
                    udp: f.udp,
                    addr: f.host_addr,
                    port: f.host_port,
                };
                // SAFETY: as above.
                let _ = unsafe { answer_ask(slirp, undo) };
            }
        }
        // The guest's frames, taken in one go so that the I/O thread never waits for slirp;
        // the queues swap places, keeping their allocations.
        {
            let mut q = from_guest.lock().unwrap();
            std::mem::swap(&mut batch, &mut q.frames);
            q.in_flight = batch.len();
        }
        fed = !batch.is_empty();
        for frame in &mut batch {
            handshakes.check(frame);
            // SAFETY: slirp is live; the frame is a valid buffer of its length.
            unsafe { ffi::slirp_input(slirp, frame.as_ptr(), frame.len() as libc::c_int) };
        }
        if !batch.is_empty() {
            let mut q = from_guest.lock().unwrap();
            for v in batch.drain(..) {
                q.recycle(v);
            }
            q.in_flight = 0;
        }
        // Fire due timers (a callback may free or re-arm timers, so walk a snapshot).
        let due: Vec<*mut Timer> = {
            // SAFETY: no call into libslirp while `st` is live.
            let st = unsafe { inst.state() };
            let now = st.now_ms();
            st.timers
                .iter()
                .copied()
                // SAFETY: live allocations from cb_timer_new.
                .filter(|&t| unsafe { (*t).expire_ms }.is_some_and(|e| e <= now))
                .collect()
        };
        for t in due {
            // SAFETY: no call into libslirp while the state is borrowed for this check.
            if !unsafe { inst.state() }.timers.contains(&t) {
                continue;
            }
            // SAFETY: still in the list, so still allocated.
            let (cb, arg) = unsafe {
                (*t).expire_ms = None;
                ((*t).cb, (*t).cb_opaque)
            };
            if let Some(cb) = cb {
                // SAFETY: calling libslirp's own timer callback with its own argument.
                unsafe { cb(arg) };
            }
        }
    }
}

/// Adds a host forward; false if libslirp cannot (the port is taken or not allowed).
///
/// # Safety
/// `slirp` is a live instance, called from its own thread.
unsafe fn add_hostfwd(slirp: *mut ffi::Slirp, f: &HostFwd) -> bool {
    // SAFETY: as the caller promises; the arguments are plain values.
    let r = unsafe {
        ffi::slirp_add_hostfwd(
            slirp,
            f.udp as libc::c_int,
            in_addr(f.host_addr),
            f.host_port as libc::c_int,
            in_addr(f.guest_addr),
            f.guest_port as libc::c_int,
        )
    };
    r >= 0
}

/// Does what a monitor asked.
///
/// # Safety
/// `slirp` is a live instance, called from its own thread, with no reference to its state
/// held (libslirp may call back).
unsafe fn answer_ask(slirp: *mut ffi::Slirp, ask: UsernetAsk) -> UsernetAnswer {
    match ask {
        // SAFETY: the table is a NUL-terminated string libslirp allocated with g_malloc
        // (malloc since GLib 2.46), read once and freed here.
        UsernetAsk::Info => Ok(unsafe {
            let p = ffi::slirp_connection_info(slirp);
            if p.is_null() {
                String::new()
            } else {
                let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
                libc::free(p.cast());
                s
            }
        }),
        // SAFETY: as the caller promises.
        UsernetAsk::AddHostFwd(f) => match unsafe { add_hostfwd(slirp, &f) } {
            true => Ok(String::new()),
            false => Err("the host port is in use or not allowed".into()),
        },
        UsernetAsk::RemoveHostFwd { udp, addr, port } => {
            // SAFETY: as the caller promises; plain values.
            let r = unsafe {
                ffi::slirp_remove_hostfwd(
                    slirp,
                    udp as libc::c_int,
                    in_addr(addr),
                    libc::c_int::from(port),
                )
            };
            match r {
                0 => Ok(String::new()),
                _ => Err("not found".into()),
            }
        }
    }
}

/// libslirp's version, for `nicvm --version`.
pub fn version() -> String {
    // SAFETY: a static NUL-terminated string from the library.
    unsafe { CStr::from_ptr(ffi::slirp_version_string()) }
        .to_string_lossy()
        .into_owned()
}

impl NetBackend for SlirpBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        self.enqueue([Some(frame)], |_| {});
        Ok(())
    }

    fn send_batch(&mut self, iov: &[IoSlice<'_>], ends: &[usize], out: &mut Vec<io::Result<()>>) {
        let mut start = 0;
        let frames = ends.iter().map(|&end| {
            let frame = iov.get(start..end);
            start = end.max(start);
            frame
        });
        self.enqueue(frames, |r| out.push(r));
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut q = self.to_guest.lock().unwrap();
        let f = match q.frames.pop_front() {
            Some(f) => f,
            None => {
                let _ = self.rx_ready.read();
                match q.frames.pop_front() {
                    Some(f) => f,
                    None => return Ok(None),
                }
            }
        };
        // The last one taken: not readable any more (a frontend that takes one frame a turn
        // would otherwise come back for nothing). A frame that comes meanwhile finds the
        // queue empty and is announced again (see `RX_ANNOUNCE_BATCH`).
        if q.frames.is_empty() {
            let _ = self.rx_ready.read();
        }
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        q.recycle(f);
        Ok(Some(n))
    }

    /// The frames waiting, up to `n`, under one lock.
    fn recv_batch(
        &mut self,
        slab: &mut [u8],
        slot: usize,
        n: usize,
        frames: &mut Vec<(usize, usize)>,
    ) -> io::Result<()> {
        let mut q = self.to_guest.lock().unwrap();
        for i in 0..n {
            let Some(buf) = crate::slot_of(slab, slot, i) else {
                break;
            };
            let Some(f) = q.frames.pop_front() else { break };
            let len = f.len().min(buf.len());
            buf[..len].copy_from_slice(&f[..len]);
            frames.push((i, f.len()));
            q.recycle(f);
        }
        // All taken: not readable any more, as after `recv`'s last frame. A frame queued
        // after this finds the queue empty and is announced again.
        if q.frames.is_empty() {
            let _ = self.rx_ready.read();
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.rx_ready.as_raw_fd()
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn usernet(&self, ask: UsernetAsk) -> Option<std::sync::mpsc::Receiver<UsernetAnswer>> {
        let (tx, rx) = channel();
        let mut asked = self.asks.lock().unwrap();
        // Bounded, should the thread not answer: the oldest callers gave up long ago.
        if asked.len() >= 64 {
            asked.remove(0);
        }
        asked.push((ask, tx));
        drop(asked);
        // The thread answers on its next turn, at once when woken.
        let _ = self.wake.write(1);
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_in_reused_buffers() {
        let mut q = Frames::default();
        q.push([&b"abc"[..], b"de"]);
        let v = q.frames.pop_front().unwrap();
        assert_eq!(v, b"abcde");
        let at = v.as_ptr();
        q.recycle(v);
        q.push([&b"xy"[..]]);
        let w = q.frames.pop_front().unwrap();
        assert_eq!(
            (&w[..], w.as_ptr()),
            (&b"xy"[..], at),
            "the same allocation"
        );
        for _ in 0..SPARE_BUFFERS + 10 {
            q.recycle(Vec::with_capacity(8));
        }
        assert_eq!(q.spare.len(), SPARE_BUFFERS, "spares are bounded");
        q.spare.clear();
        q.recycle(Vec::with_capacity(65_536));
        assert!(
            q.spare.is_empty(),
            "a buffer for a 64 KiB frame is not kept"
        );
    }

    #[test]
    fn hostfwd_syntax() {
        let f: HostFwd = "tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert_eq!(
            f,
            HostFwd {
                udp: false,
                host_addr: Ipv4Addr::LOCALHOST,
                host_port: 2222,
                guest_addr: Ipv4Addr::UNSPECIFIED,
                guest_port: 22
            }
        );
        let f: HostFwd = "udp::5555-10.0.2.15:5555".parse().unwrap();
        assert!(f.udp && f.guest_addr == Ipv4Addr::new(10, 0, 2, 15));
        let f: HostFwd = "::1234-:80".parse().unwrap();
        assert!(!f.udp && f.host_port == 1234);
        for bad in [
            "tcp:2222:22",
            "sctp::1-:2",
            "tcp::x-:22",
            "tcp::1-:0",
            "tcp::70000-:1",
            "tcp:1.2.3:1-:2",
        ] {
            assert!(bad.parse::<HostFwd>().is_err(), "{bad}");
        }
    }

    /// Every rule FromStr refuses has QEMU's reason, and every one it takes has none.
    #[test]
    fn hostfwd_syntax_errors_in_qemus_words() {
        for (rule, why) in [
            ("tcp", Some("No : separators")),
            ("sctp::1-:2", Some("Bad protocol name")),
            ("tcp:1", Some("Missing : separator")),
            ("tcp:1-:2", Some("Bad host address")),
            ("tcp:[::1]:1-:2", Some("Bad host address")),
            ("tcp::1:2", Some("Bad host port separator")),
            ("tcp::70000-:2", Some("Bad host port")),
            ("tcp::1-2", Some("Missing guest address")),
            ("tcp::1-10.0.2.x:2", Some("Bad guest address")),
            ("tcp::1-:0", Some("Bad guest port")),
            ("tcp::1-:", Some("Bad guest port")),
            ("udp:127.0.0.1:0-10.0.2.15:53", None),
            ("::2222-:22", None),
            (":2222-:22", Some("Bad host address")),
        ] {
            assert_eq!(HostFwd::syntax_error(rule), why, "{rule}");
            assert_eq!(rule.parse::<HostFwd>().is_err(), why.is_some(), "{rule}");
        }
    }

    #[test]
    fn guestfwd_syntax() {
        let f: GuestFwd = "tcp:10.0.2.100:7000-cmd:cat > /tmp/x".parse().unwrap();
        assert_eq!(f.addr, Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(f.target, GuestFwdTarget::Cmd("cat > /tmp/x".into()));
        let f: GuestFwd = ":10.0.2.100:7000-unix:/run/s.sock".parse().unwrap();
        assert_eq!(f.target, GuestFwdTarget::Unix("/run/s.sock".into()));
        for bad in [
            "tcp:10.0.2.100:7000",
            "tcp:10.0.2.100:7000-tcp:127.0.0.1:80",
            "tcp:10.0.2.100:0-cmd:x",
            "udp:1.2.3.4:5-cmd:x",
        ] {
            assert!(bad.parse::<GuestFwd>().is_err(), "{bad}");
        }
    }

    /// The tests that start a slirp thread run one at a time: one of them counts the
    /// process's slirp threads.
    fn one_slirp_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        static SLIRP_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SLIRP_TESTS.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slirp thread ends when the backend goes (it used to run until the process did).
    #[test]
    fn dropping_the_backend_ends_its_thread() {
        let _one = one_slirp_at_a_time();
        let threads = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter(|t| {
                    let p = t.as_ref().unwrap().path().join("comm");
                    std::fs::read_to_string(p).is_ok_and(|c| c.trim() == "slirp")
                })
                .count()
        };
        let before = threads();
        let b = SlirpBackend::new(SlirpOptions::default()).unwrap();
        assert_eq!(threads(), before + 1);
        drop(b);
        // Joined: the thread has ended; the kernel may list it for a moment longer.
        let t0 = Instant::now();
        while threads() > before && t0.elapsed() < std::time::Duration::from_secs(2) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(threads(), before);
    }

    /// Forwards added and removed while the backend runs (HMP's hostfwd_add, hostfwd_remove):
    /// the host port is listened on from the add to the remove, and not before or after.
    #[test]
    fn host_forwards_come_and_go_while_it_runs() {
        let _one = one_slirp_at_a_time();
        let b = SlirpBackend::new(SlirpOptions::default()).unwrap();
        let ask = |a: UsernetAsk| {
            b.usernet(a)
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap()
        };
        let removal = |port| UsernetAsk::RemoveHostFwd {
            udp: false,
            addr: Ipv4Addr::LOCALHOST,
            port,
        };
        // A free loopback port, let go again (another may take it meanwhile: then another).
        let (port, fwd) = (0..5)
            .find_map(|_| {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                let fwd: HostFwd = format!("tcp:127.0.0.1:{port}-:22").parse().unwrap();
                assert_eq!(ask(removal(port)), Err("not found".into()));
                (ask(UsernetAsk::AddHostFwd(fwd.clone())) == Ok(String::new()))
                    .then_some((port, fwd))
            })
            .expect("a forward on a free port");
        let remove = removal(port);
        // libslirp listens on it now: connecting works, binding it again does not.
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("the forward listens");
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        let table = ask(UsernetAsk::Info).unwrap();
        assert!(
            table.contains("HOST_FORWARD") && table.contains(&port.to_string()),
            "{table}"
        );
        // The same port twice cannot be.
        assert!(ask(UsernetAsk::AddHostFwd(fwd)).is_err());
        // UDP on that port is another forward, not this one.
        let udp_remove = UsernetAsk::RemoveHostFwd {
            udp: true,
            addr: Ipv4Addr::LOCALHOST,
            port,
        };
        assert_eq!(ask(udp_remove), Err("not found".into()));
        assert_eq!(ask(remove.clone()), Ok(String::new()));
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert_eq!(ask(remove), Err("not found".into()));
    }

    /// The receive fd is readable while frames wait, and no longer once the last one was
    /// taken (not only once a read found the queue empty).
    #[test]
    fn readable_exactly_while_frames_wait() {
        let _one = one_slirp_at_a_time();
        let mut b = SlirpBackend::new(SlirpOptions::default()).unwrap();
        assert!(!readable(&b, 0));
        b.send(&[IoSlice::new(&arp_for_the_gateway())]).unwrap();
        assert!(readable(&b, 5000), "no ARP reply");
        let mut buf = [0u8; 2048];
        let n = b.recv(&mut buf).unwrap().expect("the reply");
        assert_eq!(&buf[12..14], &[0x08, 0x06], "{:x?}", &buf[..n]);
        assert!(!readable(&b, 0), "readable with nothing waiting");
    }

    /// A batch goes to libslirp whole, in order, each frame's fate reported: three ARP
    /// requests (for the gateway, the DNS address, the gateway again; pieces of one split
    /// across two slices) get three answers; a frame whose end lies before its start is
    /// refused and the ones after it still go. The answers come back in batches no larger
    /// than asked.
    #[test]
    fn a_batch_reaches_slirp_frame_by_frame() {
        let _one = one_slirp_at_a_time();
        let mut b = SlirpBackend::new(SlirpOptions::default()).unwrap();
        let gw = arp_for_the_gateway();
        let mut dns = gw.clone();
        dns[41] = 3;
        let iov = [
            IoSlice::new(&gw),
            IoSlice::new(&dns[..20]),
            IoSlice::new(&dns[20..]),
            IoSlice::new(&gw),
        ];
        let mut out = vec![];
        b.send_batch(&iov, &[1, 3, 2, 4], &mut out);
        let kinds: Vec<_> = out
            .iter()
            .map(|r| r.as_ref().map_err(io::Error::kind))
            .collect();
        assert_eq!(
            kinds,
            [Ok(&()), Ok(&()), Err(io::ErrorKind::InvalidInput), Ok(&())]
        );
        // The answers, taken in batches of at most two (slots of 2 KiB).
        let mut answered = vec![];
        let (mut slab, mut taken) = (vec![0u8; 3 * 2048], vec![]);
        let t0 = Instant::now();
        while answered.len() < 3 && t0.elapsed() < Duration::from_secs(5) {
            taken.clear();
            b.recv_batch(&mut slab, 2048, 2, &mut taken).unwrap();
            assert!(taken.len() <= 2 && taken.iter().all(|&(i, _)| i < 2));
            for &(i, n) in &taken {
                let f = &slab[i * 2048..i * 2048 + n];
                // An ARP reply: the address it answers for.
                if n >= 42 && f[12..14] == [8, 6] && f[21] == 2 {
                    answered.push(f[31]);
                }
            }
            if taken.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(answered, [2, 3, 2]);
    }

    /// Whether the backend's receive fd becomes readable within `ms`.
    fn readable(b: &SlirpBackend, ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: b.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        unsafe { libc::poll(&mut p, 1, ms) == 1 }
    }

    /// An ARP request from the guest (10.0.2.15) for the gateway: slirp answers it, and
    /// learns where the guest is.
    fn arp_for_the_gateway() -> Vec<u8> {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 10, 0, 2, 2]);
        arp.resize(60, 0);
        arp
    }

    /// Frames for the guest are announced late, once slirp has nothing more to do at once
    /// (or 32 of them wait): a burst of datagrams all arrive, and so does a lone one after
    /// it, at once (the reader is not left waiting for a next frame that would announce it).
    #[test]
    fn a_burst_and_a_lone_datagram_after_it_reach_the_guest() {
        let _one = one_slirp_at_a_time();
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap()
            .port();
        let opts = SlirpOptions {
            ipv6: false,
            hostfwd: vec![format!("udp:127.0.0.1:{port}-:7").parse().unwrap()],
            ..SlirpOptions::default()
        };
        let mut b = SlirpBackend::new(opts).unwrap();
        let mut buf = [0u8; 2048];
        // Datagrams to the guest's port 7 among what waits (ARP frames are skipped).
        let mut take = |b: &mut SlirpBackend| {
            let mut got = 0;
            while let Some(n) = b.recv(&mut buf).unwrap() {
                got += (n > 42 && buf[12..14] == [8, 0] && buf[23] == 17 && buf[36..38] == [0, 7])
                    as usize;
            }
            got
        };
        b.send(&[IoSlice::new(&arp_for_the_gateway())]).unwrap();
        let host = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        host.connect(("127.0.0.1", port)).unwrap();
        // One through first: the forward's socket may be read before the ARP is taken.
        let t0 = Instant::now();
        let mut through = false;
        while !through && t0.elapsed() < Duration::from_secs(5) {
            host.send(&[1; 64]).unwrap();
            through = readable(&b, 100) && take(&mut b) > 0;
        }
        assert!(through, "no datagram came through the forward");
        while readable(&b, 100) {
            take(&mut b);
        }
        // 128 small ones (the forward's socket buffer holds them all), then the reader.
        const BURST: usize = 128;
        for _ in 0..BURST {
            host.send(&[2; 64]).unwrap();
        }
        let mut got = 0;
        while got < BURST && readable(&b, 2000) {
            got += take(&mut b);
        }
        assert_eq!(got, BURST);
        host.send(&[3; 64]).unwrap();
        let t0 = Instant::now();
        assert!(readable(&b, 2000), "the lone datagram was not announced");
        assert_eq!(take(&mut b), 1);
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn network_math() {
        let o = SlirpOptions::default();
        assert_eq!(o.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(o.contains(Ipv4Addr::new(10, 0, 2, 15)));
        assert!(!o.contains(Ipv4Addr::new(10, 0, 3, 15)));
    }
}
