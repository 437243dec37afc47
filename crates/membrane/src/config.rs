//! `membrane.toml`: the settings of `membrane run` (and the database URL of every command) in
//! a file. The file is the layer below the environment: flag > environment > file > default.
//!
//! ```toml
//! database_url = "postgres://membrane@db.internal/membrane"
//! listen = "0.0.0.0:8080"
//! buckets = "buckets"
//! sweep_interval = "60s"        # or a number of seconds: 0.5
//! round_size = 2000             # users claimed per real-time round
//! realtime_workers = 2          # real-time rounds at once
//! sweep_workers = 3             # pages of one sweep checked at once
//! write_keys = ["wk_live_1"]
//! read_tokens = ["rt_live_1"]
//! log_format = "json"           # human | json
//!
//! [webhooks]
//! request_timeout = "10s"
//! max_attempts = 10
//! backoff_base = "5s"
//! backoff_max = "1h"
//! concurrency = 4
//! poll_interval = "1s"
//! ```
//!
//! Unknown keys are errors with `file:line:col` and a did-you-mean hint, as in bucket files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use membrane_criteria::diag::{Diagnostic, Diagnostics};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "MEMBRANE_CONFIG";
/// Read when present in the working directory and no other file is named.
pub const DEFAULT_CONFIG: &str = "membrane.toml";

const TOP_KEYS: &[&str] = &[
    "database_url",
    "listen",
    "buckets",
    "sweep_interval",
    "round_size",
    "realtime_workers",
    "sweep_workers",
    "write_keys",
    "read_tokens",
    "log_format",
    "webhooks",
];
const WEBHOOK_KEYS: &[&str] = &[
    "request_timeout",
    "max_attempts",
    "backoff_base",
    "backoff_max",
    "concurrency",
    "poll_interval",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// What a configuration file says; `None` where it says nothing.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub database_url: Option<String>,
    pub listen: Option<SocketAddr>,
    pub buckets: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration")]
    pub sweep_interval: Option<Duration>,
    pub round_size: Option<u32>,
    pub realtime_workers: Option<usize>,
    pub sweep_workers: Option<usize>,
    pub write_keys: Option<Vec<String>>,
    pub read_tokens: Option<Vec<String>>,
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub webhooks: WebhookSettings,
}

/// The `[webhooks]` table: overrides of the delivery defaults.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    #[serde(default, deserialize_with = "duration")]
    pub request_timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    pub backoff_base: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub backoff_max: Option<Duration>,
    pub concurrency: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub poll_interval: Option<Duration>,
}

impl WebhookSettings {
    pub fn apply(&self, config: &mut membrane_engine::webhooks::WebhookConfig) {
        let WebhookSettings {
            request_timeout,
            max_attempts,
            backoff_base,
            backoff_max,
            concurrency,
            poll_interval,
        } = self.clone();
        config.request_timeout = request_timeout.unwrap_or(config.request_timeout);
        config.max_attempts = max_attempts.unwrap_or(config.max_attempts);
        config.backoff_base = backoff_base.unwrap_or(config.backoff_base);
        config.backoff_max = backoff_max.unwrap_or(config.backoff_max);
        config.concurrency = concurrency.unwrap_or(config.concurrency);
        config.poll_interval = poll_interval.unwrap_or(config.poll_interval);
    }
}

/// A duration written as in bucket files (`90s`, `15m`, `1h`) or as a number of seconds.
fn duration<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Seconds(f64),
        Text(String),
    }
    let seconds = match Written::deserialize(de)? {
        Written::Seconds(seconds) if seconds > 0.0 && seconds.is_finite() => seconds,
        Written::Seconds(seconds) => {
            return Err(serde::de::Error::custom(format!(
                "a duration must be a positive number of seconds, got {seconds}"
            )))
        }
        Written::Text(text) => membrane_criteria::duration::parse_duration(&text)
            .map_err(|error| serde::de::Error::custom(format!("invalid duration: {error}")))?
            as f64,
    };
    Ok(Some(Duration::from_secs_f64(seconds)))
}

/// Which file to read: `--config`, else `MEMBRANE_CONFIG` (both must exist), else
/// `./membrane.toml` when present.
pub fn locate(flag: Option<&Path>) -> Option<(PathBuf, bool)> {
    if let Some(path) = flag {
        return Some((path.to_owned(), true));
    }
    if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|path| !path.is_empty()) {
        return Some((PathBuf::from(path), true));
    }
    let default = PathBuf::from(DEFAULT_CONFIG);
    default.is_file().then_some((default, false))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source} (named by --config or MEMBRANE_CONFIG)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// Reads the configuration file, if any; an empty configuration without one.
pub fn load(flag: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let Some((path, named)) = locate(flag) else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path.display().to_string(), &text),
        Err(source) if named || source.kind() != std::io::ErrorKind::NotFound => {
            Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            })
        }
        // `./membrane.toml` vanished between the check and the read.
        Err(_) => Ok(FileConfig::default()),
    }
}

