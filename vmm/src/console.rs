//! The serial console on the user's terminal: raw mode while the guest runs (restored on every
//! exit path), QEMU's Ctrl-a escapes, and guest output written straight to stdout.

use devices::legacy::Serial;
use devices::lifecycle::{ExitReason, Lifecycle};
use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(0) == 1 }
}

/// Puts stdin in raw mode (output processing kept, as QEMU does) and remembers how to undo it.
/// With `signals` the terminal's Ctrl-C still interrupts nicvm, as on QEMU's plain stdio
/// (a monitor alone there); a console shared with the guest (`mon:stdio`) passes it on.
pub fn enter_raw_mode(signals: bool) -> io::Result<()> {
    // SAFETY: termios is plain old data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 and a valid termios pointer.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = SAVED_TERMIOS.set(t);
    let mut raw = t;
    // SAFETY: cfmakeraw edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    raw.c_oflag |= libc::OPOST;
    if signals {
        raw.c_lflag |= libc::ISIG;
    }
    // SAFETY: fd 0 and a valid termios pointer.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Restores the terminal if raw mode was entered. Safe to call more than once.
pub fn restore_terminal() {
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: fd 0 and the termios saved by enter_raw_mode.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
}

/// Guest console output on stdout, unbuffered so a crash loses nothing. Written to fd 1
/// itself, not through Rust's `Stdout`: a vCPU waiting for a reader that does not read (a
/// full pipe, a terminal stopped with Ctrl-S) must not hold the lock of `Stdout`, which the
/// exit path flushes (nicvm could not end while the reader slept).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            // SAFETY: writing bytes we borrow to fd 1.
            let n = unsafe { libc::write(1, rest.as_ptr().cast(), rest.len()) };
            if n > 0 {
                rest = &rest[n as usize..];
            } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                // A closed or failing stdout: the output is discarded; the guest must not notice.
                break;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const ESCAPE: u8 = 0x01; // Ctrl-a

const HELP: &str = "\r\nC-a h    print this help\r\nC-a x    exit nicvm\r\n\
C-a c    switch between the console and the monitor (-serial mon:stdio)\r\n\
C-a C-a  send C-a to the guest\r\n";

/// The monitor's side of a console shared with it: the line being typed.
struct MonitorInput {
    control: Arc<crate::monitor::Control>,
    active: bool,
    line: Vec<u8>,
}

impl MonitorInput {
    fn toggle(&mut self) {
        self.active = !self.active;
        if self.active {
            say(&format!("\r\n{}", crate::monitor::hmp::PROMPT));
        } else {
            say("\r\n");
        }
    }

    /// One byte typed while the monitor has the console.
    fn byte(&mut self, b: u8) {
        if self.control.exiting() {
            return; // after quit nothing runs
        }
        if b == b'\r' || b == b'\n' {
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            // Run without stdout's lock: a command that stops the vCPUs (stop, migrate) waits
            // for one that may be writing the guest's console output, under that lock.
            let text = crate::monitor::hmp::execute(&self.control, &line);
            let prompt = if self.control.exiting() {
                "" // quit: the console goes back to the shell
            } else {
                crate::monitor::hmp::PROMPT
            };
            say(&format!("\r\n{}{prompt}", crate::monitor::hmp::crlf(&text)));
            return;
        }
        match b {
            0x7f | 0x08 if self.line.pop().is_some() => say("\x08 \x08"),
            b if (0x20..0x7f).contains(&b) && self.line.len() < 4096 => {
                self.line.push(b);
                say(&(b as char).to_string());
            }
            _ => {}
        }
    }
}

/// The monitor's text on the console, in one write to fd 1 as the guest's output goes (see
/// [`Stdout`]): a stdout nobody reads holds up this thread, but no lock the exit needs.
fn say(text: &str) {
    let _ = Stdout.write_all(text.as_bytes());
}

/// Who reads what is typed on stdin.
pub enum StdinFor {
    /// The guest's serial port (`escapes`: QEMU's Ctrl-a keys, on a terminal).
    Guest { escapes: bool },
    /// The guest's serial port and the monitor, shared as QEMU's `mon:stdio` (Ctrl-a c
    /// switches, on a pipe too); `monitor_first`: the monitor has it at start.
    Shared {
        monitor: Arc<crate::monitor::Control>,
        monitor_first: bool,
    },
    /// The monitor alone (the serial port elsewhere), as QEMU's plain stdio: no Ctrl-a keys.
    Monitor(Arc<crate::monitor::Control>),
}

/// Reads stdin and feeds the guest's serial port or the monitor; runs on its own thread until
/// stdin closes or `stop` is written.
pub fn pump_stdin(
    serial: Arc<Mutex<Serial>>,
    lifecycle: Arc<Lifecycle>,
    stop: vmm_sys_util::eventfd::EventFd,
    reader: StdinFor,
) {
    pump(0, serial, lifecycle, stop, reader)
}

/// [`pump_stdin`] on any readable descriptor.
fn pump(
    input: std::os::fd::RawFd,
    serial: Arc<Mutex<Serial>>,
    lifecycle: Arc<Lifecycle>,
    stop: vmm_sys_util::eventfd::EventFd,
    reader: StdinFor,
) {
    let (escapes, monitor) = match reader {
        StdinFor::Guest { escapes } => (escapes, None),
        StdinFor::Shared {
            monitor,
            monitor_first,
        } => (true, Some((monitor, monitor_first))),
        StdinFor::Monitor(monitor) => (false, Some((monitor, true))),
    };
    let mut monitor = monitor.map(|(control, first)| {
        let mut m = MonitorInput {
            control,
            active: false,
            line: vec![],
        };
        if first {
            m.toggle();
        }
        m
    });
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 256];
    let mut escape_pending = false;
    // Input for the guest not handed to the serial port yet: a vCPU may hold the port for
    // long (writing to a stdout nobody reads), and the escapes (Ctrl-a x) must still work.
    let mut held: Vec<u8> = vec![];
    loop {
        // While the guest has not taken what it was given, stdin is not read (a pipe's writer
        // blocks), but the stop eventfd is still watched. Not while stdin is the monitor's:
        // a serial port that another client filled must not keep it from `cont`.
        let monitor_has_it = monitor.as_ref().is_some_and(|m| m.active);
        let port = match serial.try_lock() {
            Ok(port) => Some(port),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let pending = port.map_or(held.len(), |mut port| {
            if !held.is_empty() {
                port.queue_input(&held);
                held.clear();
            }
            port.input_pending()
        });
        let busy = !monitor_has_it && pending >= crate::serial_io::MAX_PENDING;
        let retry = busy || !held.is_empty();
        let mut fds = [
            libc::pollfd {
                // A negative fd is skipped (a hung-up stdin would wake poll at once).
                fd: if busy { -1 } else { input },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, the array's length given.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, if retry { 10 } else { -1 }) };
        if r < 0 {
            continue; // EINTR
        }
        if fds[1].revents != 0 {
            return;
        }
        // Woken by the timeout only (input held back for a busy port): reading now would
        // block until the next keystroke, and the held input would wait for it too.
        if fds[0].revents == 0 {
            continue;
        }
        // SAFETY: reading into a buffer we own, within its length.
        let n = unsafe { libc::read(input, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            // EOF or error: the guest gets no more input than what is held, which waits for
            // the serial port (or the stop eventfd).
            while !held.is_empty() {
                if let Ok(mut port) = serial.try_lock() {
                    port.queue_input(&held);
                    return;
                }
                let mut stop_fd = libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut stop_fd, 1, 10) } > 0 {
                    return;
                }
            }
            return;
        }
        let mut out = Vec::with_capacity(n as usize);
        for &b in &buf[..n as usize] {
            if escape_pending {
                escape_pending = false;
                match b {
                    b'x' | b'X' => {
                        // The exit message comes once, from main, with the others.
                        restore_terminal();
                        lifecycle.request_exit(ExitReason::User("Ctrl-a x".into()));
                        return;
                    }
                    b'h' | b'H' | b'?' => {
                        let _ = io::stderr().write_all(HELP.as_bytes());
                    }
                    ESCAPE => out.push(ESCAPE),
                    b'c' | b'C' => match &mut monitor {
                        Some(m) => m.toggle(),
                        None => {
                            let _ = io::stderr().write_all(
                                b"\r\nnicvm: no monitor on this console (-serial mon:stdio gives one)\r\n",
                            );
                        }
                    },
                    other => {
                        let _ = write!(
                            io::stderr(),
                            "\r\nnicvm: unknown escape Ctrl-a {} (Ctrl-a h lists them)\r\n",
                            (other as char).escape_default()
                        );
                    }
                }
            } else if escapes && b == ESCAPE {
                escape_pending = true;
            } else if let Some(m) = monitor.as_mut().filter(|m| m.active) {
                m.byte(b);
            } else {
                out.push(b);
            }
        }
        held.extend_from_slice(&out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::MutBusDevice;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Line typed while a vCPU holds the serial port (writing the guest's output): the console
    /// thread holds it back and must hand it over once the port is free, without waiting for
    /// the next keystroke. It used to go back to a blocking read and wait for one.
    #[test]
    fn input_held_back_for_a_busy_port_reaches_it_without_more_typing() {
        let (read_end, mut write_end) = std::io::pipe().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(io::sink()))));
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let vcpu_writing = serial.lock().unwrap();
        let pump_thread = {
            let (serial, stop) = (serial.clone(), stop.try_clone().unwrap());
            let lifecycle = Arc::new(Lifecycle::new().unwrap());
            std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                let reader = StdinFor::Guest { escapes: false };
                pump(read_end.as_raw_fd(), serial, lifecycle, stop, reader);
                drop(read_end);
            })
        };
        write_end.write_all(b"ls\n").unwrap();
        // The console thread reads the line and finds the port taken.
        std::thread::sleep(Duration::from_millis(100));
        drop(vcpu_writing);

        let deadline = Instant::now() + Duration::from_secs(5);
        let mut lsr = [0u8];
        while Instant::now() < deadline {
            serial.lock().unwrap().read(5, &mut lsr);
            if lsr[0] & 1 != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(lsr[0] & 1, 1, "the held-back line never reached the UART");
        let mut got = vec![];
        let mut b = [0u8];
        for _ in 0..3 {
            serial.lock().unwrap().read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"ls\n");

        stop.write(1).unwrap();
        pump_thread.join().unwrap();
    }
}
