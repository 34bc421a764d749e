//! Wall-clock times as operators read them.

use std::time::{SystemTime, UNIX_EPOCH};

/// RFC 3339 UTC time, without a date library.
pub fn fmt_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(fmt_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000)), "2026-11-18T11:06:40Z");
        assert_eq!(fmt_time(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400 + 86_399)), "2000-02-29T23:59:59Z");
    }
}
