//! Listening sockets handed over at start (systemd socket activation, `sd_listen_fds(3)`).
//!
//! Why: a listener that belongs to the daemon dies with it, and a client reconnecting after a crash
//! is refused until the restarted daemon binds again. A listener that belongs to systemd (a
//! `.socket` unit) outlives the process: connections made while the daemon is down wait in its
//! backlog and are served as soon as it is back (packaging/lunmpio-nbd.socket,
//! lunmpio-control.socket).
//!
//! The protocol: `LISTEN_PID` is our PID, `LISTEN_FDS` counts descriptors from 3 on, and
//! `LISTEN_FDNAMES` (optional) names them, separated by ':'. Each descriptor is matched to one of the
//! daemon's listeners by its name (`nbd`, `control`, `metrics`), or else by the address it is bound
//! to (the config's `nbd_listen`, `control_socket`, `metrics_listen`). A descriptor that is not a
//! listening stream socket, or that matches no listener, stops the start with a message naming it:
//! config and socket units that disagree are an operator's error to fix, not to guess around.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt};

use crate::config::{Config, ListenAddr};

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;
/// More descriptors than the daemon has listeners is a broken unit; a bound keeps the loop honest.
const FDS_MAX: i32 = 16;

/// Descriptors inherited at start, not yet matched to listeners.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: Vec<(OwnedFd, Option<String>)>,
}

impl Inherited {
    /// None: the daemon binds every listener itself.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Takes the descriptors systemd passed to this process and removes `LISTEN_*` from the
    /// environment (so nothing we start inherits them). Call before any other thread exists.
    ///
    /// Nothing passed (no `LISTEN_PID`, or another process's) is not an error: [`Inherited::none`].
    pub fn take_from_env() -> anyhow::Result<Inherited> {
        let pid = std::env::var("LISTEN_PID").ok();
        let count = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: called from `main` before the runtime starts, while this is the only thread.
            unsafe { std::env::remove_var(key) };
        }
        Inherited::from_values(
            pid.as_deref(),
            count.as_deref(),
            names.as_deref(),
            std::process::id(),
        )
    }

    fn from_values(
        pid: Option<&str>,
        count: Option<&str>,
        names: Option<&str>,
        our_pid: u32,
    ) -> anyhow::Result<Inherited> {
        let Some(pid) = pid else {
            return Ok(Inherited::none());
        };
        if pid.trim().parse::<u32>().ok() != Some(our_pid) {
            return Ok(Inherited::none()); // meant for another process (e.g. a parent shell)
        }
        let count = count.unwrap_or("0");
        let count: i32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| (0..=FDS_MAX).contains(n))
            .ok_or_else(|| {
                anyhow::anyhow!("LISTEN_FDS={count:?}: expected a count from 0 to {FDS_MAX}")
            })?;
        let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
        let mut fds = Vec::with_capacity(count as usize);
        for i in 0..count {
            let fd = FIRST_FD + i;
            // SAFETY: descriptors 3.. are ours by the protocol; fcntl fails cleanly on a closed one.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                anyhow::bail!(
                    "LISTEN_FDS={count} but descriptor {fd} is not open: {}",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: open (checked above) and handed to us; owned from here on.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = names.get(i as usize).map(|s| s.to_string());
            fds.push((owned, name));
        }
        Ok(Inherited { fds })
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Inherits these descriptors (tests and the in-process API pass sockets this way).
    pub fn from_fds(fds: Vec<(OwnedFd, Option<String>)>) -> Inherited {
        Inherited { fds }
    }
}

/// A listener that came from systemd, by role.
#[derive(Debug, Default)]
pub struct ActivatedListeners {
    pub nbd: Option<NbdListener>,
    pub control: Option<std::os::unix::net::UnixListener>,
    pub metrics: Option<std::net::TcpListener>,
}

