//! NBD paths (TCP, with an optional source address, or Unix sockets), over [`lunmpio_nbd::client`].

use std::sync::Arc;

use lunmpio_nbd::client::{Client, ClientError, ConnectOptions, Endpoint};
use lunmpio_nbd::{Reply, Request};

use super::{ConnectLimits, Failed, Geometry, PathError, PathErrorKind};

/// One NBD connection of a path. Clones share the connection.
#[derive(Clone)]
pub struct NbdConnection {
    client: Client,
    info: Arc<Geometry>,
}

impl NbdConnection {
    pub(super) async fn connect(
        endpoint: Endpoint,
        export: String,
        tls: Option<lunmpio_nbd::tls::ClientTls>,
        limits: ConnectLimits,
    ) -> Result<NbdConnection, PathError> {
        let mut options = ConnectOptions::new(endpoint, export);
        options.tls = tls;
        options.connect_timeout = limits.connect_timeout;
        options.max_in_flight = limits.in_flight_max;
        // The engine applies its own (adaptive) deadline per request; the client never times out
        // on its own, so a slow path is judged in one place.
        options.request_timeout = None;
        let client = Client::connect(options).await.map_err(path_error)?;
        let export = client.info();
        let info = Geometry {
            size_bytes: export.size,
            read_only: export
                .flags
                .contains(lunmpio_nbd::TransmissionFlags::READ_ONLY),
            flags: export.flags,
            block_size: export.block_size,
            base_allocation: export.base_allocation.is_some(),
            identity: None, // NBD carries no WWID; the LUN's identity comes from config or majority.
        };
        Ok(NbdConnection {
            client,
            info: Arc::new(info),
        })
    }

    pub fn info(&self) -> &Geometry {
        &self.info
    }

    pub async fn submit(
        &self,
        request: Request,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Reply, Failed> {
        self.client
            .submit_tracked(request, sent)
            .await
            .map_err(|e| Failed {
                request: e.request,
                error: path_error(e.error),
                sent: e.sent,
            })
    }

    /// Hands the request to the connection now if that needs no waiting (see
    /// [`Client::try_start`]); `Err` gives it back for [`NbdConnection::submit`].
    pub fn try_start(&self, request: Request) -> Result<NbdInFlight, Request> {
        self.client.try_start(request).map(NbdInFlight)
    }

    pub fn close(&self) {
        self.client.close();
    }

    pub fn is_open(&self) -> bool {
        self.client.is_open()
    }

    pub async fn closed(&self) {
        self.client.closed().await
    }
}

/// A request on an NBD connection, started without waiting: its reply, or the request back.
pub struct NbdInFlight(lunmpio_nbd::client::InFlight);

impl NbdInFlight {
    pub fn sent(&self) -> bool {
        self.0.sent()
    }
}

impl std::future::Future for NbdInFlight {
    type Output = Result<Reply, Failed>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| {
            r.map_err(|e| Failed {
                request: e.request,
                error: path_error(e.error),
                sent: e.sent,
            })
        })
    }
}

/// An NBD client error as the engine's path error. Whether it is a path fault is the nbd client's
/// call (`ClientError::is_path_fault`), not a second opinion here: a server answering `ESHUTDOWN` is
/// going away, so that path is failed and reconnected rather than probed like an EIO.
fn path_error(error: ClientError) -> PathError {
    let kind = match &error {
        ClientError::Server { .. } if error.is_path_fault() => PathErrorKind::Closed,
        ClientError::Server { errno, .. } => PathErrorKind::Reply(*errno),
        ClientError::Connection(_) => PathErrorKind::Broken,
        ClientError::Protocol(_) => PathErrorKind::Protocol,
        ClientError::Timeout => PathErrorKind::Timeout,
        ClientError::Closed => PathErrorKind::Closed,
        ClientError::Invalid(_) => PathErrorKind::Invalid,
        ClientError::Handshake(_) => PathErrorKind::Connect,
    };
    let mapped = PathError::new(kind, error.to_string());
    debug_assert_eq!(mapped.is_path_fault(), error.is_path_fault());
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;
    use lunmpio_nbd::NbdErrno;

    #[test]
    fn path_faults_are_classified_once_by_the_nbd_client() {
        let server = |errno| ClientError::Server {
            errno,
            message: None,
        };
        let all = [
            server(NbdErrno::Io),
            server(NbdErrno::Inval),
            server(NbdErrno::NoSpc),
            server(NbdErrno::Shutdown),
            ClientError::Connection("reset".into()),
            ClientError::Protocol("bad magic".into()),
            ClientError::Timeout,
            ClientError::Closed,
            ClientError::Invalid("too long".into()),
            ClientError::Handshake("refused".into()),
        ];
        for e in all {
            let mapped = path_error(e.clone());
            assert_eq!(
                mapped.is_path_fault(),
                e.is_path_fault(),
                "{e:?} -> {mapped:?}"
            );
        }
        let shutdown = path_error(server(NbdErrno::Shutdown));
        assert!(
            shutdown.is_path_fault() && !shutdown.belongs_to_request(),
            "a server going away fails its path: {shutdown:?}"
        );
    }
}
