//! [`Backoff`]: the delay before the next try, redelivery or reconnect, in one place.
//!
//! The retry layer, the Worker's [`Redelivery`](crate::Redelivery) and the adapters'
//! reconnects all draw their delays here.

use std::fmt;
use std::time::Duration;

/// How a delay is randomised, so that many messages failing together do not retry
/// together.
///
/// With `d` the exponential (or constant) delay for this retry:
///
/// | jitter | delay drawn from |
/// |---|---|
/// | [`None`](Jitter::None) | `d` exactly |
/// | [`Full`](Jitter::Full) | `0 ..= d` |
/// | [`Equal`](Jitter::Equal) | `d/2 ..= d` |
/// | [`Proportional(r)`](Jitter::Proportional) | `d·(1 − r) ..= d`, `r` in `0.0 ..= 1.0` |
/// | [`Decorrelated`](Jitter::Decorrelated) | `min ..= previous · multiplier`, capped at `max` |
///
/// `Full` spreads retries the most, `Equal` keeps a floor. `Decorrelated` is the
/// variant from AWS's "Exponential Backoff and Jitter" article (which uses a factor
/// of 3; here the factor is the backoff's multiplier): each delay is drawn from the
/// minimum up to the previous delay times the multiplier, so it grows without
/// following the exponential curve.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum Jitter {
    /// No randomness.
    None,
    /// Uniform over `0 ..= d`.
    #[default]
    Full,
    /// Uniform over `d/2 ..= d`.
    Equal,
    /// Uniform over `d·(1 − r) ..= d`; `Full` is `Proportional(1.0)`, `Equal` is
    /// `Proportional(0.5)`.
    Proportional(f64),
    /// Uniform over `min ..= previous · multiplier`, capped at `max`.
    Decorrelated,
}

/// The delay before each retry: exponential or constant, with [`Jitter`].
///
/// | setting | default |
/// |---|---|
/// | `min` (first delay) | 100 ms |
/// | `max` (cap) | 10 s |
/// | `multiplier` | 2.0 |
/// | `jitter` | [`Jitter::Full`] |
///
/// Without jitter, retry `n` (1-based) waits `min · multiplier^(n−1)`, capped at `max`.
///
/// ```
/// use std::time::Duration;
/// use redrive_core::{Backoff, Jitter};
///
/// let backoff = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(2))
///     .with_multiplier(3.0)
///     .with_jitter(Jitter::Equal);
/// assert_eq!(backoff.max(), Duration::from_secs(2));
/// assert!(backoff.validate().is_ok());
///
/// // The third retry waits 50 ms · 3² = 450 ms, drawn from 225 ..= 450 ms.
/// let d = backoff.delay_for(3);
/// assert!(d >= Duration::from_millis(225) && d <= Duration::from_millis(450));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::exponential(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// Exponential from `min` up to `max`, doubling, with full jitter.
    pub const fn exponential(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            multiplier: 2.0,
            jitter: Jitter::Full,
        }
    }

    /// The same delay before every retry, without jitter.
    pub const fn constant(delay: Duration) -> Self {
        Backoff {
            min: delay,
            max: delay,
            multiplier: 1.0,
            jitter: Jitter::None,
        }
    }

    /// Sets the growth factor between two retries (finite, at least 1).
    #[must_use]
    pub const fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets the jitter.
    #[must_use]
    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The largest delay this backoff gives.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The growth factor.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// Checks that this backoff can work: a finite multiplier of at least 1, a max not
    /// below the min, a [`Proportional`](Jitter::Proportional) ratio within
    /// `0.0 ..= 1.0`.
    ///
    /// # Errors
    /// [`InvalidBackoff`], whose message says what to change.
    pub fn validate(&self) -> Result<(), InvalidBackoff> {
        let problem = if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            Problem::Multiplier(self.multiplier)
        } else if self.max < self.min {
            Problem::MaxBelowMin {
                min: self.min,
                max: self.max,
            }
        } else if let Jitter::Proportional(r) = self.jitter {
            if r.is_finite() && (0.0..=1.0).contains(&r) {
                return Ok(());
            }
            Problem::JitterRatio(r)
        } else {
            return Ok(());
        };
        Err(InvalidBackoff {
            problem,
            setting: "backoff",
            first: "min",
        })
    }

    /// The un-jittered delay before retry `n` (1-based): `min · multiplier^(n−1)`,
    /// capped at `max`.
    fn base(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        self.scaled(self.min, self.multiplier.powi(exp))
    }

    /// `d · factor`, capped at `max`: past it, infinite, or (for a backoff `validate`
    /// refuses) negative or NaN, it is `max`.
    fn scaled(&self, d: Duration, factor: f64) -> Duration {
        Duration::try_from_secs_f64(d.as_secs_f64() * factor).map_or(self.max, |d| d.min(self.max))
    }

    /// The largest delay retry `n` (1-based) can get, whatever the jitter draws.
    pub fn upper_bound(&self, n: u32) -> Duration {
        match self.jitter {
            // Retry n draws from min ..= previous · multiplier, whose largest value is
            // the exponential delay of retry n + 1.
            Jitter::Decorrelated => self.base(n.saturating_add(1)),
            _ => self.base(n),
        }
    }

    /// The delay before retry `n` (1-based); `previous` is the delay drawn before the
    /// last retry (zero before the first), used by decorrelated jitter.
    ///
    /// Where the previous draw is not kept, [`delay_for`](Backoff::delay_for) gives the
    /// delay from `n` alone.
    pub fn delay(&self, n: u32, previous: Duration) -> Duration {
        if self.jitter == Jitter::Decorrelated {
            let top = self.scaled(previous.max(self.min), self.multiplier);
            return draw_between(self.min, top);
        }
        self.delay_for(n)
    }

    /// The delay before retry `n` (1-based), from `n` alone: for callers that keep no
    /// previous draw (a redelivery counts only its attempts). Decorrelated jitter then
    /// draws from `min ..= `[`upper_bound(n)`](Backoff::upper_bound), as if the
    /// previous draw had been its largest.
    pub fn delay_for(&self, n: u32) -> Duration {
        let d = self.base(n);
        let ratio = match self.jitter {
            Jitter::None => return d,
            Jitter::Full => 1.0,
            Jitter::Equal => 0.5,
            // Clamped for a ratio `validate` refuses; NaN draws no jitter.
            Jitter::Proportional(r) if r >= 0.0 => r.min(1.0),
            Jitter::Proportional(_) => 0.0,
            Jitter::Decorrelated => return draw_between(self.min, self.upper_bound(n)),
        };
        draw_between(d.saturating_sub(d.mul_f64(ratio)), d)
    }
}

