//! [`PostgresStore::connect`](super::PostgresStore::connect)'s parameters: the TLS
//! settings tokio-postgres does not know (`sslmode=verify-ca`, `verify-full`,
//! `sslrootcert`) taken out before it parses the rest, and the text shown in errors,
//! without a password.
//!
//! Both of libpq's forms are read the way tokio-postgres reads them: `key=value` pairs
//! (a value may be `'quoted'`, with `\` escaping), and `postgres://` or
//! `postgresql://` URLs whose query holds percent-encoded `key=value` pairs.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// libpq's `sslmode` values, less `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid sslmode `{other}`: use disable, prefer, require, verify-ca or \
                     verify-full"
                ));
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// `sslrootcert`: the CAs the server's certificate is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RootCert {
    /// `sslrootcert=system`: the platform's roots.
    System,
    /// A PEM file of CA certificates.
    File(PathBuf),
}

/// The parameters, split.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Params {
    /// The parameters without `sslmode` and `sslrootcert`, for tokio-postgres.
    pub(super) rest: String,
    /// `sslmode`, when given (the last one, as libpq takes).
    pub(super) ssl_mode: Option<SslMode>,
    /// `sslrootcert`, when given.
    pub(super) root_cert: Option<RootCert>,
}

/// Takes `sslmode` and `sslrootcert` out of `params`.
///
/// Text that is not well formed is left whole to tokio-postgres, whose parser then
/// says what is wrong.
///
/// # Errors
/// An `sslmode` value libpq does not know, or one redrive does not take (`allow`).
pub(super) fn split(params: &str) -> Result<Params, String> {
    let Some(parsed) = Parsed::new(params) else {
        return Ok(Params {
            rest: params.to_owned(),
            ssl_mode: None,
            root_cert: None,
        });
    };
    let mut ssl_mode = None;
    let mut root_cert = None;
    for pair in &parsed.pairs {
        match &*pair.key {
            "sslmode" => ssl_mode = Some(SslMode::parse(&pair.value)?),
            "sslrootcert" if pair.value == "system" => root_cert = Some(RootCert::System),
            "sslrootcert" => root_cert = Some(RootCert::File(PathBuf::from(&pair.value))),
            _ => {}
        }
    }
    let rest = parsed.without(|key| matches!(key, "sslmode" | "sslrootcert"));
    Ok(Params {
        rest,
        ssl_mode,
        root_cert,
    })
}

/// `params` with any password shown as `***`, for error messages; `None` when the text
/// is not well formed enough to tell where a password would be.
pub(super) fn redact(params: &str) -> Option<String> {
    let parsed = Parsed::new(params)?;
    let mut shown = String::with_capacity(params.len());
    let mut at = 0;
    let mut hide = |span: Range<usize>, shown: &mut String| {
        shown.push_str(&params[at..span.start]);
        shown.push_str("***");
        at = span.end;
    };
    if let Some(password) = parsed.url_password.clone() {
        hide(password, &mut shown);
    }
    for pair in parsed.pairs.iter().filter(|p| p.key == "password") {
        hide(pair.value_span.clone(), &mut shown);
    }
    shown.push_str(&params[at..]);
    Some(shown)
}

/// One `key=value` of the parameters.
struct Pair<'a> {
    key: Cow<'a, str>,
    value: String,
    /// Where the pair is in the text, `key=value` whole.
    span: Range<usize>,
    /// Where its value is, quotes included.
    value_span: Range<usize>,
}

/// The parameters, read.
struct Parsed<'a> {
    text: &'a str,
    /// For a URL, where its query starts (the `?`).
    query: Option<usize>,
    /// For a URL, where its password is.
    url_password: Option<Range<usize>>,
    pairs: Vec<Pair<'a>>,
}

impl<'a> Parsed<'a> {
    fn new(text: &'a str) -> Option<Self> {
        match ["postgres://", "postgresql://"]
            .iter()
            .find(|prefix| text.starts_with(*prefix))
        {
            Some(prefix) => Self::url(text, prefix.len()),
            None => Self::keywords(text),
        }
    }

