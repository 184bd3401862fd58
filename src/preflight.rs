//! What `run` needs from this host beyond the files' contents, checked
//! before anything is served (and by `check`): the audit log can be
//! appended to, the pid file can be written, and the upgrade socket lives in
//! a folder only this user can enter.
//!
//! The upgrade socket hands over listening sockets. Pingora creates it
//! `rw-rw-rw-` (for daemons that change user after binding it), so anyone
//! who can reach it could hand this process sockets, or, where the path is
//! free in a shared folder such as `/tmp`, receive the listeners of an
//! upgrading one. Its folder is what makes it private: owned by this user,
//! no access for anyone else, created that way (mode `0700`) when missing.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::audit::AuditTarget;
use crate::config::{ConfigError, GatewaySettings};

/// Whether this process may write into (create entries in) folder `dir`.
fn writable_folder(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// The folder of `path` (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Why `dir` is not a private folder of this user, if it is not.
fn not_private(dir: &Path) -> Option<String> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) => return Some(format!("cannot be read: {e}")),
    };
    // SAFETY: geteuid cannot fail and has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        Some("is not a folder".into())
    } else if meta.uid() != me {
        Some(format!(
            "belongs to uid {}, not to this user ({me})",
            meta.uid()
        ))
    } else if meta.mode() & 0o077 != 0 {
        Some(format!(
            "is open to others (mode {:o}); it must be owner-only, e.g. 700",
            meta.mode() & 0o7777
        ))
    } else if !writable_folder(dir) {
        Some("is not writable".into())
    } else {
        None
    }
}

/// Every reason `run` with `settings` would fail on this host before binding.
/// Paths are reported against `gateway_path`.
pub fn problems(gateway_path: &Path, settings: &GatewaySettings) -> Vec<ConfigError> {
    let mut found = Vec::new();
    let mut problem = |message: String| {
        found.push(ConfigError {
            file: gateway_path.to_path_buf(),
            line: None,
            message,
        })
    };
    if let Some(AuditTarget::File(path)) = &settings.audit {
        if let Err(e) = check_appendable(path) {
            problem(format!(
                "[audit] path {} cannot be appended to: {e}",
                path.display()
            ));
        }
    }
    let pid_dir = folder_of(Path::new(&settings.pid_file));
    let sock_dir = folder_of(Path::new(&settings.upgrade_sock));
    // `run` creates the socket's folder first: the pid file may live there.
    let created_by_run = pid_dir == sock_dir && !sock_dir.exists();
    if !writable_folder(pid_dir) && !created_by_run {
        problem(format!(
            "[process] pid_file {}: folder {} is missing or not writable",
            settings.pid_file,
            pid_dir.display()
        ));
    }
    if sock_dir.exists() {
        if let Some(why) = not_private(sock_dir) {
            problem(format!(
                "[process] upgrade_sock {}: folder {} {why}",
                settings.upgrade_sock,
                sock_dir.display()
            ));
        }
    } else if !writable_folder(folder_of(sock_dir)) {
        problem(format!(
            "[process] upgrade_sock {}: folder {} is missing and cannot be created",
            settings.upgrade_sock,
            sock_dir.display()
        ));
    }
    found
}

/// Opens nothing for good: an existing file is opened for appending, a
/// missing one needs a writable folder.
fn check_appendable(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
    } else if writable_folder(folder_of(path)) {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "folder {} is missing or not writable",
                folder_of(path).display()
            ),
        ))
    }
}

/// Creates the upgrade socket's folder owner-only when it is missing (its
/// parent must exist); an existing one is left as it is for [`problems`] to judge.
pub fn create_socket_folder(upgrade_sock: &str) -> std::io::Result<PathBuf> {
    let dir = folder_of(Path::new(upgrade_sock)).to_path_buf();
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(dir),
    }
}