/// Uniform over `low ..= high` (`high` when it is below `low`).
fn draw_between(low: Duration, high: Duration) -> Duration {
    let spread = high.saturating_sub(low);
    high - spread + spread.mul_f64(fastrand::f64())
}

/// A [`Backoff`] that cannot work: what [`Backoff::validate`] returns. Its message
/// says what to change.
#[derive(Clone, Debug, PartialEq)]
pub struct InvalidBackoff {
    problem: Problem,
    /// What the message calls the backoff: "backoff", "redelivery".
    setting: &'static str,
    /// What the message calls the first delay: "min", "initial delay".
    first: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Problem {
    Multiplier(f64),
    MaxBelowMin { min: Duration, max: Duration },
    JitterRatio(f64),
}

impl InvalidBackoff {
    /// The same error in the words of a setting that wraps a backoff (`setting`) and
    /// names its first delay `first`.
    pub(crate) fn named(self, setting: &'static str, first: &'static str) -> Self {
        InvalidBackoff {
            setting,
            first,
            ..self
        }
    }
}

impl fmt::Display for InvalidBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let InvalidBackoff { setting, first, .. } = self;
        match self.problem {
            Problem::Multiplier(m) => write!(
                f,
                "the {setting} multiplier is {m}; set it to a finite number of at least 1.0 \
                 (1.0 keeps the delay constant, 2.0 doubles it)"
            ),
            Problem::MaxBelowMin { min, max } => write!(
                f,
                "the {setting} max ({max:?}) is below its {first} ({min:?}); raise the max or \
                 lower the {first}"
            ),
            Problem::JitterRatio(r) => write!(
                f,
                "the {setting} jitter ratio is {r}; set it between 0.0 (no jitter) and 1.0 \
                 (full jitter)"
            ),
        }
    }
}

impl std::error::Error for InvalidBackoff {}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn exponential_without_jitter_is_exact_and_capped() {
        let b = Backoff::exponential(100 * MS, 1000 * MS).with_jitter(Jitter::None);
        let d: Vec<_> = (1..=6).map(|n| b.delay(n, Duration::ZERO)).collect();
        assert_eq!(
            d,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.delay(u32::MAX, Duration::ZERO), 1000 * MS);
        let d: Vec<_> = (1..=6).map(|n| b.delay_for(n)).collect();
        assert_eq!(
            d,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
    }