    /// The pairs of libpq's `key=value` form.
    fn keywords(text: &'a str) -> Option<Self> {
        let mut pairs = Vec::new();
        let mut cursor = Cursor { text, at: 0 };
        loop {
            cursor.skip_whitespace();
            let start = cursor.at;
            let key = cursor.take_while(|c| !c.is_whitespace() && c != '=');
            if key.is_empty() {
                // tokio-postgres stops here too, at the end or at a `=` with no key.
                break;
            }
            cursor.skip_whitespace();
            if !cursor.eat('=') {
                return None;
            }
            cursor.skip_whitespace();
            let value_start = cursor.at;
            let value = cursor.value()?;
            pairs.push(Pair {
                key: Cow::Borrowed(key),
                value,
                span: start..cursor.at,
                value_span: value_start..cursor.at,
            });
        }
        Some(Parsed {
            text,
            query: None,
            url_password: None,
            pairs,
        })
    }

    /// The pairs of a URL's query, which starts at the first `?` after the credentials
    /// (tokio-postgres takes these up to the first `@`).
    fn url(text: &'a str, prefix: usize) -> Option<Self> {
        let credentials_end = text[prefix..].find('@').map(|at| prefix + at);
        let after_credentials = credentials_end.map_or(prefix, |at| at + 1);
        let query = text[after_credentials..]
            .find('?')
            .map(|q| after_credentials + q);
        // The password runs from the first `:` of the credentials to the last `@` before
        // the query, so that a password with an unencoded `@` is not shown in part.
        let url_password = credentials_end.and_then(|first_at| {
            let colon = prefix + text[prefix..first_at].find(':')?;
            let last_at = text[..query.unwrap_or(text.len())].rfind('@')?;
            Some(colon + 1..last_at)
        });
        let mut pairs = Vec::new();
        if let Some(q) = query {
            let mut start = q + 1;
            for piece in text[q + 1..].split('&') {
                let span = start..start + piece.len();
                start = span.end + 1;
                let (key, value) = piece.split_once('=')?;
                pairs.push(Pair {
                    key: percent_decode(key)?,
                    value: percent_decode(value)?.into_owned(),
                    value_span: span.start + key.len() + 1..span.end,
                    span,
                });
            }
        }
        Some(Parsed {
            text,
            query,
            url_password,
            pairs,
        })
    }

    /// The text without the pairs whose key `drop` picks.
    fn without(&self, drop: impl Fn(&str) -> bool) -> String {
        match self.query {
            None => {
                let mut kept = String::with_capacity(self.text.len());
                let mut at = 0;
                for pair in self.pairs.iter().filter(|p| drop(&p.key)) {
                    kept.push_str(&self.text[at..pair.span.start]);
                    at = pair.span.end;
                }
                kept.push_str(&self.text[at..]);
                kept
            }
            Some(q) => {
                let kept: Vec<&str> = self
                    .pairs
                    .iter()
                    .filter(|p| !drop(&p.key))
                    .map(|p| &self.text[p.span.clone()])
                    .collect();
                if kept.is_empty() {
                    self.text[..q].to_owned()
                } else {
                    format!("{}?{}", &self.text[..q], kept.join("&"))
                }
            }
        }
    }
}

/// A place in `key=value` text, read as tokio-postgres reads it.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.text[self.at..].chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, target: char) -> bool {
        let found = self.peek() == Some(target);
        if found {
            self.at += target.len_utf8();
        }
        found
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &'a str {
        let start = self.at;
        while self.peek().is_some_and(&keep) {
            self.next();
        }
        &self.text[start..self.at]
    }

    fn skip_whitespace(&mut self) {
        self.take_while(char::is_whitespace);
    }

    /// A value: `'quoted'`, or up to the next whitespace; `\` escapes the next character.
    fn value(&mut self) -> Option<String> {
        let quoted = self.eat('\'');
        let mut value = String::new();
        loop {
            match self.peek() {
                None if quoted => return None,
                None => break,
                Some('\'') if quoted => {
                    self.next();
                    return Some(value);
                }
                Some(c) if !quoted && c.is_whitespace() => break,
                Some(_) => {
                    let c = self.next()?;
                    if c == '\\' {
                        value.extend(self.next());
                    } else {
                        value.push(c);
                    }
                }
            }
        }
        (!value.is_empty()).then_some(value)
    }
}

