//! NBD paths (TCP, with an optional source address, or Unix sockets), over [`lunmpio_nbd::client`].

use std::sync::Arc;

use lunmpio_nbd::client::{Client, ClientError, ConnectOptions, Endpoint, Reply, Request};

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
        limits: ConnectLimits,
    ) -> Result<NbdConnection, PathError> {
        let mut options = ConnectOptions::new(endpoint, export);
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

fn path_error(error: ClientError) -> PathError {
    let kind = match &error {
        ClientError::Server { errno, .. } => PathErrorKind::Reply(*errno),
        ClientError::Connection(_) => PathErrorKind::Broken,
        ClientError::Protocol(_) => PathErrorKind::Protocol,
        ClientError::Timeout => PathErrorKind::Timeout,
        ClientError::Closed => PathErrorKind::Closed,
        ClientError::Invalid(_) => PathErrorKind::Invalid,
        ClientError::Handshake(_) => PathErrorKind::Connect,
    };
    PathError::new(kind, error.to_string())
}
