//! Loopback ports for tests, shared by nicvm's tests and net-backends' (which include this
//! file by path).

/// A loopback port free for TCP and UDP, for a test's listener (a hostfwd, a monitor, a
/// socket backend): below the kernel's ephemeral range (32768 up, unless the host says
/// otherwise), so no outgoing connection takes it meanwhile and a client dialling it cannot
/// connect to itself; and never the same twice in this process, so tests running side by side
/// do not pick one port (asking the kernel for a free one and closing it could give two
/// threads the same port). Test processes of one run start at different places.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let first: u32 = ephemeral.saturating_sub(12_000).max(1_024);
    let span = ephemeral.saturating_sub(first).max(1);
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (first + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {first}..{}", first + span);
}
