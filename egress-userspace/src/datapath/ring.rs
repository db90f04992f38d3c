//! The `EVENTS` ring buffer, decoded into `Event` records. The JSON side (`crate::events`) reads
//! records from here and never sees aya.

use aya::maps::{MapData, RingBuf};
use egress_common::Event;
use tokio::io::unix::AsyncFd;

/// The ring buffer, read synchronously (tests, benchmarks).
pub struct EventRing(RingBuf<MapData>);

impl EventRing {
    pub(super) fn new(ring: RingBuf<MapData>) -> EventRing {
        EventRing(ring)
    }

    /// The next record, if one is waiting (records too short to be an `Event` are skipped).
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            let item = self.0.next()?;
            if let Some(ev) = Event::from_bytes(&item) {
                return Some(ev);
            }
        }
    }

    /// Registers the ring with the tokio reactor (needs a runtime).
    pub fn watch(self) -> std::io::Result<AsyncEventRing> {
        // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register(self) }.map_err(std::io::Error::from)?;
        Ok(AsyncEventRing(fd))
    }
}

impl std::os::fd::AsRawFd for EventRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// The ring buffer, with a readiness future for the controller's event loop.
pub struct AsyncEventRing(AsyncFd<EventRing>);

impl AsyncEventRing {
    /// Waits until records may be waiting (cancel-safe: it consumes nothing).
    pub async fn readable(&mut self) -> std::io::Result<()> {
        let mut guard = self.0.readable_mut().await?;
        guard.clear_ready();
        Ok(())
    }

    /// The next record, if one is waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.0.get_mut().try_next()
    }
}
