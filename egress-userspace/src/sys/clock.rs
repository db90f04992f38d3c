//! CLOCK_BOOTTIME, the datapath's clock (`bpf_ktime_get_boot_ns`): event timestamps and
//! byte-budget expiries are in it. The one place that reads it and converts it to wall time.
//!
//! The offset between the two clocks is never cached: a controller started at boot (before NTP
//! synchronised the wall clock, which systemd's ordering allows) would otherwise stamp every
//! later deny event with the wrong time while its alerts, stamped with the current time, were
//! right. Each conversion reads both clocks together ([`Pair::now`]) and converts with
//! [`Pair::wall_of`], a pure function the tests drive with clocks of their own.

use std::time::{Duration, SystemTime};

use rustix::time::{ClockId, clock_gettime};

/// CLOCK_BOOTTIME now, in nanoseconds.
pub fn boot_ns() -> u64 {
    let ts = clock_gettime(ClockId::Boottime);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One reading of both clocks, taken together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    /// CLOCK_BOOTTIME, nanoseconds.
    pub boot: u64,
    /// CLOCK_REALTIME at the same instant.
    pub wall: SystemTime,
}

impl Pair {
    /// Both clocks now. The wall clock is read between two readings of the boot clock and paired
    /// with their midpoint, so the pair is off by at most half the time between them (a few
    /// hundred nanoseconds unless the thread was preempted in between).
    pub fn now() -> Pair {
        let before = boot_ns();
        let wall = SystemTime::now();
        let after = boot_ns();
        Pair {
            boot: before + (after.saturating_sub(before)) / 2,
            wall,
        }
    }

    /// The wall-clock time of the CLOCK_BOOTTIME instant `boot`, by the offset of this pair.
    pub fn wall_of(&self, boot: u64) -> SystemTime {
        if boot <= self.boot {
            self.wall - Duration::from_nanos(self.boot - boot)
        } else {
            self.wall + Duration::from_nanos(boot - self.boot)
        }
    }
}

/// The wall-clock time of a CLOCK_BOOTTIME instant, by the clocks' offset now (taken anew at each
/// call: a wall clock stepped by NTP after the start does not skew later events).
pub fn wall_of(boot: u64) -> SystemTime {
    Pair::now().wall_of(boot)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn boot_time_converts_to_now() {
        let wall = wall_of(boot_ns());
        let skew = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(skew < Duration::from_secs(1), "{skew:?}");
    }

    #[test]
    fn instants_before_and_after_the_reading_convert_by_its_offset() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let pair = Pair {
            boot: 100 * SEC,
            wall,
        };
        assert_eq!(pair.wall_of(100 * SEC), wall);
        assert_eq!(pair.wall_of(40 * SEC), wall - Duration::from_secs(60));
        assert_eq!(
            pair.wall_of(100 * SEC + 5),
            wall + Duration::from_nanos(5),
            "an event stamped after the reading (drained late) is not clamped"
        );
    }

    /// The skew this module exists to prevent: the controller starts at boot with the wall clock
    /// an hour behind, then NTP steps it. An event decided after the step is stamped with the
    /// corrected time (as the alerts, which read the wall clock, are), because the conversion
    /// uses a reading taken after the step, never the offset of the start.
    #[test]
    fn a_wall_clock_stepped_after_the_start_does_not_skew_later_events() {
        let true_epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = Duration::from_secs(3600);
        // Boot time 10 s: the wall clock says an hour too early.
        let at_start = Pair {
            boot: 10 * SEC,
            wall: true_epoch - hour,
        };
        // Boot time 20 s: NTP has stepped the clock; 10 s have really passed.
        let after_step = Pair {
            boot: 20 * SEC,
            wall: true_epoch + Duration::from_secs(10),
        };
        let event = 19 * SEC;
        let truth = true_epoch + Duration::from_secs(9);
        assert_eq!(after_step.wall_of(event), truth);
        assert_eq!(
            at_start.wall_of(event),
            truth - hour,
            "the offset taken at the start is an hour off: why it is never cached"
        );
    }

    #[test]
    fn a_fresh_pair_agrees_with_the_clocks_read_around_it() {
        let b0 = boot_ns();
        let w0 = SystemTime::now();
        let pair = Pair::now();
        let w1 = SystemTime::now();
        let b1 = boot_ns();
        assert!(b0 <= pair.boot && pair.boot <= b1);
        assert!(w0 <= pair.wall && pair.wall <= w1);
    }
}