/// `text` with its `%XX` escapes decoded; `None` when that is not UTF-8.
fn percent_decode(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains('%') {
        return Some(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_ok(params: &str) -> Params {
        split(params).unwrap_or_else(|e| panic!("{params}: {e}"))
    }

    #[test]
    fn keyword_form_loses_its_tls_settings() {
        let p = split_ok("host=db sslmode=verify-full user=app sslrootcert=/etc/ca.pem");
        assert_eq!(p.rest, "host=db  user=app ");
        assert_eq!(p.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(p.root_cert, Some(RootCert::File("/etc/ca.pem".into())));
        assert!(p.rest.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn keyword_form_takes_quotes_spaces_and_escapes() {
        let p =
            split_ok(r"host = db sslmode = 'verify-ca' sslrootcert='/my certs/it\'s.pem' x=a\ b");
        assert_eq!(p.rest, r"host = db   x=a\ b");
        assert_eq!(p.ssl_mode, Some(SslMode::VerifyCa));
        assert_eq!(
            p.root_cert,
            Some(RootCert::File("/my certs/it's.pem".into()))
        );
    }

    #[test]
    fn the_last_setting_counts() {
        let p = split_ok("sslmode=disable sslmode=require");
        assert_eq!(p.ssl_mode, Some(SslMode::Require));
        assert_eq!(p.rest.trim(), "");
    }

    #[test]
    fn url_form_loses_its_tls_settings() {
        let p = split_ok(
            "postgresql://app:pw@db:5432/shop?sslmode=verify-full&application_name=x\
             &sslrootcert=%2Fetc%2Fmy%20ca.pem",
        );
        assert_eq!(
            p.rest,
            "postgresql://app:pw@db:5432/shop?application_name=x"
        );
        assert_eq!(p.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(p.root_cert, Some(RootCert::File("/etc/my ca.pem".into())));

        let p = split_ok("postgres://db/shop?sslmode=require&sslrootcert=system");
        assert_eq!(p.rest, "postgres://db/shop");
        assert_eq!(p.ssl_mode, Some(SslMode::Require));
        assert_eq!(p.root_cert, Some(RootCert::System));
        assert!(p.rest.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn a_question_mark_in_the_password_is_not_a_query() {
        let p = split_ok("postgresql://app:a?b@db/shop?sslmode=require");
        assert_eq!(p.rest, "postgresql://app:a?b@db/shop");
        assert_eq!(p.ssl_mode, Some(SslMode::Require));
    }

    #[test]
    fn no_settings_leave_the_text_alone() {
        for params in [
            "host=db user=app",
            "postgresql://db/shop",
            "postgresql://db/shop?application_name=x",
            "",
        ] {
            let p = split_ok(params);
            assert_eq!(p.rest, params);
            assert_eq!((p.ssl_mode, p.root_cert), (None, None));
        }
    }

    #[test]
    fn text_that_is_not_well_formed_goes_to_tokio_postgres_whole() {
        for params in ["host=db sslmode", "host='db", "postgresql://db?sslmode"] {
            let p = split_ok(params);
            assert_eq!(p.rest, params);
        }
    }

    #[test]
    fn unknown_modes_are_refused_with_the_known_ones() {
        for params in ["sslmode=allow", "postgresql://db?sslmode=always"] {
            let err = split(params).unwrap_err();
            assert!(err.contains("verify-full"), "{err}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let cases = [
            (
                "host=db password=hunter2 user=app",
                "host=db password=*** user=app",
            ),
            (
                r"password = 'hun ter\'2' sslmode=require",
                "password = *** sslmode=require",
            ),
            (
                "postgresql://app:hunter2@db/shop?sslmode=require",
                "postgresql://app:***@db/shop?sslmode=require",
            ),
            (
                "postgresql://app:hun@ter2@db/shop",
                "postgresql://app:***@db/shop",
            ),
            (
                "postgres://db/shop?user=app&password=hunter2",
                "postgres://db/shop?user=app&password=***",
            ),
            ("postgresql://app@db/shop", "postgresql://app@db/shop"),
        ];
        for (params, shown) in cases {
            assert_eq!(redact(params).as_deref(), Some(shown), "{params}");
        }
        assert_eq!(redact("password='hunter2"), None);
    }
}
