//! Reading one target: the engine-specific scrapes and what is derived from two of them.

pub(crate) mod postgres;
pub(crate) mod redis;

use crate::catalog::{self as c, Sample};

/// Adds the samples that compare this scrape with the previous one (`elapsed` seconds earlier):
/// ratios and rates over the interval, which say what is happening now where the cumulative
/// counters say what happened since the server started.
pub(crate) fn derive(previous: Option<&[Sample]>, elapsed: f64, current: &mut Vec<Sample>) {
    let before = |name: &str| previous.and_then(|p| Sample::find(p, name));
    let now = |name: &str| Sample::find(current, name);
    // Counters that went down were reset: the interval's work is then the new value.
    let increase = |name: &str| -> Option<f64> {
        let now = now(name)?;
        Some(match before(name) {
            Some(before) if now >= before => now - before,
            Some(_) => now,
            None => return None,
        })
    };
    let ratio = |hits: &str, misses: &str| -> Option<f64> {
        let (h, m) = match (increase(hits), increase(misses)) {
            (Some(h), Some(m)) if h + m > 0.0 => (h, m),
            // No lookups in the interval (or no previous scrape): the cumulative ratio.
            _ => (now(hits)?, now(misses)?),
        };
        (h + m > 0.0).then(|| h / (h + m))
    };
    let mut derived = Vec::new();
    if let Some(r) = ratio(c::PG_BLKS_HIT, c::PG_BLKS_READ) {
        derived.push(Sample::new(c::PG_CACHE_HIT_RATIO, r));
    }
    if let Some(r) = ratio(c::REDIS_HITS, c::REDIS_MISSES) {
        derived.push(Sample::new(c::REDIS_HIT_RATIO, r));
    }
    if elapsed > 0.0 {
        for (counter, rate) in [
            (c::REDIS_EVICTED, c::REDIS_EVICTIONS_RATE),
            (c::REDIS_REJECTED, c::REDIS_REJECTED_RATE),
        ] {
            if let Some(increase) = increase(counter) {
                derived.push(Sample::new(rate, increase / elapsed));
            }
        }
    }
    current.extend(derived);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_rates_cover_the_interval() {
        let previous = vec![
            Sample::new(c::PG_BLKS_HIT, 1000.0),
            Sample::new(c::PG_BLKS_READ, 1000.0),
            Sample::new(c::REDIS_EVICTED, 10.0),
        ];
        let mut current = vec![
            Sample::new(c::PG_BLKS_HIT, 1900.0),
            Sample::new(c::PG_BLKS_READ, 1100.0),
            Sample::new(c::REDIS_EVICTED, 30.0),
        ];
        derive(Some(&previous), 10.0, &mut current);
        assert_eq!(Sample::find(&current, c::PG_CACHE_HIT_RATIO), Some(0.9));
        assert_eq!(Sample::find(&current, c::REDIS_EVICTIONS_RATE), Some(2.0));
    }

    #[test]
    fn the_first_scrape_has_cumulative_ratios_and_no_rates() {
        let mut current = vec![
            Sample::new(c::PG_BLKS_HIT, 300.0),
            Sample::new(c::PG_BLKS_READ, 100.0),
            Sample::new(c::REDIS_EVICTED, 30.0),
        ];
        derive(None, 0.0, &mut current);
        assert_eq!(Sample::find(&current, c::PG_CACHE_HIT_RATIO), Some(0.75));
        assert_eq!(Sample::find(&current, c::REDIS_EVICTIONS_RATE), None);
    }
}
