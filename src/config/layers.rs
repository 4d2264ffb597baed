//! The two layers a setting's value comes from, and the section loaders that read them: a
//! `FERRY_*` environment variable (the first set one of a setting's names, see
//! [`super::reference::SETTINGS`]) over the file's key, over the default. An empty variable counts
//! as unset, so a deployment can blank one without removing it.
//!
//! Each section turns its text into typed values here, naming the key of a value that does not
//! parse; the checks across settings are [`super::Config`]'s `validate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    AdminConfig, ConfigError, ConsumeConfig, DEFAULT_GROUP_ID, DEFAULT_SCHEMA, DEFAULT_TOPIC,
    DatabaseConfig, KafkaConfig, PartnerConfig, RelayConfig, UnknownEventTypes, rate,
};

/// The first of `names` set to something other than blanks in `env`.
pub(super) fn first_set(
    env: &dyn Fn(&str) -> Option<String>,
    names: &[&'static str],
) -> Option<(&'static str, String)> {
    names
        .iter()
        .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
}

/// The environment layer, read through a lookup (the process's, or a test's map).
pub(super) struct Layers<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Layers<'a> {
    pub(super) fn new(env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Layers { env }
    }

    /// The environment's text for a setting named `names`.
    fn text(&self, names: &[&'static str]) -> Option<String> {
        first_set(self.env, names).map(|(_, v)| v)
    }

    /// A whole number from the environment variable `var` of the setting `key`.
    fn number(&self, key: &'static str, var: &'static str) -> Result<Option<u64>, ConfigError> {
        self.text(&[var])
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| ConfigError::Invalid {
                    key,
                    value: v.clone(),
                    reason: "not a whole number".to_owned(),
                })
            })
            .transpose()
    }

    /// The duration `key` is set to: the environment's text over the file's value.
    fn duration(
        &self,
        key: &'static str,
        var: &'static str,
        file: Option<DurationSetting>,
    ) -> Result<Option<Duration>, ConfigError> {
        duration(key, self.text(&[var]), file)
    }

    /// A value `FromStr` reads, from the environment over the file.
    fn parsed<T: std::str::FromStr<Err = String>>(
        &self,
        key: &'static str,
        var: &'static str,
        file: Option<String>,
    ) -> Result<Option<T>, ConfigError> {
        self.text(&[var])
            .or(file)
            .map(|v| {
                v.trim().parse().map_err(|reason| ConfigError::Invalid {
                    key,
                    value: v.clone(),
                    reason,
                })
            })
            .transpose()
    }

    pub(super) fn database(&self, file: FileDatabase) -> Result<DatabaseConfig, ConfigError> {
        let url = self
            .text(&["FERRY_DATABASE_URL", "DATABASE_URL"])
            .or(file.url)
            .ok_or(ConfigError::Missing {
                setting: "the Postgres URL",
                key: "database.url",
                env: "FERRY_DATABASE_URL",
            })?;
        let max_connections = self
            .number("database.max_connections", "FERRY_DATABASE_MAX_CONNECTIONS")?
            .map(|n| n.min(u64::from(u32::MAX)) as u32)
            .or(file.max_connections)
            .unwrap_or(10);
        let schema = self
            .text(&["FERRY_DATABASE_SCHEMA"])
            .or(file.schema)
            .unwrap_or_else(|| DEFAULT_SCHEMA.to_owned());
        Ok(DatabaseConfig {
            url,
            max_connections,
            schema,
        })
    }

    pub(super) fn kafka(&self, file: FileKafka) -> Result<KafkaConfig, ConfigError> {
        let mut properties = file.properties;
        // The environment's pairs go over the file's table one by one: a deployment sets its
        // secret (`sasl.password`) without repeating the rest.
        if let Some(list) = self.text(&["FERRY_KAFKA_PROPERTIES"]) {
            for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some((name, value)) if !name.trim().is_empty() => {
                        properties.insert(name.trim().to_owned(), value.trim().to_owned());
                    }
                    _ => {
                        return Err(ConfigError::Invalid {
                            key: "kafka.properties",
                            value: pair.to_owned(),
                            reason:
                                "FERRY_KAFKA_PROPERTIES takes name=value pairs separated by commas"
                                    .to_owned(),
                        });
                    }
                }
            }
        }
        Ok(KafkaConfig {
            // Empty when unset: only the commands that talk to Kafka require it
            // (`Config::require_kafka`); `ferry migrate` or `ferry tenant` need no broker.
            brokers: self
                .text(&["FERRY_KAFKA_BROKERS", "KAFKA_BROKERS"])
                .or(file.brokers)
                .unwrap_or_default(),
            topic: self
                .text(&["FERRY_KAFKA_TOPIC"])
                .or(file.topic)
                .unwrap_or_else(|| DEFAULT_TOPIC.to_owned()),
            group_id: self
                .text(&["FERRY_KAFKA_GROUP_ID"])
                .or(file.group_id)
                .unwrap_or_else(|| DEFAULT_GROUP_ID.to_owned()),
            properties,
        })
    }

    pub(super) fn relay(&self, file: FileRelay) -> Result<RelayConfig, ConfigError> {
        let defaults = RelayConfig::default();
        let table = self
            .text(&["FERRY_RELAY_TABLE"])
            .or(file.table)
            .unwrap_or_else(|| format!("{}.{}", defaults.schema, defaults.table));
        let (schema, table) = match table.split_once('.') {
            Some((s, t)) => (s.to_owned(), t.to_owned()),
            None => ("public".to_owned(), table),
        };
        Ok(RelayConfig {
            slot: self
                .text(&["FERRY_RELAY_SLOT"])
                .or(file.slot)
                .unwrap_or(defaults.slot),
            publication: self
                .text(&["FERRY_RELAY_PUBLICATION"])
                .or(file.publication)
                .unwrap_or(defaults.publication),
            schema,
            table,
            mode: self
                .parsed("relay.mode", "FERRY_RELAY_MODE", file.mode)?
                .unwrap_or(defaults.mode),
            batch_changes: self
                .number("relay.batch_changes", "FERRY_RELAY_BATCH_CHANGES")?
                .map(|n| n.min(u64::from(u32::MAX)) as u32)
                .or(file.batch_changes)
                .unwrap_or(defaults.batch_changes),
            poll_interval: self
                .duration(
                    "relay.poll_interval_ms",
                    "FERRY_RELAY_POLL_INTERVAL_MS",
                    file.poll_interval_ms,
                )?
                .unwrap_or(defaults.poll_interval),
            status_interval: defaults.status_interval,
            max_message_bytes: self
                .number("relay.max_message_bytes", "FERRY_RELAY_MAX_MESSAGE_BYTES")?
                .map(|n| n as usize)
                .or(file.max_message_bytes)
                .unwrap_or(defaults.max_message_bytes),
            topic_partitions: self
                .number("relay.topic_partitions", "FERRY_RELAY_TOPIC_PARTITIONS")?
                .map(|n| n.min(10_000) as i32)
                .or(file.topic_partitions)
                .unwrap_or(defaults.topic_partitions),
        })
    }

    pub(super) fn partner(&self, file: FilePartner) -> Result<PartnerConfig, ConfigError> {
        let defaults = PartnerConfig::default();
        let tenant_rate = self
            .number(
                "partner.tenant_rate_limit",
                "FERRY_PARTNER_TENANT_RATE_LIMIT",
            )?
            .or(file.tenant_rate_limit);
        Ok(PartnerConfig {
            url: self.text(&["FERRY_PARTNER_URL"]).or(file.url),
            token: self
                .text(&["FERRY_PARTNER_TOKEN"])
                .or(file.token)
                .unwrap_or_default(),
            timeout: self
                .duration(
                    "partner.timeout_ms",
                    "FERRY_PARTNER_TIMEOUT_MS",
                    file.timeout_ms,
                )?
                .unwrap_or(defaults.timeout),
            rate_limit: rate(
                "partner.rate_limit",
                self.number("partner.rate_limit", "FERRY_PARTNER_RATE_LIMIT")?
                    .or(file.rate_limit),
            )?,
            tenant_rate_limit: rate("partner.tenant_rate_limit", tenant_rate)?,
            max_response_bytes: self
                .number(
                    "partner.max_response_bytes",
                    "FERRY_PARTNER_MAX_RESPONSE_BYTES",
                )?
                .or(file.max_response_bytes)
                .unwrap_or(defaults.max_response_bytes),
        })
    }

    pub(super) fn consume(&self, c: FileConsume) -> Result<ConsumeConfig, ConfigError> {
        Ok(ConsumeConfig {
            max_in_flight: self
                .number("consume.max_in_flight", "FERRY_CONSUME_MAX_IN_FLIGHT")?
                .or(c.max_in_flight)
                .map(|n| n.min(1_000_000) as usize),
            retry_base: self.duration(
                "consume.retry_base_ms",
                "FERRY_CONSUME_RETRY_BASE_MS",
                c.retry_base_ms,
            )?,
            retry_max: self.duration(
                "consume.retry_max_ms",
                "FERRY_CONSUME_RETRY_MAX_MS",
                c.retry_max_ms,
            )?,
            pause_after_attempts: self
                .number(
                    "consume.pause_after_attempts",
                    "FERRY_CONSUME_PAUSE_AFTER_ATTEMPTS",
                )?
                .or(c.pause_after_attempts)
                .map(|n| n.min(u64::from(u32::MAX)) as u32),
            pause_after: self.duration(
                "consume.pause_after_ms",
                "FERRY_CONSUME_PAUSE_AFTER_MS",
                c.pause_after_ms,
            )?,
            retry_after_max: self.duration(
                "consume.retry_after_max_ms",
                "FERRY_CONSUME_RETRY_AFTER_MAX_MS",
                c.retry_after_max_ms,
            )?,
            auto_resume_after: self.duration(
                "consume.auto_resume_after_ms",
                "FERRY_CONSUME_AUTO_RESUME_AFTER_MS",
                c.auto_resume_after_ms,
            )?,
            commit_interval: self.duration(
                "consume.commit_interval_ms",
                "FERRY_CONSUME_COMMIT_INTERVAL_MS",
                c.commit_interval_ms,
            )?,
            settle_interval: self.duration(
                "consume.settle_interval_ms",
                "FERRY_CONSUME_SETTLE_INTERVAL_MS",
                c.settle_interval_ms,
            )?,
            unknown_event_types: self
                .parsed::<UnknownEventTypes>(
                    "consume.unknown_event_types",
                    "FERRY_CONSUME_UNKNOWN_EVENT_TYPES",
                    c.unknown_event_types,
                )?
                .unwrap_or_default(),
            integration: self
                .text(&["FERRY_CONSUME_INTEGRATION"])
                .or(c.integration)
                .filter(|p| !p.trim().is_empty())
                .map(PathBuf::from),
            dead_letter_topic: self
                .text(&["FERRY_CONSUME_DEAD_LETTER_TOPIC"])
                .or(c.dead_letter_topic)
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
            mapping_views: self
                .number("consume.mapping_views", "FERRY_CONSUME_MAPPING_VIEWS")?
                .or(c.mapping_views)
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        })
    }

    pub(super) fn admin(&self, file: FileAdmin) -> Result<AdminConfig, ConfigError> {
        let addr = match self.text(&["FERRY_ADMIN_ADDR"]).or(file.addr) {
            Some(a) => a.trim().parse().map_err(|_| ConfigError::Invalid {
                key: "admin.addr",
                value: a.clone(),
                reason: "expected an address like 127.0.0.1:9190".to_owned(),
            })?,
            None => AdminConfig::default().addr,
        };
        let hosts = match self.text(&["FERRY_ADMIN_HOSTS"]) {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
                .collect(),
            None => file.hosts,
        };
        Ok(AdminConfig {
            addr,
            token: self
                .text(&["FERRY_ADMIN_TOKEN"])
                .or(file.token)
                .filter(|t| !t.is_empty()),
            hosts,
        })
    }
}