#[derive(Debug)]
pub enum NbdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// What a descriptor is bound to.
#[derive(Debug, PartialEq)]
enum Bound {
    Tcp(std::net::SocketAddr),
    Unix(Option<PathBuf>),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Tcp(a) => write!(f, "{a}"),
            Bound::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            Bound::Unix(None) => write!(f, "an unnamed unix socket"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Nbd,
    Control,
    Metrics,
}

/// Matches every inherited descriptor to a listener of `config`. Errors name the descriptor.
pub fn assign(inherited: Inherited, config: &Config) -> anyhow::Result<ActivatedListeners> {
    let mut out = ActivatedListeners::default();
    for (fd, name) in inherited.fds {
        let raw = fd.as_raw_fd();
        let bound = listening_address(&fd)
            .map_err(|why| anyhow::anyhow!("inherited descriptor {raw}: {why}"))?;
        let role = role_of(name.as_deref(), &bound, config).ok_or_else(|| {
            anyhow::anyhow!(
                "inherited descriptor {raw} ({bound}{}) matches none of the config's listeners \
                 (nbd_listen, control_socket, metrics_listen): name it nbd, control or metrics \
                 (FileDescriptorName=) or bind it to the configured address",
                name.as_deref()
                    .map(|n| format!(", named {n:?}"))
                    .unwrap_or_default()
            )
        })?;
        place(&mut out, role, fd, &bound)
            .map_err(|why| anyhow::anyhow!("inherited descriptor {raw} ({bound}): {why}"))?;
        tracing::info!(fd = raw, address = %bound, role = ?role, "listener from systemd");
    }
    Ok(out)
}

fn role_of(name: Option<&str>, bound: &Bound, config: &Config) -> Option<Role> {
    match name {
        Some("nbd") => return Some(Role::Nbd),
        Some("control") => return Some(Role::Control),
        Some("metrics") => return Some(Role::Metrics),
        _ => {}
    }
    let same_path = |a: &Option<PathBuf>, b: &Path| a.as_deref() == Some(b);
    match (bound, &config.daemon.nbd_listen) {
        (Bound::Tcp(a), ListenAddr::Tcp(b)) if a == b => return Some(Role::Nbd),
        (Bound::Unix(a), ListenAddr::Unix(b)) if same_path(a, b) => return Some(Role::Nbd),
        _ => {}
    }
    match bound {
        Bound::Unix(a) if same_path(a, &config.daemon.control_socket) => Some(Role::Control),
        Bound::Tcp(a) if config.daemon.metrics_listen == Some(*a) => Some(Role::Metrics),
        _ => None,
    }
}

fn place(
    out: &mut ActivatedListeners,
    role: Role,
    fd: OwnedFd,
    bound: &Bound,
) -> Result<(), String> {
    let taken = match role {
        Role::Nbd => out.nbd.is_some(),
        Role::Control => out.control.is_some(),
        Role::Metrics => out.metrics.is_some(),
    };
    if taken {
        return Err(format!(
            "a second {role:?} listener (one socket per listener)"
        ));
    }
    match (role, bound) {
        (Role::Nbd, Bound::Tcp(_)) => out.nbd = Some(NbdListener::Tcp(fd.into())),
        (Role::Nbd, Bound::Unix(_)) => out.nbd = Some(NbdListener::Unix(fd.into())),
        (Role::Control, Bound::Unix(_)) => out.control = Some(fd.into()),
        (Role::Metrics, Bound::Tcp(_)) => out.metrics = Some(fd.into()),
        (Role::Control, Bound::Tcp(_)) => {
            return Err("the control socket must be a unix socket".into());
        }
        (Role::Metrics, Bound::Unix(_)) => return Err("metrics must listen on TCP".into()),
    }
    Ok(())
}

/// The address of a listening stream socket; an error for anything else.
fn listening_address(fd: &OwnedFd) -> Result<Bound, String> {
    let kind = nix::sys::socket::getsockopt(&fd.as_fd(), sockopt::SockType)
        .map_err(|e| format!("not a socket ({e})"))?;
    if kind != SockType::Stream {
        return Err(format!("a {kind:?} socket, not a stream socket"));
    }
    let listening = nix::sys::socket::getsockopt(&fd.as_fd(), sockopt::AcceptConn)
        .map_err(|e| format!("cannot tell whether it listens ({e})"))?;
    if !listening {
        return Err("a socket that does not listen (ListenStream= expected)".into());
    }
    let addr: SockaddrStorage =
        nix::sys::socket::getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
    // The address itself is read through std (a duplicate descriptor, closed right after).
    let copy = fd.try_clone().map_err(|e| format!("dup: {e}"))?;
    match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            let listener = std::net::TcpListener::from(copy);
            let a = listener
                .local_addr()
                .map_err(|e| format!("local address: {e}"))?;
            Ok(Bound::Tcp(a))
        }
        Some(AddressFamily::Unix) => {
            let listener = std::os::unix::net::UnixListener::from(copy);
            let a = listener
                .local_addr()
                .map_err(|e| format!("local address: {e}"))?;
            Ok(Bound::Unix(a.as_pathname().map(Path::to_path_buf)))
        }
        other => Err(format!("an unsupported address family {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "test.toml").expect("config")
    }

    const LUN: &str = "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"file:///dev/null\"\n";

    fn listener_fd() -> (OwnedFd, std::net::SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l.into(), a)
    }

