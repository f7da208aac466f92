//! `file`: read, write, list, hash, move and delete files inside one
//! configured root folder.
//!
//! The root is opened once, at start, as a handle; every path of a task is
//! resolved relative to that handle by the kernel with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! and `O_NOFOLLOW`, so a lookup can neither leave the root nor follow a
//! symlink, whatever else renames, swaps or plants links inside the root
//! meanwhile (the check and the open are one system call). Whether
//! `openat2` is usable is probed once; where it is not (ENOSYS before 5.6,
//! EPERM from a seccomp filter, EINVAL for an unknown flag, or any other
//! failure of the probe) every lookup goes through a walk that opens each
//! component relative to the previous one with `O_NOFOLLOW`, the same
//! guarantee. `..` and absolute paths are refused before any lookup.
//!
//! What a path leads to is checked on the opened file itself (`fstat` of
//! the handle): anything but a regular file (or a folder, for `list`) is
//! refused before any I/O. Files are first opened with `O_PATH` (which
//! reads or writes nothing and does not block on a FIFO), checked, then
//! reopened through that same handle for reading or writing with
//! `O_NONBLOCK`. Symlinks are never followed: they are listed, and can be
//! deleted (dangling or not), nothing else. Writes are capped per task
//! (`max_write_bytes`), per file (`max_file_bytes`, appends included) and
//! for the whole root (`max_total_bytes`), and `hash` by the file's size
//! (`max_hash_bytes`); long loops (hash, list) stop when the task is
//! cancelled or past its deadline. A `list` is cut at `max_list_entries`
//! and at `max_list_bytes` of result; the walk that measures the root for
//! `max_total_bytes` fails closed (writes that grow are refused) past
//! `max_walk_entries` entries instead of under-counting.