impl FileConfig {
    /// The file at `path`, parsed: an unknown key is refused, naming it and its line.
    pub(super) fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) database: FileDatabase,
    #[serde(default)]
    pub(super) kafka: FileKafka,
    #[serde(default)]
    pub(super) relay: FileRelay,
    #[serde(default)]
    pub(super) partner: FilePartner,
    #[serde(default)]
    pub(super) consume: FileConsume,
    #[serde(default)]
    pub(super) admin: FileAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    addr: Option<String>,
    token: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConsume {
    max_in_flight: Option<u64>,
    retry_base_ms: Option<DurationSetting>,
    retry_max_ms: Option<DurationSetting>,
    pause_after_attempts: Option<u64>,
    pause_after_ms: Option<DurationSetting>,
    retry_after_max_ms: Option<DurationSetting>,
    auto_resume_after_ms: Option<DurationSetting>,
    commit_interval_ms: Option<DurationSetting>,
    settle_interval_ms: Option<DurationSetting>,
    unknown_event_types: Option<String>,
    integration: Option<String>,
    dead_letter_topic: Option<String>,
    mapping_views: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePartner {
    url: Option<String>,
    token: Option<String>,
    timeout_ms: Option<DurationSetting>,
    rate_limit: Option<u64>,
    tenant_rate_limit: Option<u64>,
    max_response_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRelay {
    slot: Option<String>,
    publication: Option<String>,
    table: Option<String>,
    mode: Option<String>,
    batch_changes: Option<u32>,
    poll_interval_ms: Option<DurationSetting>,
    max_message_bytes: Option<usize>,
    topic_partitions: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDatabase {
    url: Option<String>,
    max_connections: Option<u32>,
    schema: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileKafka {
    brokers: Option<String>,
    topic: Option<String>,
    group_id: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

/// A duration as the file writes it: text with a unit (`"30s"`, `"200ms"`, `"1m 30s"`), or a
/// bare number of milliseconds (what the `_ms` keys took before units were allowed).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum DurationSetting {
    Millis(u64),
    Text(String),
}

/// The duration `key` is set to: the environment's text over the file's value.
fn duration(
    key: &'static str,
    env: Option<String>,
    file: Option<DurationSetting>,
) -> Result<Option<Duration>, ConfigError> {
    let text = match (env, file) {
        (Some(text), _) | (None, Some(DurationSetting::Text(text))) => text,
        (None, Some(DurationSetting::Millis(ms))) => return Ok(Some(Duration::from_millis(ms))),
        (None, None) => return Ok(None),
    };
    if let Ok(ms) = text.trim().parse::<u64>() {
        return Ok(Some(Duration::from_millis(ms)));
    }
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| ConfigError::Invalid {
            key,
            value: text.clone(),
            reason: format!(
                "not a duration like 30s, 200ms or 1m 30s (a bare number is milliseconds): {e}"
            ),
        })
}
