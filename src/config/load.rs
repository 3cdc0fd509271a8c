//! Reading the settings: the TOML file, then the environment variables over it, then
//! every section's checks.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::{Figment, Provider};

use super::error::{EnvSource, Sources};
use super::{ENV_PREFIX, Settings, SettingsError};

/// Between a section and its key in a variable's name: `REDRIVE_RETRY__MAX_TRIES`.
const ENV_SEPARATOR: &str = "__";

/// The sections, which the environment variables read must start with.
const SECTIONS: [&str; 8] = [
    "worker",
    "retry",
    "timeout",
    "circuit_breaker",
    "rate_limit",
    "idempotency",
    "dead_letter",
    "replay",
];

impl Settings {
    /// Reads the TOML file at `path`, then the `REDRIVE_` environment variables over
    /// it, and checks every section.
    ///
    /// # Errors
    /// [`SettingsError`] when the file cannot be read or is not TOML, or a key or value
    /// is wrong; it names the key, and the line or the variable it came from.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SettingsError> {
        Self::load_with_prefix(path, ENV_PREFIX)
    }

    /// [`load`](Self::load), with the environment variables that start with `prefix`
    /// (`ORDERS_` reads `ORDERS_RETRY__MAX_TRIES`).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with_prefix(path: impl AsRef<Path>, prefix: &str) -> Result<Self, SettingsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError::read(path, e))?;
        let env = Env::prefixed(prefix)
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                SECTIONS.iter().any(|s| key.starts_with(s))
            })
            .split(ENV_SEPARATOR);
        Self::extract(Some(path.to_owned()), text, Some((prefix, env)))
    }

    /// Settings from TOML text alone, without the environment.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn from_toml_str(toml: &str) -> Result<Self, SettingsError> {
        Self::extract(None, toml.to_owned(), None)
    }

    fn extract(
        file: Option<PathBuf>,
        text: String,
        env: Option<(&str, Env)>,
    ) -> Result<Self, SettingsError> {
        // figment's TOML errors carry no line; toml_edit's do.
        if let Err(e) = toml_edit::ImDocument::parse(text.as_str()) {
            return Err(SettingsError::syntax(file, &text, &e));
        }
        let mut figment = Figment::from(Toml::string(&text));
        let mut env_source = None;
        if let Some((prefix, env)) = env {
            env_source = Some(EnvSource {
                prefix: prefix.to_owned(),
                name: env.metadata().name.into_owned(),
            });
            figment = figment.merge(env);
        }
        let extracted = figment.extract::<Settings>();
        let sources = Sources {
            file,
            text: Some(text),
            figment: Some(figment),
            env: env_source,
        };
        let mut settings = extracted.map_err(|e| sources.extract_error(&e))?;
        settings.sources = sources;
        settings.check()?;
        Ok(settings)
    }

    /// Checks every section present, so that a wrong value stops the start.
    fn check(&self) -> Result<(), SettingsError> {
        if let Some(w) = &self.worker {
            self.check_worker(w)?;
        }
        self.retry()?;
        self.timeout()?;
        self.circuit_breaker()?;
        if self.rate_limit.is_some() {
            self.rate_limit()?;
        }
        self.idempotency_config()?;
        self.dead_letter_config()?;
        self.replay()?;
        Ok(())
    }
}
