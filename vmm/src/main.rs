//! nicvm: a minimal KVM virtual machine monitor whose reason to exist is networking.

use devices::lifecycle::ExitReason;
use nicvm::host::HostKind;
use nicvm::{cli, console, netdev, signals, vm};
use std::io::Write;
use std::time::Instant;

/// Log lines on stderr, `\r\n`-terminated because the terminal may be in raw mode.
struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let _ = write!(
                std::io::stderr().lock(),
                "nicvm: {}: {}\r\n",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("NICVM_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    let logger = Box::leak(Box::new(StderrLogger(level)));
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

fn fail(msg: impl std::fmt::Display) -> ! {
    console::restore_terminal();
    netdev::run_cleanups();
    eprintln!("nicvm: {msg}");
    std::process::exit(1);
}

fn main() {
    let timing = vm::Timing {
        start: Instant::now(),
        enabled: std::env::var_os("NICVM_TIMING").is_some(),
    };
    init_logging();
    // Block SIGINT/SIGTERM/SIGHUP before any thread or child exists: a signal during set-up
    // then waits in the signalfd and ends the VM cleanly (downscripts run) once it is up.
    let signals = signals::block_and_open().unwrap_or_else(|e| fail(format!("signalfd: {e}")));
    std::panic::set_hook(Box::new(|info| {
        console::restore_terminal();
        eprintln!("nicvm: internal error: {info}");
        netdev::run_cleanups();
        std::process::exit(3);
    }));

    let action = cli::parse(std::env::args_os().skip(1)).unwrap_or_else(|e| fail(e));
    let cfg = match action {
        cli::Action::Help => {
            print!("{}", cli::USAGE);
            return;
        }
        cli::Action::Version => {
            println!("nicvm {}", env!("CARGO_PKG_VERSION"));
            println!("host: {}", HostKind::detect().describe());
            println!("libslirp: {}", net_backends::slirp::version());
            return;
        }
        cli::Action::Run(c) => c,
    };
    vm::validate(&cfg).unwrap_or_else(|e| fail(e));
    let host = HostKind::detect();
    if host == HostKind::Emulating {
        log::info!("host is {}", host.describe());
    }

    let reason = vm::run(&cfg, host, timing, &signals).unwrap_or_else(|e| fail(e));
    console::restore_terminal();
    netdev::run_cleanups();
    let name = cfg
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    match &reason {
        ExitReason::Reboot | ExitReason::PowerOff => {}
        ExitReason::User(why) => eprintln!("nicvm{name}: terminating on {why}"),
        ExitReason::GuestPanic => eprintln!("nicvm{name}: guest kernel panicked (pvpanic)"),
        ExitReason::GuestCrash(why) => eprintln!("nicvm{name}: guest crashed: {why}"),
        ExitReason::Error(why) => eprintln!("nicvm{name}: error: {why}"),
    }
    let _ = std::io::stdout().flush();
    std::process::exit(reason.code());
}