use super::schema::Schema;
use super::util::{base64_decode, base64_encode, Stop};
use super::util::{blocking, cfg_str, cfg_u64, config_err, failed, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const NAME: &str = "file";

/// The `max_read_bytes` that still comes back in one result under the
/// default 1 MiB MQTT payload, base64 and envelope included (672 KiB).
pub const DEFAULT_MAX_READ_BYTES: u64 = super::util::result_budget(1 << 20);

/// How long a measurement of the root's total size is trusted (the
/// plugin's own writes are added to it in between).
const USAGE_TTL: Duration = Duration::from_secs(10);

/// Entries the total-size walk looks at by default (`max_walk_entries`);
/// with more under the root its total is not known, and writes that grow
/// it are refused.
pub const DEFAULT_MAX_WALK_ENTRIES: u64 = 200_000;

/// What one `list` entry takes in a result besides its name: the map and
/// its three keys, the type and the size.
const LIST_ENTRY_BYTES: u64 = 48;

/// Whether openat2 with our resolve flags works here, probed once.
static OPENAT2: OnceLock<bool> = OnceLock::new();

#[derive(Debug, Default)]
struct Usage {
    bytes: u64,
    measured: Option<Instant>,
    /// A walk that could not count the root, kept as long as a total
    /// would be: writes do not walk 200,000 entries each to be refused.
    refused: Option<(Instant, PluginError)>,
}

/// The file plugin.
#[derive(Debug, Clone)]
pub struct FilePlugin {
    root: PathBuf,
    /// `O_PATH | O_DIRECTORY` handle on the root: every lookup starts here.
    dir: Arc<OwnedFd>,
    max_read_bytes: u64,
    max_write_bytes: u64,
    max_list_entries: u64,
    /// Bytes the entries of one `list` may take in the result.
    max_list_bytes: u64,
    /// Entries the total-size walk looks at before it gives up.
    max_walk_entries: u64,
    max_hash_bytes: u64,
    max_file_bytes: u64,
    max_total_bytes: u64,
    usage: Arc<Mutex<Usage>>,
}

fn cstr(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path contains NUL"))
}

fn fd_or_err(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

fn openat(dir: RawFd, name: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: a valid NUL-terminated path and a descriptor we hold.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    fd_or_err(fd as libc::c_long)
}

fn openat2_beneath(dir: RawFd, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(rel)?;
    // SAFETY: open_how is plain data; zeroed then filled.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the documented openat2 arguments.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    fd_or_err(fd)
}

/// Whether openat2 can be used: one call that must succeed, `.` beneath
/// the root with the resolve flags of every lookup. Any failure (ENOSYS
/// before Linux 5.6, EPERM from a container's seccomp filter, EINVAL or
/// E2BIG where the kernel does not know a flag) means the walk below is
/// used for every path: it gives the same guarantees, so "not supported"
/// never turns into a plain open.
fn openat2_works(dir: RawFd) -> bool {
    *OPENAT2.get_or_init(|| {
        match openat2_beneath(dir, Path::new("."), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0) {
            Ok(_) => true,
            Err(e) => {
                log::info!(
                    "file plugin: openat2 with RESOLVE_BENEATH is not usable here ({e}); resolving paths component by component with O_NOFOLLOW"
                );
                false
            }
        }
    })
}

/// Opens `rel` beneath `dir` with the kernel's guarantee: never outside,
/// never through a symlink (the last component not followed either).
fn open_beneath(dir: RawFd, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if openat2_works(dir) {
        // Its errors are answers (ENOENT, ELOOP, EXDEV ...), never a
        // reason to open another way.
        return openat2_beneath(dir, rel, flags, mode);
    }
    walk_beneath(dir, rel, flags, mode)
}

/// The same guarantee without openat2: each component opened relative to
/// the previous one, `O_NOFOLLOW` every time (`rel` has no `..`).
fn walk_beneath(dir: RawFd, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let Some((last, inner)) = parts.split_last() else {
        return openat(dir, Path::new("."), flags, mode);
    };
    let mut held: Option<OwnedFd> = None;
    for part in inner {
        let at = held.as_ref().map_or(dir, |f| f.as_raw_fd());
        let next = openat(
            at,
            Path::new(part),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| as_link_error(at, part, e))?;
        held = Some(next);
    }
    let at = held.as_ref().map_or(dir, |f| f.as_raw_fd());
    openat(at, Path::new(last), flags, mode).map_err(|e| as_link_error(at, last, e))
}

/// A symlink opened with `O_NOFOLLOW | O_DIRECTORY` fails with ENOTDIR:
/// reported as ELOOP, as openat2's RESOLVE_NO_SYMLINKS does.
fn as_link_error(at: RawFd, name: &std::ffi::OsStr, e: io::Error) -> io::Error {
    if e.raw_os_error() != Some(libc::ENOTDIR) {
        return e;
    }
    let link = openat(at, Path::new(name), libc::O_PATH | libc::O_NOFOLLOW, 0)
        .ok()
        .and_then(|f| File::from(f).metadata().ok())
        .is_some_and(|m| m.file_type().is_symlink());
    if link {
        io::Error::from_raw_os_error(libc::ELOOP)
    } else {
        e
    }
}

/// Opens the file behind an `O_PATH` handle again for I/O: the same file,
/// whatever happened to its name since (through /proc's handle links; with
/// no /proc, by a second lookup that must find the same file).
fn reopen(dir: RawFd, rel: &Path, handle: &OwnedFd, flags: i32) -> io::Result<File> {
    let flags = flags | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let proc_link = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let f = match openat(libc::AT_FDCWD, &proc_link, flags, 0) {
        Ok(f) => File::from(f),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            File::from(open_beneath(dir, rel, flags, 0)?)
        }
        Err(e) => return Err(e),
    };
    let (a, b) = (File::from(handle.try_clone()?).metadata()?, f.metadata()?);
    if a.dev() != b.dev() || a.ino() != b.ino() || !b.file_type().is_file() {
        return Err(io::Error::other("it was replaced while being opened"));
    }
    Ok(f)
}

/// Reads the regular file `rel` beneath `root` with the same guarantees as
/// the file plugin (never outside, no symlinks, no special files), at most
/// `max` bytes. For other plugins reading from a configured folder.
#[cfg_attr(not(feature = "inference"), allow(dead_code))]
pub(crate) fn read_beneath(root: &Path, rel: &Path, max: u64) -> io::Result<Vec<u8>> {
    let dir = openat(libc::AT_FDCWD, root, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let fd = open_beneath(dir.as_raw_fd(), rel, libc::O_PATH, 0)?;
    let m = stat(&fd)?;
    if !m.file_type().is_file() {
        return Err(io::Error::other(format!(
            "not a regular file (it is a {})",
            kind(&m)
        )));
    }
    if m.len() > max {
        return Err(io::Error::other(format!(
            "{} bytes, more than {max}",
            m.len()
        )));
    }
    let f = reopen(dir.as_raw_fd(), rel, &fd, libc::O_RDONLY)?;
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::other(format!("grew past {max} bytes")));
    }
    Ok(buf)
}

fn stat(fd: &OwnedFd) -> io::Result<Metadata> {
    File::from(fd.try_clone()?).metadata()
}

fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "device"
    }
}

/// Names in a folder (not `.` and `..`), read with getdents64.
fn read_names(dir: &OwnedFd, stop: &Stop, max: usize) -> Result<(Vec<Vec<u8>>, bool), PluginError> {
    let mut names = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        stop.check(NAME)?;
        // SAFETY: a buffer of the given length and a directory descriptor.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(failed(
                NAME,
                format!("listing: {}", io::Error::last_os_error()),
            ));
        }
        if n == 0 {
            return Ok((names, false));
        }
        let mut at = 0usize;
        while at < n as usize {
            // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            let name = &buf[at + 19..at + reclen];
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            if name != b"." && name != b".." {
                if names.len() >= max {
                    return Ok((names, true));
                }
                names.push(name.to_vec());
            }
            at += reclen;
        }
    }
}

