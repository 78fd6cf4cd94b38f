//! The descriptors nicvm was started with. `-netdev tap,fd=N` may only name one of these:
//! not one nicvm opened itself (its signalfd, a tap, a socket), not stdin/stdout/stderr.

use std::os::fd::RawFd;

/// A snapshot of the open descriptors, taken at the start of `main` before nicvm opens any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InheritedFds(Vec<RawFd>);

impl InheritedFds {
    /// Reads `/proc/self/fd`. Call it before the process opens anything of its own.
    pub fn snapshot() -> std::io::Result<InheritedFds> {
        let mut fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        // The listing includes the descriptor read_dir had open, closed again by now: keep
        // what is still open.
        // SAFETY: F_GETFD only inspects the descriptor number; it touches no memory.
        fds.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
        fds.sort_unstable();
        Ok(InheritedFds(fds))
    }

    /// A given set (tests; callers that know better).
    pub fn from_fds(fds: impl IntoIterator<Item = RawFd>) -> InheritedFds {
        let mut v: Vec<RawFd> = fds.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        InheritedFds(v)
    }

    pub fn contains(&self, fd: RawFd) -> bool {
        self.0.binary_search(&fd).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_snapshot_sees_what_is_open() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let s = InheritedFds::snapshot().unwrap();
        assert!(s.contains(f.as_raw_fd()));
        assert!(s.0.windows(2).all(|w| w[0] < w[1]), "sorted: {s:?}");
        let given = InheritedFds::from_fds([5, 3, 5]);
        assert!(given.contains(3) && given.contains(5) && !given.contains(4));
    }
}
