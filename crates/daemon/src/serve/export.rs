//! The NBD export of a LUN: an `nbd::server::Backend` over an engine [`Lun`]. Every request the
//! client sends becomes one engine request; engine errors become NBD errnos.

use bytes::Bytes;
use lunmpio_engine::Lun;
use lunmpio_engine::transport::{Reply, Request};
use lunmpio_nbd::server::{Backend, ExportConfig};
use lunmpio_nbd::{CommandFlags, Extent, NbdErrno};

pub struct LunBackend {
    lun: Lun,
}

impl LunBackend {
    pub fn new(lun: Lun) -> Self {
        LunBackend { lun }
    }

    /// What the export advertises: the LUN's settled geometry under the LUN's name.
    pub fn export_config(&self) -> ExportConfig {
        let g = self.lun.geometry();
        let paths = self.lun.get_path_info().len();
        let mut config = ExportConfig::new(self.lun.name(), g.size_bytes);
        config.description = Some(format!("lunmpio multipath LUN over {paths} paths"));
        config.flags = g.flags;
        config.block_size = g.block_size;
        config
    }

    async fn run(&self, request: Request) -> Result<Reply, NbdErrno> {
        self.lun.submit(request).await.map_err(|e| {
            tracing::debug!(lun = %self.lun.name(), errno = e.errno.name(), error = %e, "request failed");
            e.errno
        })
    }

    async fn done(&self, request: Request) -> Result<(), NbdErrno> {
        match self.run(request).await? {
            Reply::Done => Ok(()),
            _ => Err(NbdErrno::Io),
        }
    }
}

impl Backend for LunBackend {
    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, NbdErrno> {
        match self.run(Request::Read { offset, length }).await? {
            Reply::Read(data) if data.len() == length as usize => Ok(data),
            _ => Err(NbdErrno::Io),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, flags: CommandFlags) -> Result<(), NbdErrno> {
        self.done(Request::Write {
            offset,
            data,
            flags: flags & CommandFlags::FUA,
        })
        .await
    }

    async fn flush(&self) -> Result<(), NbdErrno> {
        self.done(Request::Flush {
            flags: CommandFlags::empty(),
        })
        .await
    }

    async fn trim(&self, offset: u64, length: u32, flags: CommandFlags) -> Result<(), NbdErrno> {
        self.done(Request::Trim {
            offset,
            length,
            flags: flags & CommandFlags::FUA,
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: CommandFlags,
    ) -> Result<(), NbdErrno> {
        let passed = CommandFlags::FUA | CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO;
        self.done(Request::WriteZeroes {
            offset,
            length,
            flags: flags & passed,
        })
        .await
    }

    async fn block_status(
        &self,
        offset: u64,
        length: u32,
        flags: CommandFlags,
    ) -> Result<Vec<Extent>, NbdErrno> {
        match self
            .run(Request::BlockStatus {
                offset,
                length,
                flags: flags & CommandFlags::REQ_ONE,
            })
            .await?
        {
            Reply::BlockStatus(extents) if !extents.is_empty() => Ok(extents),
            _ => Ok(vec![Extent { length, flags: 0 }]),
        }
    }

    async fn cache(&self, offset: u64, length: u32) -> Result<(), NbdErrno> {
        // A hint: a path that cannot prefetch is no reason to fail the client.
        let _ = self.run(Request::Cache { offset, length }).await;
        Ok(())
    }
}
