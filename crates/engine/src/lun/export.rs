//! The LUN as an NBD export: the engine is the export's `Backend`, so a request the NBD server reads
//! goes straight to [`Lun::submit`] (no adapter between the protocol and the multipath layer).

use lunmpio_nbd::server::{Backend, ExportConfig};
use lunmpio_nbd::{CommandFlags, NbdErrno, Reply, Request};

use super::Lun;

impl Lun {
    /// What the export advertises: the LUN's settled geometry under the LUN's name.
    pub fn export_config(&self) -> ExportConfig {
        let g = self.geometry();
        let paths = self.get_path_info().len();
        let mut config = ExportConfig::new(self.name(), g.size_bytes);
        config.description = Some(format!("lunmpio multipath LUN over {paths} paths"));
        config.flags = g.flags;
        config.block_size = g.block_size;
        config
    }
}

/// Keeps the flags a path may act on and drops the rest (DF, and flags a command does not take,
/// are the export's business, not the path's).
fn path_request(request: Request) -> Request {
    let keep = match &request {
        Request::Write { .. } | Request::Trim { .. } => CommandFlags::FUA,
        Request::WriteZeroes { .. } => {
            CommandFlags::FUA | CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO
        }
        Request::BlockStatus { .. } => CommandFlags::REQ_ONE,
        Request::Read { .. } | Request::Flush { .. } | Request::Cache { .. } => {
            CommandFlags::empty()
        }
    };
    request.with_flags_within(keep)
}

impl Backend for Lun {
    /// An empty allocation map needs no care here: the server answers it as one allocated extent.
    async fn handle(&self, request: Request) -> Result<Reply, NbdErrno> {
        let request = path_request(request);
        let hint = matches!(request, Request::Cache { .. });
        match self.submit(request).await {
            Ok(reply) => Ok(reply),
            // A prefetch hint: a path that cannot prefetch is no reason to fail the client.
            Err(_) if hint => Ok(Reply::Done),
            Err(e) => {
                tracing::debug!(lun = %self.name(), errno = e.errno.name(), error = %e, "request failed");
                Err(e.errno)
            }
        }
    }
}
