//! What opening a netdev leaves behind, undone when its [`NetdevGuard`] is dropped.
//!
//! The backends clean up after themselves in their own `Drop` (a stream or dgram backend
//! removes its socket file, VDE its private directory), but a backend handed to a NIC model
//! lives as long as the process: its threads never let it go. The guard, which the caller
//! keeps until the VM has ended, does the same work at the right time, and runs the tap's
//! downscript.

use super::script::DownScript;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Undoes a netdev's set-up when dropped: the downscript first (while the tap still
/// exists), then the files.
#[must_use = "dropping the guard runs the downscript and removes the netdev's files"]
#[derive(Debug, Default)]
// The fields are never read: they are held for what their Drop does.
#[allow(dead_code)]
pub struct NetdevGuard {
    // Fields drop in this order.
    pub(super) downscript: Option<DownScript>,
    pub(super) socket: Option<SocketFile>,
    pub(super) dir: Option<RemoveDir>,
}

/// A Unix socket file a backend bound: removed unless another has replaced it since.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Records the file at `path` as it is now; None when there is none.
    pub(super) fn record(path: &Path) -> Option<SocketFile> {
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(SocketFile {
            path: path.into(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A backend's private directory (VDE's socket directory), removed with what is in it.
#[derive(Debug)]
pub(super) struct RemoveDir(pub(super) PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