impl FilePlugin {
    /// Config keys: `root` (required, an existing folder), `max_read_bytes`
    /// (default 672 KiB: what comes back base64-encoded in one result under
    /// the default MQTT payload limit), `max_write_bytes` (default 1 MiB),
    /// `max_list_entries` (default 10000), `max_list_bytes` (default
    /// 672 KiB), `max_hash_bytes` (default 1 GiB), `max_file_bytes`
    /// (default 64 MiB), `max_total_bytes` (default 1 GiB),
    /// `max_walk_entries` (default 200000).
    pub fn from_config(config: &toml::Table) -> Result<FilePlugin, PluginError> {
        check_keys(
            NAME,
            config,
            &[
                "root",
                "max_read_bytes",
                "max_write_bytes",
                "max_list_entries",
                "max_list_bytes",
                "max_walk_entries",
                "max_hash_bytes",
                "max_file_bytes",
                "max_total_bytes",
            ],
        )?;
        let root = cfg_str(NAME, config, "root")?
            .ok_or_else(|| config_err(NAME, "root", "required: the folder tasks may use"))?;
        let canonical = Path::new(&root)
            .canonicalize()
            .map_err(|e| config_err(NAME, "root", format!("{root}: {e}")))?;
        let dir = openat(
            libc::AT_FDCWD,
            &canonical,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| config_err(NAME, "root", format!("{root}: {e}")))?;
        Ok(FilePlugin {
            root: canonical,
            dir: Arc::new(dir),
            max_read_bytes: cfg_u64(
                NAME,
                config,
                "max_read_bytes",
                DEFAULT_MAX_READ_BYTES,
                1,
                1 << 30,
            )?,
            max_write_bytes: cfg_u64(NAME, config, "max_write_bytes", 1 << 20, 1, 1 << 30)?,
            max_list_entries: cfg_u64(NAME, config, "max_list_entries", 10_000, 1, 1 << 20)?,
            max_list_bytes: cfg_u64(
                NAME,
                config,
                "max_list_bytes",
                DEFAULT_MAX_READ_BYTES,
                1024,
                1 << 30,
            )?,
            max_walk_entries: cfg_u64(
                NAME,
                config,
                "max_walk_entries",
                DEFAULT_MAX_WALK_ENTRIES,
                1,
                100_000_000,
            )?,
            max_hash_bytes: cfg_u64(NAME, config, "max_hash_bytes", 1 << 30, 1, 1 << 50)?,
            max_file_bytes: cfg_u64(NAME, config, "max_file_bytes", 64 << 20, 1, 1 << 50)?,
            max_total_bytes: cfg_u64(NAME, config, "max_total_bytes", 1 << 30, 1, 1 << 60)?,
            usage: Arc::new(Mutex::new(Usage::default())),
        })
    }

