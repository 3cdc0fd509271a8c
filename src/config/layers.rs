//! The layers [`Settings`] hands out, each built from its section, and the error that
//! names the key a layer refuses.

use std::fmt;
use std::sync::Arc;

use redrive_core::{Capabilities, Publisher};
use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{
    IdempotencyConfig, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use redrive_middleware::rate_limit::{RateLimitConfig, RateLimitLayer};
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_middleware::timeout::TimeoutLayer;

use super::error::Kind;
use super::sections::{
    CircuitBreakerSection, DeadLetterSection, IdempotencySection, Only, RateLimitSection,
    RetrySection,
};
use super::{Settings, SettingsError};

impl Settings {
    /// An error about `key` of `section`, or about the whole section.
    pub(super) fn invalid(&self, path: &[&str], detail: impl fmt::Display) -> SettingsError {
        self.sources
            .error(Kind::Invalid, path, path.len() == 1, detail.to_string())
    }

    /// Builds a layer from its section. When the layer refuses the section, the error
    /// names the key to blame: the one whose removal lets it build, or else the first
    /// that fails alone as the whole did; the section when there is none.
    fn build<T, E: fmt::Display>(
        &self,
        section: &'static str,
        keys: &[&'static str],
        make: impl Fn(Only) -> Result<T, E>,
    ) -> Result<T, SettingsError> {
        let whole = match make(Only::All) {
            Ok(t) => return Ok(t),
            Err(e) => e.to_string(),
        };
        if let Some(key) = keys.iter().find(|k| make(Only::Except(k)).is_ok()) {
            return Err(self.invalid(&[section, key], whole));
        }
        for key in keys {
            if let Err(e) = make(Only::Key(key)) {
                if e.to_string() == whole {
                    return Err(self.invalid(&[section, key], whole));
                }
            }
        }
        Err(self.invalid(&[section], whole))
    }

    /// `[retry]` as a configuration, to add what only code gives (a classifier) before
    /// [`RetryLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the retry layer refuses.
    pub fn retry_config(&self) -> Result<RetryConfig, SettingsError> {
        let section = self.retry.clone().unwrap_or_default();
        self.build("retry", RetrySection::KEYS, |only| {
            let config = section.config(only);
            RetryLayer::new(config.clone()).map(|_| config)
        })
    }

    /// The retry layer `[retry]` sets.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the retry layer refuses.
    pub fn retry(&self) -> Result<RetryLayer, SettingsError> {
        let section = self.retry.clone().unwrap_or_default();
        self.build("retry", RetrySection::KEYS, |only| {
            RetryLayer::new(section.config(only))
        })
    }

    /// The per-try timeout `[timeout]` sets (`per_try`; 30 s without it).
    ///
    /// # Errors
    /// [`SettingsError`] naming `timeout.per_try` when it is 0.
    pub fn timeout(&self) -> Result<TimeoutLayer, SettingsError> {
        match self.timeout.as_ref().and_then(|t| t.per_try) {
            Some(d) => TimeoutLayer::new(d).map_err(|e| self.invalid(&["timeout", "per_try"], e)),
            None => Ok(TimeoutLayer::default()),
        }
    }

    /// `[circuit_breaker]` as a configuration, to add a classifier before
    /// [`CircuitBreakerLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the circuit breaker refuses.
    pub fn circuit_breaker_config(&self) -> Result<CircuitBreakerConfig, SettingsError> {
        let section = self.circuit_breaker.clone().unwrap_or_default();
        self.build("circuit_breaker", CircuitBreakerSection::KEYS, |only| {
            let config = section.config(only);
            CircuitBreakerLayer::new(config.clone()).map(|_| config)
        })
    }

    /// The circuit breaker `[circuit_breaker]` sets.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the circuit breaker refuses.
    pub fn circuit_breaker(&self) -> Result<CircuitBreakerLayer, SettingsError> {
        let section = self.circuit_breaker.clone().unwrap_or_default();
        self.build("circuit_breaker", CircuitBreakerSection::KEYS, |only| {
            CircuitBreakerLayer::new(section.config(only))
        })
    }

    /// `[rate_limit]` as a rate, for a
    /// [`KeyedRateLimitLayer`](crate::middleware::rate_limit::KeyedRateLimitLayer).
    ///
    /// # Errors
    /// [`SettingsError`] when there is no `[rate_limit]` section, or naming the key
    /// the rate limit refuses.
    pub fn rate_limit_config(&self) -> Result<RateLimitConfig, SettingsError> {
        let section = self.rate_limit_section()?;
        self.build("rate_limit", RateLimitSection::KEYS, |only| {
            let config = section.config(only);
            RateLimitLayer::new(config).map(|_| config)
        })
    }

    /// The rate limit `[rate_limit]` sets. Unlike the other layers', it has no default:
    /// a stack that holds a rate limit needs the section.
    ///
    /// # Errors
    /// [`SettingsError`] when there is no `[rate_limit]` section, or naming the key
    /// the rate limit refuses.
    pub fn rate_limit(&self) -> Result<RateLimitLayer, SettingsError> {
        let section = self.rate_limit_section()?;
        self.build("rate_limit", RateLimitSection::KEYS, |only| {
            RateLimitLayer::new(section.config(only))
        })
    }

    fn rate_limit_section(&self) -> Result<&RateLimitSection, SettingsError> {
        self.rate_limit.as_ref().ok_or_else(|| {
            SettingsError::new(
                Kind::Missing,
                Some("rate_limit".into()),
                None,
                "the stack holds a rate limit, so the settings need its rate: add a \
                 [rate_limit] section with `limit` (messages per `per`, 1s by default)",
            )
        })
    }

    /// `[idempotency]` as a configuration, to add a key function before
    /// [`IdempotencyLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the idempotency layer refuses.
    pub fn idempotency_config(&self) -> Result<IdempotencyConfig, SettingsError> {
        // A throwaway store: the configuration's checks are the layer's.
        let store = Arc::new(MemoryStore::with_shards(1));
        let section = self.idempotency.clone().unwrap_or_default();
        self.build("idempotency", IdempotencySection::KEYS, |only| {
            let config = section.config(only);
            IdempotencyLayer::new(store.clone(), config.clone()).map(|_| config)
        })
    }

    /// The idempotency layer `[idempotency]` sets, over `store`.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the idempotency layer refuses.
    pub fn idempotency<St: IdempotencyStore + ?Sized>(
        &self,
        store: Arc<St>,
    ) -> Result<IdempotencyLayer<St>, SettingsError> {
        let section = self.idempotency.clone().unwrap_or_default();
        self.build("idempotency", IdempotencySection::KEYS, |only| {
            IdempotencyLayer::new(store.clone(), section.config(only))
        })
    }

    /// `[dead_letter]` as a configuration, to add a classifier or a filter before
    /// [`DeadLetterLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the dead-letter layer refuses.
    pub fn dead_letter_config(&self) -> Result<DeadLetterConfig, SettingsError> {
        // A broker that counts deliveries: the check's warning about one that does not
        // belongs to the Worker's build, where the broker is known.
        let caps = Capabilities::new().with_delivery_count(true);
        let section = self.dead_letter.clone().unwrap_or_default();
        self.build("dead_letter", DeadLetterSection::KEYS, |only| {
            let config = section.config(only);
            config.check(&caps).map(|()| config)
        })
    }

    /// The dead-letter layer `[dead_letter]` sets, publishing through `publisher`
    /// (which also checks the destination's name).
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the dead-letter layer or the publisher refuses.
    pub fn dead_letter<P: Publisher>(
        &self,
        publisher: Arc<P>,
    ) -> Result<DeadLetterLayer<P>, SettingsError> {
        let section = self.dead_letter.clone().unwrap_or_default();
        self.build("dead_letter", DeadLetterSection::KEYS, |only| {
            DeadLetterLayer::new(publisher.clone(), section.config(only))
        })
    }
}
