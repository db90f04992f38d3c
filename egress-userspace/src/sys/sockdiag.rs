//! Which socket sent a packet: the kernel's sock_diag interface (`NETLINK_SOCK_DIAG`), asked for
//! one TCP or UDP socket by its addresses. The DNS proxy uses it to find the socket (cookie) a
//! query came from, and through `SOCK_OWNERS` the process and cgroup that asked.

use std::{io, net::SocketAddr};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE` of a socket made in it),
/// as the hooks' `bpf_get_netns_cookie` sees it.
pub fn netns_cookie() -> io::Result<u64> {
    getsockopt_u64(
        &std::net::UdpSocket::bind("127.0.0.1:0")?,
        libc::SO_NETNS_COOKIE,
    )
}

/// A u64 `SOL_SOCKET` option of a socket (`SO_COOKIE`, `SO_NETNS_COOKIE`).
fn getsockopt_u64(socket: &impl std::os::fd::AsRawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the size passed, on an open socket.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Transport of the socket looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// One netlink socket for lookups, in the network namespace it was opened in.
pub struct SockDiag {
    socket: Socket,
    buf: Vec<u8>,
}

impl SockDiag {
    pub fn open() -> io::Result<SockDiag> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        Ok(SockDiag {
            socket,
            buf: vec![0; 8192],
        })
    }

    /// Checks that the kernel can find sockets by address at all, with loopback sockets of
    /// this process (no traffic leaves it): without its UDP and TCP socket diagnostics
    /// (`inet_diag`, `udp_diag`, `tcp_diag`: modules on Debian's kernels, loaded on first use
    /// where modprobe works) every lookup answers "no such socket", and the DNS proxy could never
    /// tell which process asked. Skipped (Ok) when no loopback address can be bound here.
    pub fn self_check(&mut self) -> io::Result<()> {
        let unavailable = |what: &str| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the kernel cannot look up {what} sockets by address (sock_diag: the inet_diag, tcp_diag and udp_diag modules, CONFIG_INET_DIAG/CONFIG_INET_TCP_DIAG/CONFIG_INET_UDP_DIAG): the DNS proxy could not tell which process asked a name, so none would ever be granted; load them (`modprobe -a inet_diag tcp_diag udp_diag`)"
                ),
            )
        };
        let (Ok(server), Ok(client)) = (
            std::net::UdpSocket::bind("127.0.0.1:0"),
            std::net::UdpSocket::bind("127.0.0.1:0"),
        ) else {
            return Ok(());
        };
        let (local, remote) = (client.local_addr()?, server.local_addr()?);
        if self.cookie(Transport::Udp, local, remote)? != Some(so_cookie(&client)?) {
            return Err(unavailable("UDP"));
        }
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            return Ok(());
        };
        let stream = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (local, remote) = (stream.local_addr()?, stream.peer_addr()?);
        if self.cookie(Transport::Tcp, local, remote)? != Some(so_cookie(&stream)?) {
            return Err(unavailable("TCP"));
        }
        Ok(())
    }

    /// The cookie of the socket whose local address is `local` and whose peer (or, for an
    /// unconnected UDP socket, the address that sent to it) is `remote`; `None` when there is no
    /// such socket. For the proxy: `local` is the client's address as the proxy sees it, and
    /// `remote` the proxy's own address.
    pub fn cookie(
        &mut self,
        transport: Transport,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<Option<u64>> {
        let mut id = if local.is_ipv4() {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        // The kernel reads a UDP request's addresses the other way round ("src and dst are
        // swapped for historical reasons", udp_diag.c): source = who sends to the socket.
        let (src, dst) = match transport {
            Transport::Tcp => (local, remote),
            Transport::Udp => (remote, local),
        };
        id.source_address = src.ip();
        id.source_port = src.port();
        id.destination_address = dst.ip();
        id.destination_port = dst.port();
        // "No cookie": the kernel skips the cookie check.
        id.cookie = [0xff; 8];
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
                protocol: match transport {
                    Transport::Tcp => IPPROTO_TCP,
                    Transport::Udp => IPPROTO_UDP,
                },
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: id,
            })
            .into(),
        );
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
        let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match reply.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                Ok(Some(u64::from_ne_bytes(r.header.socket_id.cookie)))
            }
            NetlinkPayload::Error(e) => match e.code {
                Some(code) if -code.get() == libc::ENOENT => Ok(None),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

/// A socket's cookie (`SO_COOKIE`), the id sock_diag reports.
fn so_cookie(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    getsockopt_u64(socket, libc::SO_COOKIE)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream, UdpSocket};

    use super::*;

    #[test]
    fn the_kernel_finds_sockets_by_address_here() {
        SockDiag::open().unwrap().self_check().unwrap();
    }

    // Loopback sockets of this process only: no traffic leaves it.
    #[test]
    fn finds_udp_and_tcp_sockets_by_their_addresses() {
        let mut diag = SockDiag::open().unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"q", server.local_addr().unwrap()).unwrap();
        let (local, remote) = (client.local_addr().unwrap(), server.local_addr().unwrap());
        assert_eq!(
            diag.cookie(Transport::Udp, local, remote).unwrap(),
            Some(so_cookie(&client).unwrap())
        );
        let l = TcpListener::bind("[::1]:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(
            diag.cookie(
                Transport::Tcp,
                c.local_addr().unwrap(),
                c.peer_addr().unwrap()
            )
            .unwrap(),
            Some(so_cookie(&c).unwrap())
        );
        drop(c);
        // Gone: no such socket.
        let gone = "127.0.0.1:9".parse().unwrap();
        assert_eq!(diag.cookie(Transport::Tcp, gone, remote).unwrap(), None);
    }
}