    /// Checks `rel` is a plain relative path (no `..`, not absolute).
    fn plain<'p>(&self, field: &str, rel: &'p str) -> Result<&'p Path, PluginError> {
        let p = Path::new(rel);
        if rel.is_empty()
            || rel.contains('\0')
            || p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(super::util::invalid(
                NAME,
                field,
                format!(
                    "`{rel}` must be a plain relative path inside the root (no `..`, not absolute)"
                ),
            ));
        }
        Ok(p)
    }

    /// A lookup error as the task's error, naming the field.
    fn lookup_err(&self, field: &str, rel: &str, e: io::Error) -> PluginError {
        let message = match e.raw_os_error() {
            Some(libc::ELOOP) => format!(
                "`{rel}` is a symlink or goes through one; symlinks are not followed (one could lead outside the root)"
            ),
            Some(libc::EXDEV) => format!("`{rel}` leads outside the root"),
            Some(libc::ENOTDIR) => format!("`{rel}`: a component is not a folder"),
            _ => format!("`{rel}`: {e}"),
        };
        super::util::invalid(NAME, field, message)
    }

    /// `O_PATH` handle on `rel` itself (a symlink is not followed) and what it is.
    fn inspect(&self, field: &str, rel: &str) -> Result<(OwnedFd, Metadata), PluginError> {
        let p = self.plain(field, rel)?;
        let fd = open_beneath(self.dir.as_raw_fd(), p, libc::O_PATH, 0)
            .map_err(|e| self.lookup_err(field, rel, e))?;
        let m = stat(&fd).map_err(|e| failed(NAME, format!("`{rel}`: {e}")))?;
        Ok((fd, m))
    }

    /// A regular file to read: refused as anything else, before any I/O.
    fn regular(&self, field: &str, rel: &str) -> Result<(OwnedFd, Metadata), PluginError> {
        let (fd, m) = self.inspect(field, rel)?;
        let t = m.file_type();
        if t.is_symlink() {
            return Err(self.lookup_err(field, rel, io::Error::from_raw_os_error(libc::ELOOP)));
        }
        if !t.is_file() {
            return Err(super::util::invalid(
                NAME,
                field,
                format!("`{rel}` is not a regular file (it is a {})", kind(&m)),
            ));
        }
        Ok((fd, m))
    }

    /// The parent folder of `rel` (a handle) and its last component.
    fn parent(&self, field: &str, rel: &str) -> Result<(OwnedFd, PathBuf), PluginError> {
        let p = self.plain(field, rel)?;
        let name = p
            .components()
            .rfind(|c| matches!(c, Component::Normal(_)))
            .ok_or_else(|| {
                super::util::invalid(
                    NAME,
                    field,
                    format!("`{rel}` names no file (the root itself)"),
                )
            })?;
        let name = PathBuf::from(name.as_os_str());
        let parent = p.parent().unwrap_or(Path::new(""));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let fd = open_beneath(
            self.dir.as_raw_fd(),
            parent,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| self.lookup_err(field, rel, e))?;
        Ok((fd, name))
    }

    fn run(&self, input: &Input, stop: &Stop) -> Result<Value, PluginError> {
        let op = input.str("op")?;
        match op {
            "read" => self.read(input),
            "write" => self.write(input, stop),
            "list" => self.list(input, stop),
            "hash" => self.hash(input, stop),
            "move" => self.rename(input),
            "delete" => self.delete(input),
            other => Err(input.err(
                "op",
                format!("`{other}` is not one of read, write, list, hash, move, delete"),
            )),
        }
    }

    fn read(&self, input: &Input) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let encoding = input.opt_str("encoding")?.unwrap_or("utf8");
        if !matches!(encoding, "utf8" | "base64") {
            return Err(input.err("encoding", "expected `utf8` or `base64`"));
        }
        let (fd, meta) = self.regular("path", rel)?;
        if meta.len() > self.max_read_bytes {
            return Err(input.err(
                "path",
                format!(
                    "`{rel}` has {} bytes, more than max_read_bytes ({})",
                    meta.len(),
                    self.max_read_bytes
                ),
            ));
        }
        let f = reopen(self.dir.as_raw_fd(), Path::new(rel), &fd, libc::O_RDONLY)
            .map_err(|e| failed(NAME, format!("opening `{rel}`: {e}")))?;
        // Read at most limit+1 bytes: the file may grow after the stat.
        let mut buf = Vec::new();
        f.take(self.max_read_bytes + 1)
            .read_to_end(&mut buf)
            .map_err(|e| failed(NAME, format!("reading `{rel}`: {e}")))?;
        if buf.len() as u64 > self.max_read_bytes {
            return Err(input.err("path", format!("`{rel}` grew past max_read_bytes")));
        }
        let size = buf.len() as i64;
        let content = if encoding == "base64" {
            base64_encode(&buf)
        } else {
            String::from_utf8(buf).map_err(|_| {
                input.err(
                    "encoding",
                    format!("`{rel}` is not UTF-8 text; use encoding `base64`"),
                )
            })?
        };
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("size", Value::Int(size)),
            ("encoding", Value::Str(encoding.into())),
            ("content", Value::Str(content)),
        ]))
    }

    /// Bytes of regular files under the root: measured by a walk at most
    /// every USAGE_TTL, the plugin's own writes added in between.
    fn usage(&self, stop: &Stop) -> Result<u64, PluginError> {
        {
            let u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            if u.measured.is_some_and(|t| t.elapsed() < USAGE_TTL) {
                return Ok(u.bytes);
            }
            if let Some((t, e)) = &u.refused {
                if t.elapsed() < USAGE_TTL {
                    return Err(e.clone());
                }
            }
        }
        let total = match self.walk_total(stop) {
            Ok(t) => t,
            Err(PluginError::Cancelled(p)) => return Err(PluginError::Cancelled(p)),
            Err(e) => {
                let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
                u.refused = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        u.bytes = total;
        u.measured = Some(Instant::now());
        u.refused = None;
        Ok(total)
    }

    /// Bytes of the regular files under the root, by a depth-first walk
    /// (one open folder per level). Fails, rather than under-count, when
    /// the root holds more than `max_walk_entries` entries or a folder
    /// cannot be read: a total that misses files would let writes past
    /// `max_total_bytes`.
    fn walk_total(&self, stop: &Stop) -> Result<u64, PluginError> {
        use std::os::unix::ffi::OsStrExt;
        let max = self.max_walk_entries as usize;
        let refuse = |why: String| {
            failed(
                NAME,
                format!(
                    "max_total_bytes ({}) cannot be checked: {why}; writes that grow files are refused",
                    self.max_total_bytes
                ),
            )
        };
        let open_dir = |at: RawFd, name: &Path| {
            openat(
                at,
                name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                0,
            )
        };
        let root = open_dir(self.dir.as_raw_fd(), Path::new("."))
            .map_err(|e| refuse(format!("the root cannot be read: {e}")))?;
        let mut total = 0u64;
        let mut seen = 0usize;
        let too_many = || {
            format!(
                "the root holds more than {max} entries (max_walk_entries), the most the size walk counts"
            )
        };
        let (names, cut) = read_names(&root, stop, max)?;
        if cut {
            return Err(refuse(too_many()));
        }
        seen += names.len();
        let mut stack: Vec<(OwnedFd, std::vec::IntoIter<Vec<u8>>)> =
            vec![(root, names.into_iter())];
        while let Some((dir, names)) = stack.last_mut() {
            stop.check(NAME)?;
            let Some(n) = names.next() else {
                stack.pop();
                continue;
            };
            let name = Path::new(std::ffi::OsStr::from_bytes(&n));
            let at = dir.as_raw_fd();
            // Gone since it was listed: nothing to count.
            let fd = match openat(at, name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(refuse(format!("`{}`: {e}", name.display()))),
            };
            let m = stat(&fd).map_err(|e| refuse(format!("`{}`: {e}", name.display())))?;
            if m.file_type().is_file() {
                total = total.saturating_add(m.len());
            } else if m.file_type().is_dir() {
                let sub = match open_dir(at, name) {
                    Ok(d) => d,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => {
                        return Err(refuse(format!(
                            "folder `{}` cannot be read: {e}",
                            name.display()
                        )))
                    }
                };
                let (names, cut) = read_names(&sub, stop, max - seen)?;
                if cut {
                    return Err(refuse(too_many()));
                }
                seen += names.len();
                stack.push((sub, names.into_iter()));
            }
        }
        Ok(total)
    }

    fn grew(&self, delta: i64) {
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        u.bytes = u.bytes.saturating_add_signed(delta);
    }

    /// Refuses a write that would leave a file of `new_size` bytes (from `old_size`).
    fn check_sizes(
        &self,
        input: &Input,
        rel: &str,
        old_size: u64,
        new_size: u64,
        stop: &Stop,
    ) -> Result<(), PluginError> {
        if new_size > self.max_file_bytes {
            return Err(input.err(
                "content",
                format!(
                    "`{rel}` would have {new_size} bytes, more than max_file_bytes ({})",
                    self.max_file_bytes
                ),
            ));
        }
        if new_size > old_size {
            let used = self.usage(stop)?;
            let after = used + (new_size - old_size);
            if after > self.max_total_bytes {
                return Err(input.err(
                    "content",
                    format!(
                        "the root would hold {after} bytes, more than max_total_bytes ({}; {used} in use)",
                        self.max_total_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    fn write(&self, input: &Input, stop: &Stop) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let p = self.plain("path", rel)?;
        let bytes = match (input.get("content"), input.get("content_base64")) {
            (Some(Value::Str(s)), None) => s.clone().into_bytes(),
            (None, Some(Value::Str(s))) => {
                base64_decode(s).map_err(|m| input.err("content_base64", m))?
            }
            (Some(_), None) => return Err(input.err("content", "expected a string")),
            (None, Some(_)) => return Err(input.err("content_base64", "expected a string")),
            _ => {
                return Err(input.err(
                    "content",
                    "give exactly one of `content` (text) or `content_base64`",
                ))
            }
        };
        if bytes.len() as u64 > self.max_write_bytes {
            return Err(input.err(
                "content",
                format!(
                    "{} bytes, more than max_write_bytes ({})",
                    bytes.len(),
                    self.max_write_bytes
                ),
            ));
        }
        let append = input.opt_bool("append")?.unwrap_or(false);
        let len = bytes.len() as u64;
        let dir = self.dir.as_raw_fd();
        // Existing: checked, then reopened through its handle. Missing:
        // created with O_EXCL (which never opens what appeared meanwhile).
        let (mut f, old) = loop {
            match open_beneath(dir, p, libc::O_PATH, 0) {
                Ok(fd) => {
                    let m = stat(&fd).map_err(|e| failed(NAME, format!("`{rel}`: {e}")))?;
                    if m.file_type().is_symlink() {
                        return Err(self.lookup_err(
                            "path",
                            rel,
                            io::Error::from_raw_os_error(libc::ELOOP),
                        ));
                    }
                    if m.is_dir() {
                        return Err(input.err("path", format!("`{rel}` is a folder")));
                    }
                    if !m.file_type().is_file() {
                        return Err(input.err(
                            "path",
                            format!("`{rel}` is not a regular file (it is a {})", kind(&m)),
                        ));
                    }
                    let new_size = if append { m.len() + len } else { len };
                    self.check_sizes(input, rel, m.len(), new_size, stop)?;
                    let flags = libc::O_WRONLY | if append { libc::O_APPEND } else { 0 };
                    let f = reopen(dir, p, &fd, flags)
                        .map_err(|e| failed(NAME, format!("opening `{rel}`: {e}")))?;
                    if !append {
                        f.set_len(0)
                            .map_err(|e| failed(NAME, format!("truncating `{rel}`: {e}")))?;
                    }
                    break (f, m.len());
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    self.check_sizes(input, rel, 0, len, stop)?;
                    match open_beneath(
                        dir,
                        p,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NONBLOCK,
                        0o644,
                    ) {
                        Ok(fd) => break (File::from(fd), 0),
                        // Appeared since: look again.
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            return Err(input.err(
                                "path",
                                format!("the parent folder of `{rel}` does not exist"),
                            ))
                        }
                        Err(e) => return Err(self.lookup_err("path", rel, e)),
                    }
                }
                Err(e) => return Err(self.lookup_err("path", rel, e)),
            }
        };
        let res = f.write_all(&bytes);
        let new_size = f.metadata().map(|m| m.len()).unwrap_or(old);
        self.grew(new_size as i64 - old as i64);
        res.map_err(|e| failed(NAME, format!("writing `{rel}`: {e}")))?;
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("written", Value::Int(bytes.len() as i64)),
        ]))
    }

    fn list(&self, input: &Input, stop: &Stop) -> Result<Value, PluginError> {
        let rel = input.opt_str("path")?.unwrap_or(".");
        let p = self.plain("path", rel)?;
        let d = open_beneath(
            self.dir.as_raw_fd(),
            p,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
            0,
        )
        .map_err(|e| self.lookup_err("path", rel, e))?;
        let (names, mut truncated) = read_names(&d, stop, self.max_list_entries as usize)?;
        let mut entries = Vec::new();
        // Long names fill a result long before max_list_entries does.
        let mut bytes = 0u64;
        for n in names {
            stop.check(NAME)?;
            use std::os::unix::ffi::OsStrExt;
            let name = std::ffi::OsStr::from_bytes(&n);
            // As sent: invalid UTF-8 grows to U+FFFD (3 bytes a byte).
            let shown = name.to_string_lossy();
            let cost = LIST_ENTRY_BYTES + shown.len() as u64;
            if bytes + cost > self.max_list_bytes {
                truncated = true;
                break;
            }
            bytes += cost;
            let Ok(fd) = openat(
                d.as_raw_fd(),
                Path::new(name),
                libc::O_PATH | libc::O_NOFOLLOW,
                0,
            ) else {
                continue; // gone since
            };
            let meta = stat(&fd).map_err(|err| failed(NAME, format!("listing `{rel}`: {err}")))?;
            entries.push((shown.into_owned(), kind(&meta), meta.len()));
        }
        entries.sort();
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            (
                "entries",
                Value::List(
                    entries
                        .into_iter()
                        .map(|(name, kind, size)| {
                            map(vec![
                                ("name", Value::Str(name)),
                                ("type", Value::Str(kind.into())),
                                ("size", Value::Int(size as i64)),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("truncated", Value::Bool(truncated)),
        ]))
    }

    fn hash(&self, input: &Input, stop: &Stop) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let (fd, meta) = self.regular("path", rel)?;
        if meta.len() > self.max_hash_bytes {
            return Err(input.err(
                "path",
                format!(
                    "`{rel}` has {} bytes, more than max_hash_bytes ({})",
                    meta.len(),
                    self.max_hash_bytes
                ),
            ));
        }
        let mut f = reopen(self.dir.as_raw_fd(), Path::new(rel), &fd, libc::O_RDONLY)
            .map_err(|e| failed(NAME, format!("opening `{rel}`: {e}")))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut size: u64 = 0;
        loop {
            stop.check(NAME)?;
            let n = f
                .read(&mut buf)
                .map_err(|e| failed(NAME, format!("reading `{rel}`: {e}")))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > self.max_hash_bytes {
                return Err(input.err("path", format!("`{rel}` grew past max_hash_bytes")));
            }
            h.update(&buf[..n]);
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("size", Value::Int(size as i64)),
            ("sha256", Value::Str(hex)),
        ]))
    }

    fn rename(&self, input: &Input) -> Result<Value, PluginError> {
        let from_rel = input.str("from")?;
        let to_rel = input.str("to")?;
        let overwrite = input.opt_bool("overwrite")?.unwrap_or(false);
        let (_, m) = self.inspect("from", from_rel)?;
        if m.file_type().is_symlink() {
            return Err(input.err(
                "from",
                format!("`{from_rel}` is a symlink; symlinks are not followed or moved (one could lead outside the root), only deleted"),
            ));
        }
        let (from_dir, from_name) = self.parent("from", from_rel)?;
        let (to_dir, to_name) = self.parent("to", to_rel)?;
        let (a, b) = (
            cstr(&from_name).map_err(|e| input.err("from", e.to_string()))?,
            cstr(&to_name).map_err(|e| input.err("to", e.to_string()))?,
        );
        let flags: libc::c_uint = if overwrite { 0 } else { libc::RENAME_NOREPLACE };
        let (fd_from, fd_to) = (from_dir.as_raw_fd(), to_dir.as_raw_fd());
        // SAFETY: two directory handles we hold and NUL-terminated names.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                fd_from,
                a.as_ptr(),
                fd_to,
                b.as_ptr(),
                flags,
            )
        };
        let result = if r == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
                // No renameat2 (or no RENAME_NOREPLACE on this filesystem):
                // check, then rename.
                if !overwrite && openat(fd_to, &to_name, libc::O_PATH | libc::O_NOFOLLOW, 0).is_ok()
                {
                    Err(io::Error::from_raw_os_error(libc::EEXIST))
                } else if unsafe { libc::renameat(fd_from, a.as_ptr(), fd_to, b.as_ptr()) } == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            } else {
                Err(e)
            }
        };
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !overwrite => {
                return Err(input.err(
                    "to",
                    format!("`{to_rel}` exists; set `overwrite: true` to replace it"),
                ))
            }
            Err(e) => {
                return Err(failed(
                    NAME,
                    format!("moving `{from_rel}` to `{to_rel}`: {e}"),
                ))
            }
        }
        Ok(map(vec![
            ("from", Value::Str(from_rel.into())),
            ("to", Value::Str(to_rel.into())),
        ]))
    }

    fn delete(&self, input: &Input) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let (dir, name) = self.parent("path", rel)?;
        let (_, meta) = self.inspect("path", rel)?;
        let c = cstr(&name).map_err(|e| input.err("path", e.to_string()))?;
        // Folders only when empty: no recursive deletes from a task. A
        // symlink is removed itself (dangling or not), never its target.
        let flag = if meta.is_dir() { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a directory handle we hold and a NUL-terminated name.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flag) } != 0 {
            let e = io::Error::last_os_error();
            return Err(failed(NAME, format!("deleting `{rel}`: {e}")));
        }
        if meta.file_type().is_file() {
            self.grew(-(meta.len() as i64));
        }
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("deleted", Value::Bool(true)),
        ]))
    }
}

