//! [`Backoff`]: the delay between two tries.

use std::time::Duration;

use super::ConfigError;

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
/// use redrive_middleware::retry::{Backoff, Jitter};
///
/// let backoff = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(2))
///     .with_multiplier(3.0)
///     .with_jitter(Jitter::Equal);
/// assert_eq!(backoff.max(), Duration::from_secs(2));
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
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// Exponential from `min` up to `max`, doubling, with full jitter.
    pub fn exponential(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            ..Self::default()
        }
    }

    /// The same delay before every retry, without jitter.
    pub fn constant(delay: Duration) -> Self {
        Backoff {
            min: delay,
            max: delay,
            multiplier: 1.0,
            jitter: Jitter::None,
        }
    }

    /// Sets the growth factor between two retries (finite, at least 1).
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets the jitter.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
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

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(ConfigError::new(
                "retry",
                format!(
                    "the backoff multiplier is {}; set it to a finite number of at least 1.0 \
                 (1.0 keeps the delay constant, 2.0 doubles it)",
                    self.multiplier
                ),
            ));
        }
        if self.max < self.min {
            return Err(ConfigError::new(
                "retry",
                format!(
                    "the backoff max ({:?}) is below its min ({:?}); raise the max or lower the min",
                    self.max, self.min
                ),
            ));
        }
        if let Jitter::Proportional(r) = self.jitter {
            if !(r.is_finite() && (0.0..=1.0).contains(&r)) {
                return Err(ConfigError::new(
                    "retry",
                    format!(
                        "the jitter ratio is {r}; set it between 0.0 (no jitter) and 1.0 (full jitter)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The un-jittered delay before retry `n` (1-based): `min · multiplier^(n−1)`,
    /// capped at `max`.
    fn base(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.min.as_secs_f64() * self.multiplier.powi(exp);
        if secs.is_finite() && secs < self.max.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max
        }
    }

    /// The largest delay retry `n` (1-based) can get, whatever the jitter draws.
    pub(crate) fn upper_bound(&self, n: u32) -> Duration {
        match self.jitter {
            // Retry n draws from min ..= previous · multiplier, whose largest value is
            // the exponential delay of retry n + 1.
            Jitter::Decorrelated => self.base(n.saturating_add(1)),
            _ => self.base(n),
        }
    }

    /// The delay before retry `n` (1-based); `previous` is the delay drawn before the
    /// last retry (zero before the first), used by decorrelated jitter.
    pub(crate) fn delay(&self, n: u32, previous: Duration) -> Duration {
        let d = self.base(n);
        let ratio = match self.jitter {
            Jitter::None => return d,
            Jitter::Full => 1.0,
            Jitter::Equal => 0.5,
            Jitter::Proportional(r) => r,
            Jitter::Decorrelated => {
                let top = previous
                    .max(self.min)
                    .mul_f64(self.multiplier)
                    .min(self.max);
                return self.min + (top - self.min).mul_f64(fastrand::f64());
            }
        };
        let spread = d.mul_f64(ratio);
        (d - spread) + spread.mul_f64(fastrand::f64())
    }
}

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
    }

    #[test]
    fn constant_is_constant() {
        let b = Backoff::constant(250 * MS);
        assert!((1..10).all(|n| b.delay(n, Duration::ZERO) == 250 * MS));
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
