//! [`SettingsError`], and finding where a setting came from: the file's line or the
//! environment variable.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::error::{Kind as FigmentKind, OneOf};
use figment::{Figment, Metadata};

/// Settings that cannot be read or cannot work. The message names the key
/// (`retry.max_tries`), where its value came from (the file and line, or the
/// environment variable) and what is wrong:
///
/// ```text
/// invalid setting `retry.max_tries` at redrive.toml line 7: found string "x", expected u32
/// unknown setting `retry.max_trys` at redrive.toml line 7: expected one of `max_tries`, `max_elapsed`, `backoff`, `budget`
/// invalid setting `worker.concurrency` from environment variable REDRIVE_WORKER__CONCURRENCY: 0 workers would run nothing; set it to 1 or more
/// ```
#[derive(Debug)]
pub struct SettingsError {
    kind: Kind,
    key: Option<String>,
    origin: Option<Origin>,
    detail: String,
    source: Option<std::io::Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// The file cannot be read.
    Read,
    /// The file is not TOML.
    Syntax,
    /// A key no section has.
    Unknown,
    /// A required key is absent.
    Missing,
    /// A value of the wrong type, or one its layer rejects.
    Invalid,
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// The settings file (none for [`Settings::from_toml_str`](super::Settings::from_toml_str)),
    /// and the line of the key when it was found.
    File {
        path: Option<PathBuf>,
        line: Option<usize>,
    },
    /// An environment variable.
    Env(String),
}

impl SettingsError {
    pub(super) fn new(
        kind: Kind,
        key: Option<String>,
        origin: Option<Origin>,
        detail: impl Into<String>,
    ) -> Self {
        SettingsError {
            kind,
            key,
            origin,
            detail: detail.into(),
            source: None,
        }
    }

    pub(super) fn read(path: &Path, e: std::io::Error) -> Self {
        SettingsError {
            kind: Kind::Read,
            key: None,
            origin: Some(Origin::File {
                path: Some(path.to_owned()),
                line: None,
            }),
            detail: e.to_string(),
            source: Some(e),
        }
    }

    pub(super) fn syntax(file: Option<PathBuf>, text: &str, e: &toml_edit::TomlError) -> Self {
        let line = e.span().map(|s| line_at(text, s.start));
        let detail = e.message().trim_end().to_owned();
        SettingsError::new(
            Kind::Syntax,
            None,
            Some(Origin::File { path: file, line }),
            detail,
        )
    }

    /// The key whose value is wrong, as a dotted path (`retry.backoff.max`), or the
    /// section (`retry`) when the layer rejected a combination of its keys; `None`
    /// when the file itself could not be read or parsed.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The settings file the value came from, if it came from a file.
    pub fn file(&self) -> Option<&Path> {
        match &self.origin {
            Some(Origin::File { path, .. }) => path.as_deref(),
            _ => None,
        }
    }

    /// The line (1-based) of the key in the settings file, or of the TOML syntax error.
    pub fn line(&self) -> Option<usize> {
        match &self.origin {
            Some(Origin::File { line, .. }) => *line,
            _ => None,
        }
    }

    /// The environment variable the value came from, if it did.
    pub fn env_var(&self) -> Option<&str> {
        match &self.origin {
            Some(Origin::Env(var)) => Some(var),
            _ => None,
        }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == Kind::Read {
            let path = self.file().unwrap_or(Path::new(""));
            return write!(
                f,
                "cannot read the settings file {}: {}",
                path.display(),
                self.detail
            );
        }
        f.write_str(match self.kind {
            Kind::Syntax => "invalid TOML",
            Kind::Unknown => "unknown setting",
            Kind::Missing => "missing setting",
            Kind::Read | Kind::Invalid => "invalid setting",
        })?;
        if let Some(key) = &self.key {
            write!(f, " `{key}`")?;
        }
        match &self.origin {
            Some(Origin::File { path, line }) => match (path, line) {
                (Some(p), Some(n)) => write!(f, " at {} line {n}", p.display())?,
                (Some(p), None) => write!(f, " in {}", p.display())?,
                (None, Some(n)) => write!(f, " at line {n}")?,
                (None, None) => {}
            },
            Some(Origin::Env(var)) => write!(f, " from environment variable {var}")?,
            None => {}
        }
        write!(f, ": {}", self.detail)
    }
}