#[async_trait]
impl Plugin for FilePlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Reads, writes, lists, hashes, moves and deletes files inside the device's configured folder.".into()
    }

    fn effects(&self) -> super::Effects {
        // One table, which the server also holds catalogs to.
        crate::schema::builtin_effects("file").unwrap_or(super::Effects::Always)
    }

    fn input_schema(&self) -> Schema {
        let path = || Schema::string().len(1, 4096);
        Schema::object()
            .req(
                "op",
                Schema::enumeration(&["read", "write", "list", "hash", "move", "delete"]),
            )
            .field("path", path().desc("relative to the configured root"))
            .field("encoding", Schema::enumeration(&["utf8", "base64"]))
            .field("content", Schema::string().desc("text to write"))
            .field("content_base64", Schema::string().desc("bytes to write"))
            .field("append", Schema::boolean())
            .field("from", path())
            .field("to", path())
            .field("overwrite", Schema::boolean())
            .when("op", "read", &["path"])
            .when("op", "write", &["path"])
            .when("op", "hash", &["path"])
            .when("op", "delete", &["path"])
            .when("op", "move", &["from", "to"])
    }

    fn concurrency(&self) -> usize {
        4
    }

    fn validate(&self) -> Result<(), PluginError> {
        if !self.root.is_dir() {
            return Err(config_err(
                NAME,
                "root",
                format!("{} is not a folder", self.root.display()),
            ));
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        Input::new(NAME, &task.input)?;
        let me = self.clone();
        let value = task.input.clone();
        let stop = Stop::of(&task);
        blocking(NAME, &task, move || {
            let input = Input::new(NAME, &value)?;
            me.run(&input, &stop)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(root: &Path, extra: &str) -> FilePlugin {
        let t: toml::Table =
            toml::from_str(&format!("root = {:?}\n{extra}", root.display().to_string())).unwrap();
        FilePlugin::from_config(&t).unwrap()
    }

    fn run(p: &FilePlugin, v: serde_json::Value) -> Result<serde_json::Value, String> {
        let v = Value::from(v);
        let input = Input::new(NAME, &v).map_err(|e| e.to_string())?;
        p.run(&input, &Stop::never())
            .map(serde_json::Value::from)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn write_read_list_hash_move_delete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let p = plugin(dir.path(), "");
        run(
            &p,
            json!({"op": "write", "path": "sub/a.txt", "content": "hello"}),
        )
        .unwrap();
        run(
            &p,
            json!({"op": "write", "path": "sub/a.txt", "content": "!", "append": true}),
        )
        .unwrap();
        let r = run(&p, json!({"op": "read", "path": "sub/a.txt"})).unwrap();
        assert_eq!(r["content"], "hello!");
        assert_eq!(r["size"], 6);
        let r = run(
            &p,
            json!({"op": "read", "path": "sub/a.txt", "encoding": "base64"}),
        )
        .unwrap();
        assert_eq!(r["content"], base64_encode(b"hello!"));
        let r = run(&p, json!({"op": "hash", "path": "sub/a.txt"})).unwrap();
        assert_eq!(
            r["sha256"],
            "ce06092fb948d9ffac7d1a376e404b26b7575bcc11ee05a4615fef4fec3a308b"
        );
        let r = run(&p, json!({"op": "list", "path": "sub"})).unwrap();
        assert_eq!(r["entries"][0]["name"], "a.txt");
        assert_eq!(r["entries"][0]["type"], "file");
        run(
            &p,
            json!({"op": "move", "from": "sub/a.txt", "to": "b.txt"}),
        )
        .unwrap();
        assert!(dir.path().join("b.txt").exists());
        run(
            &p,
            json!({"op": "write", "path": "c.txt", "content_base64": "AAEC"}),
        )
        .unwrap();
        assert_eq!(std::fs::read(dir.path().join("c.txt")).unwrap(), [0, 1, 2]);
        let e = run(&p, json!({"op": "move", "from": "c.txt", "to": "b.txt"})).unwrap_err();
        assert!(e.contains("`to`") && e.contains("overwrite"), "{e}");
        run(&p, json!({"op": "delete", "path": "b.txt"})).unwrap();
        run(&p, json!({"op": "delete", "path": "sub"})).unwrap();
        assert!(!dir.path().join("sub").exists());
        let r = run(&p, json!({"op": "list"})).unwrap();
        assert_eq!(r["entries"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn walk_without_openat2_gives_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("sub"), dir.path().join("in")).unwrap();
        let root = openat(
            libc::AT_FDCWD,
            dir.path(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .unwrap();
        let r = root.as_raw_fd();
        for rel in ["sub/f", "sub", "."] {
            walk_beneath(r, Path::new(rel), libc::O_PATH | libc::O_NOFOLLOW, 0).unwrap();
        }
        for rel in ["out/x", "in/f", "out"] {
            let e = walk_beneath(
                r,
                Path::new(rel),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)),
                "{rel}: {e}"
            );
            let e = open_beneath(r, Path::new(rel), libc::O_RDONLY, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{rel}: {e}");
        }
    }

    #[test]
    fn list_is_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..100 {
            std::fs::write(dir.path().join(format!("{i:03}{}", "n".repeat(97))), "").unwrap();
        }
        let p = plugin(dir.path(), "max_list_bytes = 1500");
        let r = run(&p, json!({"op": "list"})).unwrap();
        assert_eq!(r["truncated"], true);
        // 148 bytes an entry: 10 fit in 1500.
        assert_eq!(r["entries"].as_array().unwrap().len(), 10);
        let p = plugin(dir.path(), "");
        let r = run(&p, json!({"op": "list"})).unwrap();
        assert_eq!(r["truncated"], false);
        assert_eq!(r["entries"].as_array().unwrap().len(), 100);
    }

    #[test]
    fn the_size_walk_fails_closed_past_its_entry_limit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        for i in 0..6 {
            std::fs::write(dir.path().join(format!("a/b/f{i}")), "xx").unwrap();
        }
        // 8 entries (a, b and six files): counted in full with 8.
        let p = plugin(
            dir.path(),
            "max_walk_entries = 8
max_total_bytes = 100",
        );
        assert_eq!(p.walk_total(&Stop::never()).unwrap(), 12);
        run(&p, json!({"op": "write", "path": "a/new", "content": "x"})).unwrap();
        let p = plugin(
            dir.path(),
            "max_walk_entries = 8
max_total_bytes = 100",
        );
        let e = run(&p, json!({"op": "write", "path": "a/more", "content": "x"})).unwrap_err();
        assert!(
            e.contains("max_total_bytes") && e.contains("more than 8 entries"),
            "{e}"
        );
        // A write that does not grow a file still runs.
        run(&p, json!({"op": "write", "path": "a/new", "content": "y"})).unwrap();
    }

    #[test]
    fn writes_are_capped_per_file_and_in_total() {
        let dir = tempfile::tempdir().unwrap();
        let p = plugin(dir.path(), "max_file_bytes = 10\nmax_total_bytes = 20");
        let w = |path: &str, n: usize, append: bool| json!({"op": "write", "path": path, "content": "x".repeat(n), "append": append});
        run(&p, w("a", 6, true)).unwrap();
        let e = run(&p, w("a", 6, true)).unwrap_err();
        assert!(e.contains("max_file_bytes"), "{e}");
        run(&p, w("b", 9, false)).unwrap();
        let e = run(&p, w("c", 9, false)).unwrap_err();
        assert!(e.contains("max_total_bytes"), "{e}");
        run(&p, json!({"op": "delete", "path": "b"})).unwrap();
        run(&p, w("c", 9, false)).unwrap();
    }

    #[test]
    fn hostile_paths_and_limits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("outdir")).unwrap();
        std::fs::write(dir.path().join("big"), vec![b'x'; 100]).unwrap();
        let p = plugin(dir.path(), "max_read_bytes = 10\nmax_write_bytes = 10");
        for (input, field) in [
            (json!({"op": "read", "path": "../x"}), "`path`"),
            (json!({"op": "read", "path": "/etc/passwd"}), "`path`"),
            (json!({"op": "read", "path": "link"}), "`path`"),
            (json!({"op": "hash", "path": "link"}), "`path`"),
            (json!({"op": "list", "path": "outdir"}), "`path`"),
            (
                json!({"op": "write", "path": "outdir/new", "content": "x"}),
                "`path`",
            ),
            (
                json!({"op": "write", "path": "link", "content": "x"}),
                "`path`",
            ),
            (
                json!({"op": "move", "from": "big", "to": "outdir/big"}),
                "`to`",
            ),
            (json!({"op": "move", "from": "link", "to": "l2"}), "`from`"),
            (json!({"op": "delete", "path": "."}), "`path`"),
            (json!({"op": "read", "path": "big"}), "max_read_bytes"),
            (
                json!({"op": "write", "path": "w", "content": "0123456789a"}),
                "max_write_bytes",
            ),
            (json!({"op": "read"}), "`path`"),
            (json!({"op": "frob", "path": "big"}), "`op`"),
            (json!({"path": "big"}), "`op`"),
            (json!({"op": "write", "path": "w"}), "`content`"),
            (json!({"op": "read", "path": "nope"}), "nope"),
        ] {
            let e = run(&p, input.clone()).unwrap_err();
            assert!(e.contains("`file`") && e.contains(field), "{input}: {e}");
        }
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"s");
        assert!(!outside.path().join("new").exists());
        // A symlink inside pointing inside is not followed either; any
        // symlink can be deleted, the link and not its target.
        std::os::unix::fs::symlink(dir.path().join("big"), dir.path().join("inner")).unwrap();
        let e = run(&p, json!({"op": "read", "path": "inner"})).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        run(&p, json!({"op": "delete", "path": "link"})).unwrap();
        run(&p, json!({"op": "delete", "path": "inner"})).unwrap();
        assert!(dir.path().join("big").exists() && outside.path().join("secret").exists());
        // Special files: refused before any I/O (a FIFO open would block).
        let fifo = CString::new(dir.path().join("fifo").display().to_string()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        for op in [
            json!({"op": "read", "path": "fifo"}),
            json!({"op": "write", "path": "fifo", "content": "x"}),
            json!({"op": "hash", "path": "fifo"}),
        ] {
            let e = run(&p, op.clone()).unwrap_err();
            assert!(
                e.contains("not a regular file") && e.contains("fifo"),
                "{op}: {e}"
            );
        }
        let r = run(&p, json!({"op": "list"})).unwrap();
        let kinds: Vec<(String, String)> = r["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().into(),
                    e["type"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert!(kinds.contains(&("fifo".into(), "fifo".into())), "{kinds:?}");
        assert!(
            kinds.contains(&("outdir".into(), "symlink".into())),
            "{kinds:?}"
        );
        let t: toml::Table = toml::from_str("root = \"/no/such/dir\"").unwrap();
        assert!(FilePlugin::from_config(&t)
            .unwrap_err()
            .to_string()
            .contains("root"));
    }
}
