//! CLOCK_BOOTTIME, the datapath's clock (`bpf_ktime_get_boot_ns`): event timestamps and
//! byte-budget expiries are in it. The one place that reads it and converts it to wall time.

use std::time::{Duration, SystemTime};

use rustix::time::{ClockId, clock_gettime};

/// CLOCK_BOOTTIME now, in nanoseconds.
pub fn boot_ns() -> u64 {
    let ts = clock_gettime(ClockId::Boottime);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time of a CLOCK_BOOTTIME instant. The offset between the two clocks is taken
/// anew at each call, so a clock stepped by NTP after the start does not skew later events.
pub fn wall_of(boot: u64) -> SystemTime {
    let now_boot = boot_ns();
    let now_wall = SystemTime::now();
    if boot <= now_boot {
        now_wall - Duration::from_nanos(now_boot - boot)
    } else {
        now_wall + Duration::from_nanos(boot - now_boot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_converts_to_now() {
        let wall = wall_of(boot_ns());
        let skew = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(skew < Duration::from_secs(1), "{skew:?}");
    }
}
