//! systemd's notify protocol (`sd_notify(3)`), without libsystemd: one
//! datagram per message to the socket named by `$NOTIFY_SOCKET`.
//!
//! The agent says `READY=1` once its journal is open and its plugins are
//! built (not when the broker answers: running offline is normal), and
//! `WATCHDOG=1` from its main loop at half the unit's `WatchdogSec`, so
//! systemd restarts an agent whose loop is wedged, not only one that died.
//! Outside systemd (`$NOTIFY_SOCKET` unset) every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A handle on the service manager's notify socket, if there is one.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets for a `Type=notify` unit:
    /// `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket) and
    /// `WATCHDOG_USEC` (with `WATCHDOG_PID`, when set, naming this process).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").map(|s| s.to_string_lossy().into_owned());
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        Notifier::new(socket.as_deref(), usec.filter(|_| for_us))
    }

    /// `socket` as in `NOTIFY_SOCKET`; `watchdog_usec` as in `WATCHDOG_USEC`.
    pub fn new(socket: Option<&str>, watchdog_usec: Option<u64>) -> Notifier {
        let target = socket.and_then(|s| match open(s) {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={s}: {e}; not talking to systemd");
                None
            }
        });
        let watchdog = match (&target, watchdog_usec) {
            (Some(_), Some(us)) if us > 0 => Some(Duration::from_micros(us / 2)),
            _ => None,
        };
        Notifier { target, watchdog }
    }

    /// How often to call [`Notifier::watchdog`]: half the unit's
    /// `WatchdogSec`, or `None` when no watchdog is armed.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    /// `WATCHDOG=1`: the main loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1\n");
    }

    /// `STOPPING=1` at a requested shutdown.
    pub fn stopping(&self) {
        self.send("STOPPING=1\n");
    }

    fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target {
            // A datagram to a local socket does not block for long; a failure
            // only means systemd will not hear it, which its own timeouts handle.
            if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
                log::warn!("sd_notify: {e}");
            }
        }
    }
}

fn open(socket: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        SocketAddr::from_pathname(socket)?
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    Ok((sock, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_watchdog_and_stopping_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(Some(path.to_str().unwrap()), Some(2_000_000));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(1)));
        n.ready("serving");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=serving\n");
        n.watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");
        n.stopping();
        assert_eq!(recv(&sock), "STOPPING=1\n");
    }

    #[test]
    fn abstract_socket_names_work() {
        let name = format!("openclaw-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Notifier::new(Some(&format!("@{name}")), None).ready("x");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=x\n");
    }

    #[test]
    fn without_systemd_nothing_happens() {
        let n = Notifier::new(None, Some(1_000_000));
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x");
        n.watchdog();
        // A socket that does not exist is logged, not fatal.
        let n = Notifier::new(Some("/nonexistent/dir/notify"), Some(1_000_000));
        n.watchdog();
    }
}