    #[test]
    fn another_process_s_descriptors_are_not_taken() {
        let none = Inherited::from_values(Some("1"), Some("2"), None, 4242).unwrap();
        assert!(none.is_empty());
        assert!(
            Inherited::from_values(None, Some("2"), None, 4242)
                .unwrap()
                .is_empty()
        );
        let err = Inherited::from_values(Some("4242"), Some("lots"), None, 4242).unwrap_err();
        assert!(err.to_string().contains("LISTEN_FDS=\"lots\""), "{err}");
    }

    #[test]
    fn descriptors_match_by_name_or_by_address() {
        let (fd, addr) = listener_fd();
        let c = config(&format!(
            "[daemon]\nnbd_listen = \"{addr}\"\ncontrol_socket = \"/nonexistent/c.sock\"\n{LUN}"
        ));
        let got = assign(Inherited::from_fds(vec![(fd, None)]), &c).unwrap();
        assert!(matches!(got.nbd, Some(NbdListener::Tcp(_))));
        let (fd, _) = listener_fd();
        let got = assign(Inherited::from_fds(vec![(fd, Some("metrics".into()))]), &c).unwrap();
        assert!(got.metrics.is_some() && got.nbd.is_none());
    }

    #[test]
    fn a_descriptor_that_matches_nothing_or_does_not_listen_is_refused() {
        let c = config(&format!(
            "[daemon]\nnbd_listen = \"127.0.0.1:1\"\ncontrol_socket = \"/nonexistent/c.sock\"\n{LUN}"
        ));
        let (fd, _) = listener_fd();
        let err = assign(Inherited::from_fds(vec![(fd, Some("x".into()))]), &c).unwrap_err();
        assert!(err.to_string().contains("matches none"), "{err}");
        let (fd, _) = listener_fd();
        let err = assign(Inherited::from_fds(vec![(fd, Some("control".into()))]), &c).unwrap_err();
        assert!(err.to_string().contains("must be a unix socket"), "{err}");
        let bound_only = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = assign(Inherited::from_fds(vec![(bound_only.into(), None)]), &c).unwrap_err();
        assert!(err.to_string().contains("not a stream socket"), "{err}");
        let (a, _) = listener_fd();
        let (b, _) = listener_fd();
        let two = vec![(a, Some("nbd".into())), (b, Some("nbd".into()))];
        let err = assign(Inherited::from_fds(two), &c).unwrap_err();
        assert!(err.to_string().contains("second Nbd"), "{err}");
    }
}
