//! Summaries of a throughput bench's rounds, shared by the adapter benches through
//! `#[path]`: each row's ratio to a base row, round by round, and medians.

use std::time::Duration;

/// The median of `v`; of an even count, the upper of the middle two.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each round's rate as a percentage of `base`'s rate in the same round. Every row of
/// a round reads the same number of messages, so the rates are in the inverse ratio of
/// the times.
pub(crate) fn ratios<T, U>(runs: &[(Duration, T)], base: &[(Duration, U)]) -> Vec<f64> {
    runs.iter()
        .zip(base)
        .map(|((took, _), (base, _))| 100.0 * base.as_secs_f64() / took.as_secs_f64())
        .collect()
}

/// Ratios as a table cell: `98 %, 97 %, 99 %`.
pub(crate) fn per_round(ratios: &[f64]) -> String {
    ratios
        .iter()
        .map(|r| format!("{r:.0} %"))
        .collect::<Vec<_>>()
        .join(", ")
}