    #[test]
    fn constant_is_constant() {
        let b = Backoff::constant(250 * MS);
        assert!((1..10).all(|n| b.delay(n, Duration::ZERO) == 250 * MS));
        assert!((1..10).all(|n| b.delay_for(n) == 250 * MS));
    }

    #[test]
    fn jitter_stays_within_its_bounds_over_many_draws() {
        let base = Backoff::exponential(400 * MS, 400 * MS);
        for (jitter, low) in [
            (Jitter::Full, Duration::ZERO),
            (Jitter::Equal, 200 * MS),
            (Jitter::Proportional(0.25), 300 * MS),
        ] {
            let b = base.with_jitter(jitter);
            let draws: Vec<_> = (0..2000).map(|_| b.delay(1, Duration::ZERO)).collect();
            assert!(
                draws.iter().all(|d| (low..=400 * MS).contains(d)),
                "{jitter:?}"
            );
            // The draws really spread over the range, not stuck at one end.
            let mid = low + (400 * MS - low) / 2;
            assert!(
                draws.iter().any(|d| *d < mid) && draws.iter().any(|d| *d > mid),
                "{jitter:?}"
            );
        }
    }

    #[test]
    fn decorrelated_grows_from_the_previous_delay_and_is_capped() {
        let b = Backoff::exponential(100 * MS, 1000 * MS)
            .with_multiplier(3.0)
            .with_jitter(Jitter::Decorrelated);
        let mut previous = Duration::ZERO;
        for n in 1..200 {
            let d = b.delay(n, previous);
            let top = previous.max(100 * MS).mul_f64(3.0).min(1000 * MS);
            assert!(
                d >= 100 * MS && d <= top,
                "retry {n}: {d:?} not in 100ms..={top:?}"
            );
            assert!(d <= b.upper_bound(n), "retry {n}");
            previous = d;
        }
    }

    #[test]
    fn decorrelated_without_a_previous_draw_stays_within_the_upper_bound() {
        let b = Backoff::exponential(100 * MS, 1000 * MS)
            .with_multiplier(3.0)
            .with_jitter(Jitter::Decorrelated);
        for n in 1..50 {
            let d = b.delay_for(n);
            assert!(d >= 100 * MS && d <= b.upper_bound(n), "retry {n}: {d:?}");
        }
    }

    #[test]
    fn a_backoff_validate_refuses_does_not_panic() {
        for b in [
            Backoff::exponential(2 * MS, MS),
            Backoff::default().with_multiplier(-3.0),
            Backoff::default().with_multiplier(f64::NAN),
            Backoff::default().with_jitter(Jitter::Proportional(f64::NAN)),
            Backoff::default().with_jitter(Jitter::Proportional(-1.0)),
            Backoff::default().with_jitter(Jitter::Proportional(7.0)),
            Backoff::exponential(2 * MS, MS).with_jitter(Jitter::Decorrelated),
        ] {
            assert!(b.validate().is_err(), "{b:?}");
            for n in [0, 1, 2, 3, 64, u32::MAX] {
                let d = b.delay_for(n).max(b.delay(n, 5 * MS));
                assert!(d <= Duration::from_secs(10), "{b:?} {n}: {d:?}");
            }
        }
    }

    #[test]
    fn invalid_backoffs_say_what_to_change() {
        let nan = Backoff::default()
            .with_multiplier(f64::NAN)
            .validate()
            .unwrap_err();
        assert!(nan.to_string().contains("multiplier is NaN"), "{nan}");
        let neg = Backoff::default()
            .with_multiplier(-2.0)
            .validate()
            .unwrap_err();
        assert!(neg.to_string().contains("at least 1.0"), "{neg}");
        let below = Backoff::exponential(2 * MS, MS).validate().unwrap_err();
        assert!(below.to_string().contains("below its min"), "{below}");
        let named = below.named("redelivery", "initial delay").to_string();
        assert!(
            named.contains("redelivery max (1ms) is below its initial delay (2ms)"),
            "{named}"
        );
        for r in [f64::NAN, -0.1, 1.5] {
            let err = Backoff::default()
                .with_jitter(Jitter::Proportional(r))
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains("jitter ratio"), "{err}");
        }
        assert!(Backoff::default().validate().is_ok());
    }
}
