//! A serial port for tokio without `tokio-serial` (which pulls in libudev):
//! the tty is opened non-blocking with libc, set up with termios (baud,
//! parity, data and stop bits, raw mode, no flow control) and wrapped in
//! tokio's `AsyncFd` as `AsyncRead + AsyncWrite`, which is all
//! tokio-modbus's RTU client needs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Parity bit of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// How a serial line is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud: u32,
    pub parity: Parity,
    /// 7 or 8.
    pub data_bits: u8,
    /// 1 or 2.
    pub stop_bits: u8,
}

/// Baud rates termios names (`Bnnn` constants).
pub const BAUDS: &[u32] = &[
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600,
];

fn speed(baud: u32) -> Option<libc::speed_t> {
    Some(match baud {
        1200 => libc::B1200,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        921600 => libc::B921600,
        _ => return None,
    })
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// An open serial port in raw mode.
pub struct SerialPort {
    fd: AsyncFd<OwnedFd>,
}

impl SerialPort {
    /// Opens and sets up `path`; must be called inside a tokio runtime.
    pub fn open(path: &Path, s: &LineSettings) -> io::Result<SerialPort> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: a valid C string; the fd returned is owned below.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        check(raw, "open")?;
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let baud = speed(s.baud).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported baud rate {}", s.baud),
            )
        })?;
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        check(
            unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) },
            "not a serial port (tcgetattr)",
        )?;
        // SAFETY: `t` came from tcgetattr.
        unsafe { libc::cfmakeraw(&mut t) };
        t.c_cflag &= !(libc::CSIZE | libc::PARENB | libc::PARODD | libc::CSTOPB | libc::CRTSCTS);
        t.c_cflag |= libc::CLOCAL | libc::CREAD;
        t.c_cflag |= if s.data_bits == 7 {
            libc::CS7
        } else {
            libc::CS8
        };
        t.c_iflag &= !(libc::IXON | libc::IXOFF | libc::IXANY | libc::INPCK);
        match s.parity {
            Parity::None => {}
            Parity::Even => {
                t.c_cflag |= libc::PARENB;
                t.c_iflag |= libc::INPCK;
            }
            Parity::Odd => {
                t.c_cflag |= libc::PARENB | libc::PARODD;
                t.c_iflag |= libc::INPCK;
            }
        }
        if s.stop_bits == 2 {
            t.c_cflag |= libc::CSTOPB;
        }
        // Non-blocking reads return what is there; tokio does the waiting.
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 0;
        // What cfsetispeed/cfsetospeed do on Linux, by hand: the static
        // aarch64 glibc has no `cfsetispeed@GLIBC_2.17` for the libc crate
        // to link against.
        t.c_cflag = (t.c_cflag & !libc::CBAUD) | baud;
        t.c_ispeed = baud;
        t.c_ospeed = baud;
        // SAFETY: valid termios and fd.
        unsafe {
            check(
                libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t),
                "tcsetattr",
            )?;
            // Bytes left over from an earlier exchange would corrupt a frame.
            libc::tcflush(fd.as_raw_fd(), libc::TCIOFLUSH);
        }
        // SAFETY: the fd is owned by the `OwnedFd` handed over, which
        // `AsyncFd` keeps open until it deregisters it.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(SerialPort { fd })
    }
}

impl AsyncRead for SerialPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                // SAFETY: writes at most `unfilled.len()` bytes into it.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| {
                // SAFETY: reads at most `data.len()` bytes from it.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the driver's queue; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Odd, not even: this machine's kernel (6.18) refuses even parity on a
    // pty with EINVAL (odd works on a plain openpty pair); a UART takes both.
    const LINE: LineSettings = LineSettings {
        baud: 9600,
        parity: Parity::Odd,
        data_bits: 8,
        stop_bits: 1,
    };

    #[tokio::test]
    async fn bytes_cross_a_pty_pair() {
        // A pty pair from the kernel: the master end stands in for the peer.
        let mut master = 0;
        let mut slave = 0;
        // SAFETY: out-params for two fds.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: fresh fds we own.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd())).unwrap();
        let mut port = SerialPort::open(&path, &LINE).unwrap();
        drop(slave);
        let mut peer = tokio::fs::File::from_std(std::fs::File::from(master));
        port.write_all(b"\x01\x03\x00\x00").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x01\x03\x00\x00");
        peer.write_all(b"\xff\x00\x11").await.unwrap();
        let mut back = [0u8; 3];
        port.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"\xff\x00\x11");
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_tty_or_missing() {
        let e = SerialPort::open(Path::new("/dev/null"), &LINE)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a serial port"), "{e}");
        let e = SerialPort::open(Path::new("/dev/ttyNOPE"), &LINE)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