/// Parses a configuration file's text; `path` is only for messages.
pub fn parse(path: &str, text: &str) -> Result<FileConfig, ConfigError> {
    let invalid = |items: Vec<Diagnostic>| {
        ConfigError::Invalid(Diagnostics {
            path: path.to_owned(),
            source: text.to_owned(),
            items,
        })
    };
    let table = DeTable::parse(text).map_err(|error| {
        invalid(vec![Diagnostic::new(
            format!("invalid TOML: {}", error.message().trim_end()),
            error.span().unwrap_or(0..0),
            "invalid TOML here",
        )])
    })?;
    // Every unknown key at once, each with a hint; serde would stop at the first.
    let mut unknown = unknown_keys(table.get_ref(), TOP_KEYS, "");
    if let Some((_, webhooks)) = table
        .get_ref()
        .iter()
        .find(|(key, _)| key.get_ref() == "webhooks")
    {
        if let DeValue::Table(webhooks) = webhooks.get_ref() {
            unknown.extend(unknown_keys(webhooks, WEBHOOK_KEYS, "webhooks."));
        }
    }
    if !unknown.is_empty() {
        return Err(invalid(unknown));
    }
    toml::from_str(text).map_err(|error| {
        invalid(vec![Diagnostic::new(
            error.message().trim_end(),
            error.span().unwrap_or(0..0),
            "invalid value",
        )])
    })
}

fn unknown_keys(table: &DeTable<'_>, known: &[&str], prefix: &str) -> Vec<Diagnostic> {
    table
        .iter()
        .filter(|(key, _)| {
            let name: &str = key.get_ref();
            !known.contains(&name)
        })
        .map(|(key, _)| {
            let name: &str = key.get_ref();
            let help = match suggest(name, known) {
                Some(suggestion) => format!("did you mean `{prefix}{suggestion}`?"),
                None => format!(
                    "known keys are {}",
                    known
                        .iter()
                        .map(|k| format!("`{prefix}{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            Diagnostic::new(
                format!("unknown key `{prefix}{name}`"),
                key.span(),
                "unknown key",
            )
            .with_help(help)
        })
        .collect()
}

/// The closest of `known` to a misspelt `word`, if close enough to be a likely typo.
fn suggest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|candidate| (strsim::jaro_winkler(word, candidate), *candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_text(text: &str) -> String {
        match parse("membrane.toml", text) {
            Err(ConfigError::Invalid(diagnostics)) => diagnostics.render(),
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn a_full_file_parses() {
        let config = parse(
            "membrane.toml",
            r#"
database_url = "postgres://db/membrane"
listen = "0.0.0.0:9000"
buckets = "segments"
sweep_interval = 0.5
round_size = 500
realtime_workers = 3
sweep_workers = 4
write_keys = ["w1", "w2"]
read_tokens = ["r1"]
log_format = "json"

[webhooks]
request_timeout = "3s"
max_attempts = 4
backoff_max = "2m"
"#,
        )
        .expect("a valid file");
        assert_eq!(
            config.database_url.as_deref(),
            Some("postgres://db/membrane")
        );
        assert_eq!(
            config.listen,
            Some("0.0.0.0:9000".parse().expect("an address"))
        );
        assert_eq!(config.buckets, Some(PathBuf::from("segments")));
        assert_eq!(config.sweep_interval, Some(Duration::from_millis(500)));
        assert_eq!(config.round_size, Some(500));
        assert_eq!(config.realtime_workers, Some(3));
        assert_eq!(config.sweep_workers, Some(4));
        assert_eq!(config.write_keys, Some(vec!["w1".into(), "w2".into()]));
        assert_eq!(config.log_format, Some(LogFormat::Json));
        assert_eq!(
            config.webhooks.request_timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(config.webhooks.max_attempts, Some(4));
        assert_eq!(config.webhooks.backoff_max, Some(Duration::from_secs(120)));
        assert_eq!(config.webhooks.concurrency, None);
    }

    #[test]
    fn unknown_keys_name_file_line_column_and_the_likely_key() {
        let text = error_text("buckets = \"b\"\nlisten_addr = \"127.0.0.1:1\"\n");
        assert!(text.contains("unknown key `listen_addr`"), "{text}");
        assert!(text.contains("membrane.toml:2:1"), "{text}");
        assert!(text.contains("did you mean `listen`?"), "{text}");

        let text = error_text("[webhooks]\nmax_attempt = 3\n");
        assert!(text.contains("membrane.toml:2:1"), "{text}");
        assert!(
            text.contains("did you mean `webhooks.max_attempts`?"),
            "{text}"
        );

        let text = error_text("colour = true\n");
        assert!(text.contains("known keys are `database_url`"), "{text}");
    }

    #[test]
    fn wrong_values_name_where_and_what() {
        let text = error_text("buckets = \"b\"\nsweep_interval = \"10 minutes\"\n");
        assert!(text.contains("membrane.toml:2:18"), "{text}");
        assert!(text.contains("duration"), "{text}");

        let text = error_text("listen = \"localhost\"\n");
        assert!(text.contains("membrane.toml:1:10"), "{text}");

        let text = error_text("log_format = \"xml\"\n");
        assert!(text.contains("membrane.toml:1:14"), "{text}");
        assert!(text.contains("human"), "{text}");
    }
}