impl StdError for SettingsError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Where the values of a [`Settings`](super::Settings) came from, to name them in errors.
#[derive(Clone, Default)]
pub(super) struct Sources {
    /// The settings file; `None` for TOML given as a string.
    pub(super) file: Option<PathBuf>,
    /// The file's text.
    pub(super) text: Option<String>,
    /// The file and the environment, merged.
    pub(super) figment: Option<Figment>,
    /// The environment, when read.
    pub(super) env: Option<EnvSource>,
}

/// The environment variables merged over the file.
#[derive(Clone, Debug)]
pub(super) struct EnvSource {
    /// `REDRIVE_` by default.
    pub(super) prefix: String,
    /// The name figment gives the provider, which tells its values apart.
    pub(super) name: String,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("file", &self.file)
            .field("env_prefix", &self.env.as_ref().map(|e| &e.prefix))
            .finish()
    }
}

impl Sources {
    /// Where the value at `path` came from; `table` when `path` names a section.
    fn origin(&self, md: Option<&Metadata>, path: &[String], table: bool) -> Option<Origin> {
        if let (Some(md), Some(env)) = (md, &self.env) {
            if md.name == env.name {
                let mut var = env.prefix.clone();
                var.push_str(&path.join("__").to_ascii_uppercase());
                if table {
                    var.push_str("__*");
                }
                return Some(Origin::Env(var));
            }
        }
        let text = self.text.as_deref()?;
        Some(Origin::File {
            path: self.file.clone(),
            line: line_of(text, path),
        })
    }

    /// An error about the value at `path` (a key, or a section when `table`).
    pub(super) fn error(
        &self,
        kind: Kind,
        path: &[&str],
        table: bool,
        detail: impl Into<String>,
    ) -> SettingsError {
        let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
        let joined = path.join(".");
        let md = self.figment.as_ref().and_then(|f| f.find_metadata(&joined));
        let origin = self.origin(md, &path, table);
        SettingsError::new(kind, Some(joined), origin, detail)
    }

    /// figment's error, as a [`SettingsError`] naming the key and where it came from.
    pub(super) fn extract_error(&self, e: &figment::Error) -> SettingsError {
        let mut key = e.path.clone();
        let (kind, table, detail) = match &e.kind {
            // The path ends with the unknown key.
            FigmentKind::UnknownField(_, expected) => (
                Kind::Unknown,
                false,
                format!("expected {}", OneOf(expected)),
            ),
            // The path is the section that lacks the key.
            FigmentKind::MissingField(field) => {
                let detail = format!("`{field}` is required in [{}]", key.join("."));
                key.push(field.to_string());
                (Kind::Missing, true, detail)
            }
            FigmentKind::InvalidType(found, expected)
            | FigmentKind::InvalidValue(found, expected) => (
                Kind::Invalid,
                false,
                format!("found {found}, expected {expected}"),
            ),
            FigmentKind::UnknownVariant(found, expected) => (
                Kind::Invalid,
                false,
                format!("found `{found}`, expected {}", OneOf(expected)),
            ),
            other => (Kind::Invalid, false, other.to_string()),
        };
        let located = if table { &e.path } else { &key };
        let origin = self.origin(e.metadata.as_ref(), located, table);
        let key = (!key.is_empty()).then(|| key.join("."));
        SettingsError::new(kind, key, origin, detail)
    }
}

/// The line of the deepest key of `path` found in the TOML `text`.
fn line_of(text: &str, path: &[String]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut line = None;
    for segment in path {
        let Some((key, item)) = table.get_key_value(segment) else {
            break;
        };
        if let Some(span) = key.span().or_else(|| item.span()) {
            line = Some(line_at(text, span.start));
        }
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    line
}

/// The line (1-based) of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn lines_are_found_in_every_table_form() {
        let text = "\
# comment
[worker]
concurrency = 4
redelivery = { initial = \"1s\", max = \"2s\" }

[retry.backoff]
max = \"1s\"

[dead_letter]
limits.max_attempts = 3
";
        assert_eq!(line_of(text, &path("worker")), Some(2));
        assert_eq!(line_of(text, &path("worker.concurrency")), Some(3));
        assert_eq!(line_of(text, &path("worker.redelivery.max")), Some(4));
        assert_eq!(line_of(text, &path("retry.backoff.max")), Some(7));
        assert_eq!(line_of(text, &path("retry.backoff")), Some(6));
        assert_eq!(
            line_of(text, &path("dead_letter.limits.max_attempts")),
            Some(10)
        );
        // Not there: the deepest key that is.
        assert_eq!(line_of(text, &path("worker.ordering")), Some(2));
        assert_eq!(line_of(text, &path("timeout")), None);
    }
}
