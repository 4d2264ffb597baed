//! Configuration: an optional TOML file, overlaid by `FERRY_*` environment variables, validated
//! once at load so a bad setting fails at start with a message that names it.
//!
//! Every setting, with its environment variables and default, is listed once, in
//! [`reference::SETTINGS`]: `ferry config reference` prints it (as `docs/configuration.md`
//! holds it) and `ferry config check` prints the effective values and their sources.

mod layers;
pub mod reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default outbox topic (one topic for all of a tenant's events, so order holds across
/// aggregate types).
pub const DEFAULT_TOPIC: &str = "ferry.outbox";
/// The default consumer group.
pub const DEFAULT_GROUP_ID: &str = "ferry";

/// Validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Postgres settings.
    pub database: DatabaseConfig,
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// Relay settings.
    pub relay: RelayConfig,
    /// The partner's API (`ferry consume`, `ferry verify`).
    pub partner: PartnerConfig,
    /// `ferry consume`'s limits and retry policy: overrides of its defaults.
    pub consume: ConsumeConfig,
    /// The admin API each `ferry consume` serves.
    pub admin: AdminConfig,
}

/// The admin API's address and token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where it listens (loopback by default).
    pub addr: std::net::SocketAddr,
    /// The bearer token every data and action route needs; unset, `ferry consume` generates
    /// one at its first start, prints it once and keeps its hash in Postgres.
    pub token: Option<String>,
    /// `Host` header values answered besides the listening address (`host:port`): the names
    /// a load balancer or a Kubernetes Service reaches it by.
    pub hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9190)),
            token: None,
            hosts: Vec::new(),
        }
    }
}

/// `ferry consume` settings given in the file or the environment; unset ones keep the
/// consumer's defaults (`ConsumeOptions::default`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumeConfig {
    /// Events in flight at once, all tenants together.
    pub max_in_flight: Option<usize>,
    /// The first retry's backoff.
    pub retry_base: Option<Duration>,
    /// The longest backoff.
    pub retry_max: Option<Duration>,
    /// A tenant is paused after this many failed attempts at one event...
    pub pause_after_attempts: Option<u32>,
    /// ...or after failing this long.
    pub pause_after: Option<Duration>,
    /// The longest `Retry-After` honoured.
    pub retry_after_max: Option<Duration>,
    /// A tenant paused for a retryable cause is resumed automatically after this long.
    pub auto_resume_after: Option<Duration>,
    /// How often the offsets that moved are committed to the broker.
    pub commit_interval: Option<Duration>,
    /// How long a settled event may wait for its batch (`ConsumeOptions::settle_interval`).
    pub settle_interval: Option<Duration>,
    /// What an event of a type the integration does not know does.
    pub unknown_event_types: UnknownEventTypes,
    /// The integration file `ferry consume` runs (`docs/integrations.md`); unset, the
    /// built-in shop integration (`partner::integration`).
    pub integration: Option<PathBuf>,
    /// The terminal policy: unset, an event an operator gives up on (`skip`) is settled as
    /// skipped with an audit row; set, it is exported with its attempts to this topic first
    /// (`ferry dead-letters copy-back` writes it back into the tenant's stream).
    pub dead_letter_topic: Option<String>,
    /// Mappings held in memory, all tenants together, so that events start without a query
    /// (`mappings::views`); 0 holds none. Unset: [`crate::mappings::views::BUDGET`].
    pub mapping_views: Option<usize>,
}

/// What an event of a type the integration does not know does (`consume.unknown_event_types`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownEventTypes {
    /// Pause its tenant with the reason, the event parked first: nothing of the tenant passes
    /// an event nobody looked at (the default).
    #[default]
    Pause,
    /// Record it (`deliveries`, outcome `ignored`, the type named in `last_error`) and go on:
    /// for a stream that carries types meant for other consumers.
    Ignore,
}

impl std::str::FromStr for UnknownEventTypes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pause" => Ok(UnknownEventTypes::Pause),
            "ignore" => Ok(UnknownEventTypes::Ignore),
            _ => Err("must be pause or ignore".to_owned()),
        }
    }
}

/// The partner's API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerConfig {
    /// Its base URL (`http://host:port`); required by the commands that call it.
    pub url: Option<String>,
    /// The bearer token.
    pub token: String,
    /// How long one request may take.
    pub timeout: Duration,
    /// Requests per second to the partner, all tenants together (unlimited if unset): what
    /// the partner allows this client.
    pub rate_limit: Option<std::num::NonZeroU32>,
    /// Requests per second to the partner for any one tenant (unlimited if unset): what the
    /// partner allows one account. A tenant at its limit waits; the others do not.
    pub tenant_rate_limit: Option<std::num::NonZeroU32>,
    /// The largest answer read from the partner, in bytes: a longer one is a failure (a
    /// retryable one, as any answer that is not what the API documents), never a process's
    /// memory.
    pub max_response_bytes: u64,
}

impl Default for PartnerConfig {
    fn default() -> Self {
        PartnerConfig {
            url: None,
            token: String::new(),
            timeout: Duration::from_secs(10),
            rate_limit: None,
            tenant_rate_limit: None,
            max_response_bytes: 1 << 20,
        }
    }
}

/// `ferry relay` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The logical replication slot (created if missing).
    pub slot: String,
    /// The publication on the outbox table (created if missing, inserts only).
    pub publication: String,
    /// The outbox table's schema.
    pub schema: String,
    /// The outbox table.
    pub table: String,
    /// How the relay reads the slot.
    pub mode: RelayMode,
    /// Changes decoded per peek: a batch, produced and acknowledged before the slot advances.
    pub batch_changes: u32,
    /// How long to wait before peeking again when the outbox was idle.
    pub poll_interval: Duration,
    /// How often to log the slot's lag.
    pub status_interval: Duration,
    /// A record larger than this is sent as a rejection marker (keep it at or under the
    /// topic's `max.message.bytes`).
    pub max_message_bytes: usize,
    /// Partitions of the outbox topic when the relay has to create it (tenants spread over
    /// them; more partitions, more consumer instances can share the work).
    pub topic_partitions: i32,
}

/// How the relay reads its replication slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// The streaming replication protocol: the server pushes each transaction as it commits
    /// and decodes each WAL record once. Plain TCP or a Unix socket, no TLS.
    #[default]
    Stream,
    /// SQL functions over an ordinary connection (TLS works), polled: each peek decodes again
    /// from the slot's restart position, so latency grows with the write rate.
    Peek,
}

impl std::str::FromStr for RelayMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stream" => Ok(RelayMode::Stream),
            "peek" => Ok(RelayMode::Peek),
            _ => Err("must be stream or peek".to_owned()),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            slot: "ferry_outbox".to_owned(),
            publication: "ferry_outbox".to_owned(),
            schema: "public".to_owned(),
            table: "outbox".to_owned(),
            mode: RelayMode::Stream,
            batch_changes: 300_000,
            poll_interval: Duration::from_millis(20),
            status_interval: Duration::from_secs(10),
            max_message_bytes: 1_000_000,
            topic_partitions: 12,
        }
    }
}

/// Postgres settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `postgres://` URL.
    pub url: String,
    /// The pool's maximum size.
    pub max_connections: u32,
    /// The Postgres schema Ferry's own tables and migrations table live in (`ferry` by
    /// default): never beside the application's. The outbox is the application's table, in
    /// its schema (`relay.table`).
    pub schema: String,
}

/// The default of `database.schema`.
pub const DEFAULT_SCHEMA: &str = "ferry";

impl DatabaseConfig {
    /// Settings for `url`, with the default pool size and schema.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseConfig {
            url: url.into(),
            max_connections: 10,
            schema: DEFAULT_SCHEMA.to_owned(),
        }
    }
}

/// A requests-per-second limit: at least 1, and one a 32-bit count holds.
fn rate(
    key: &'static str,
    value: Option<u64>,
) -> Result<Option<std::num::NonZeroU32>, ConfigError> {
    value
        .map(|v| {
            u32::try_from(v)
                .ok()
                .and_then(std::num::NonZeroU32::new)
                .ok_or_else(|| ConfigError::Invalid {
                    key,
                    value: v.to_string(),
                    reason: "requests per second: at least 1".to_owned(),
                })
        })
        .transpose()
}

/// Whether `name` may name Ferry's schema: a lower-case Postgres identifier that needs no
/// quoting (it is written into `search_path` and into SQL), and not one of Postgres's own.
pub fn is_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
        && !name.starts_with("pg_")
        && name != "information_schema"
}

/// Kafka settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` bootstrap servers.
    pub brokers: String,
    /// The outbox topic.
    pub topic: String,
    /// The consumer group.
    pub group_id: String,
    /// Extra librdkafka properties (security, timeouts), applied to every client.
    pub properties: BTreeMap<String, String>,
}

/// A configuration that cannot be used, with the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("config file {path} is invalid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: Box<toml::de::Error>,
    },
    /// A required setting is absent.
    #[error("{setting} is not set (config key `{key}` or environment {env})")]
    Missing {
        /// Human name.
        setting: &'static str,
        /// File key.
        key: &'static str,
        /// Environment variable.
        env: &'static str,
    },
    /// A setting has a value that cannot work. The value is shown with any secret in it
    /// redacted ([`redacted`]).
    #[error("{key} = {shown:?} is invalid: {reason}", shown = redacted(key, value))]
    Invalid {
        /// File key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
}

impl Config {
    /// The Kafka settings, for a command that talks to Kafka: an error naming the setting when
    /// no broker is configured (the others need none).
    pub fn require_kafka(&self) -> Result<&KafkaConfig, ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::Missing {
                setting: "the Kafka bootstrap servers",
                key: "kafka.brokers",
                env: "FERRY_KAFKA_BROKERS",
            });
        }
        Ok(&self.kafka)
    }

    /// Loads from `path` (if any) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(path, |name| std::env::var(name).ok())
    }

    /// Loads from `path` (if any) and the given environment lookup (tests pass a map).
    pub fn load_with(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let file = match path {
            None => layers::FileConfig::default(),
            Some(path) => layers::FileConfig::read(path)?,
        };
        let layers = layers::Layers::new(&env);
        let config = Config {
            database: layers.database(file.database)?,
            kafka: layers.kafka(file.kafka)?,
            relay: layers.relay(file.relay)?,
            partner: layers.partner(file.partner)?,
            consume: layers.consume(file.consume)?,
            admin: layers.admin(file.admin)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// The checks no single value's parse makes: ranges, shapes, and settings against each
    /// other, a section at a time.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_database()?;
        self.validate_kafka()?;
        self.validate_partner()?;
        self.validate_consume()?;
        self.validate_relay()
    }

    fn validate_database(&self) -> Result<(), ConfigError> {
        let url = &self.database.url;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "database.url",
                url,
                "expected a postgres:// or postgresql:// URL",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid(
                "database.max_connections",
                "0",
                "must be at least 1",
            ));
        }
        if !is_schema_name(&self.database.schema) {
            return Err(invalid(
                "database.schema",
                &self.database.schema,
                "expected a lower-case identifier (letters, digits, _; at most 63), not pg_*",
            ));
        }
        Ok(())
    }

    fn validate_partner(&self) -> Result<(), ConfigError> {
        if self.partner.max_response_bytes < 1024 {
            return Err(invalid(
                "partner.max_response_bytes",
                &self.partner.max_response_bytes.to_string(),
                "at least 1024: the partner's answers are JSON documents",
            ));
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        for broker in self
            .kafka
            .brokers
            .split(',')
            .filter(|_| !self.kafka.brokers.is_empty())
        {
            validate_broker(broker.trim())
                .map_err(|reason| invalid("kafka.brokers", &self.kafka.brokers, &reason))?;
        }
        validate_topic(&self.kafka.topic)
            .map_err(|reason| invalid("kafka.topic", &self.kafka.topic, &reason))?;
        validate_kafka_security(&self.kafka.properties)
            .map_err(|(key, value, reason)| invalid(key, &value, &reason))?;
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid(
                "kafka.group_id",
                &self.kafka.group_id,
                "must not be empty",
            ));
        }
        if let Some(url) = &self.partner.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "partner.url",
                url,
                "expected an http:// or https:// URL",
            ));
        }
        if self.partner.timeout.is_zero() {
            return Err(invalid("partner.timeout_ms", "0", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_consume(&self) -> Result<(), ConfigError> {
        let c = &self.consume;
        if c.max_in_flight == Some(0) {
            return Err(invalid("consume.max_in_flight", "0", "must be at least 1"));
        }
        if c.pause_after_attempts == Some(0) {
            return Err(invalid(
                "consume.pause_after_attempts",
                "0",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("consume.retry_base_ms", c.retry_base),
            ("consume.retry_max_ms", c.retry_max),
            ("consume.auto_resume_after_ms", c.auto_resume_after),
            ("consume.commit_interval_ms", c.commit_interval),
            ("consume.settle_interval_ms", c.settle_interval),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(invalid(key, "0", "must be at least 1"));
            }
        }
        if let Some(topic) = &c.dead_letter_topic {
            validate_topic(topic)
                .map_err(|reason| invalid("consume.dead_letter_topic", topic, &reason))?;
        }
        if let (Some(base), Some(max)) = (c.retry_base, c.retry_max)
            && base > max
        {
            return Err(invalid(
                "consume.retry_base_ms",
                &base.as_millis().to_string(),
                &format!("must not exceed consume.retry_max_ms ({})", max.as_millis()),
            ));
        }
        Ok(())
    }

    fn validate_relay(&self) -> Result<(), ConfigError> {
        let r = &self.relay;
        for (key, value) in [
            ("relay.slot", &r.slot),
            ("relay.publication", &r.publication),
            ("relay.table", &r.schema),
            ("relay.table", &r.table),
        ] {
            validate_identifier(value).map_err(|reason| invalid(key, value, &reason))?;
        }
        if r.topic_partitions < 1 {
            return Err(invalid(
                "relay.topic_partitions",
                &r.topic_partitions.to_string(),
                "must be at least 1",
            ));
        }
        if r.batch_changes == 0 {
            return Err(invalid("relay.batch_changes", "0", "must be at least 1"));
        }
        if r.max_message_bytes < 1024 {
            return Err(invalid(
                "relay.max_message_bytes",
                &r.max_message_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}

/// A setting's value `value` rejected for `reason`.
fn invalid(key: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

fn validate_broker(broker: &str) -> Result<(), String> {
    let (host, port) = broker
        .rsplit_once(':')
        .ok_or_else(|| format!("`{broker}` is not host:port"))?;
    if host.is_empty() {
        return Err(format!("`{broker}` has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{broker}` has no valid port")),
    }
}

/// A Postgres identifier Ferry creates or names: lower-case letters, digits and `_`, starting
/// with a letter or `_`, at most 63 bytes (so it never needs quoting and is never truncated).
pub fn validate_identifier(name: &str) -> Result<(), String> {
    let valid_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !valid_start
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err("expected 1 to 63 of a-z 0-9 _, not starting with a digit".to_owned());
    }
    Ok(())
}

/// Kafka's own rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 {
        return Err("a topic name has 1 to 249 characters".to_owned());
    }
    if topic == "." || topic == ".." {
        return Err("`.` and `..` are not topic names".to_owned());
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{c}` is not allowed in a topic name (only a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok(())
}

/// `value` as an error may show it: a token's or a password's not at all, a URL's password
/// replaced. Errors go to logs and terminals; secrets must not.
pub fn redacted(key: &str, value: &str) -> String {
    if value.is_empty() {
        return String::new();
    }
    if ["token", "password", "secret"]
        .iter()
        .any(|k| key.contains(k))
    {
        return "<redacted>".to_owned();
    }
    match reqwest::Url::parse(value) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("<redacted>"));
            url.to_string().replace("%3Credacted%3E", "<redacted>")
        }
        _ => value.to_owned(),
    }
}

/// The Kafka security settings of `[kafka.properties]`, checked before any client is made: a
/// protocol librdkafka knows, and for SASL a mechanism Ferry's build speaks with its
/// credentials. The error's value never holds a password.
fn validate_kafka_security(
    properties: &BTreeMap<String, String>,
) -> Result<(), (&'static str, String, String)> {
    let get = |name: &str| properties.get(name).map(|v| v.trim().to_owned());
    let protocol = get("security.protocol").unwrap_or_else(|| "plaintext".to_owned());
    let sasl = match protocol.to_ascii_lowercase().as_str() {
        "plaintext" | "ssl" => false,
        "sasl_plaintext" | "sasl_ssl" => true,
        _ => {
            return Err((
                "kafka.properties.security.protocol",
                protocol,
                "expected plaintext, ssl, sasl_plaintext or sasl_ssl".to_owned(),
            ));
        }
    };
    if !sasl {
        return Ok(());
    }
    let mechanism = get("sasl.mechanisms")
        .or_else(|| get("sasl.mechanism"))
        .unwrap_or_else(|| "GSSAPI".to_owned());
    match mechanism.to_ascii_uppercase().as_str() {
        "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {}
        "OAUTHBEARER" => return Ok(()),
        _ => {
            return Err((
                "kafka.properties.sasl.mechanisms",
                mechanism,
                "expected PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER (GSSAPI is not built in)"
                    .to_owned(),
            ));
        }
    }
    for (name, key) in [
        ("sasl.username", "kafka.properties.sasl.username"),
        ("sasl.password", "kafka.properties.sasl.password"),
    ] {
        if get(name).is_none_or(|v| v.is_empty()) {
            return Err((key, String::new(), format!("required by SASL {mechanism}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const BASE: &[(&str, &str)] = &[
        ("DATABASE_URL", "postgres://u@127.0.0.1:5432/db"),
        ("KAFKA_BROKERS", "127.0.0.1:9092"),
    ];

    #[test]
    fn defaults_and_fallback_variables() {
        let c = Config::load_with(None, env(BASE)).unwrap();
        assert_eq!(c.kafka.topic, DEFAULT_TOPIC);
        assert_eq!(c.kafka.group_id, DEFAULT_GROUP_ID);
        assert_eq!(c.database.max_connections, 10);
    }

    #[test]
    fn ferry_variables_win_over_the_file_and_generic_ones() {
        let dir = std::env::temp_dir().join(format!("ferry-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ferry.toml");
        std::fs::write(
            &path,
            "[database]\nurl = \"postgres://file/db\"\n[kafka]\nbrokers = \"file:1\"\ntopic = \"from.file\"\n[kafka.properties]\n\"socket.timeout.ms\" = \"5000\"\n",
        )
        .unwrap();
        let c = Config::load_with(Some(&path), env(&[("FERRY_KAFKA_TOPIC", "from.env")])).unwrap();
        assert_eq!(c.database.url, "postgres://file/db");
        assert_eq!(c.kafka.brokers, "file:1");
        assert_eq!(c.kafka.topic, "from.env");
        assert_eq!(c.kafka.properties["socket.timeout.ms"], "5000");
        let mut e = BASE.to_vec();
        e.push(("FERRY_DATABASE_URL", "postgres://ferry/db"));
        let c = Config::load_with(Some(&path), env(&e)).unwrap();
        assert_eq!(c.database.url, "postgres://ferry/db");
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        e.push((
            "FERRY_KAFKA_PROPERTIES",
            "socket.timeout.ms=7000, session.timeout.ms = 6000",
        ));
        let c = Config::load_with(Some(&path), env(&e)).unwrap();
        assert_eq!(
            c.kafka.properties["socket.timeout.ms"], "7000",
            "env over file"
        );
        assert_eq!(c.kafka.properties["session.timeout.ms"], "6000");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_settings_are_rejected_by_name() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("KAFKA_BROKERS", "h:1")], "database.url"),
            (
                &[("DATABASE_URL", "mysql://x/y"), ("KAFKA_BROKERS", "h:1")],
                "database.url",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "nohost"),
                ],
                "kafka.brokers",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:99999"),
                ],
                "kafka.brokers",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:1"),
                    ("FERRY_KAFKA_TOPIC", "a topic"),
                ],
                "kafka.topic",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:1"),
                    ("FERRY_DATABASE_MAX_CONNECTIONS", "many"),
                ],
                "database.max_connections",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:1"),
                    ("FERRY_RELAY_MODE", "poll"),
                ],
                "relay.mode",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:1"),
                    ("FERRY_DATABASE_MAX_CONNECTIONS", "0"),
                ],
                "database.max_connections",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:1"),
                    ("FERRY_KAFKA_PROPERTIES", "session.timeout.ms"),
                ],
                "kafka.properties",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:1"),
                    ("FERRY_PARTNER_URL", "partner.example:8081"),
                ],
                "partner.url",
            ),
            (
                &[
                    ("DATABASE_URL", "postgres://x/y"),
                    ("KAFKA_BROKERS", "h:1"),
                    ("FERRY_PARTNER_TIMEOUT_MS", "0"),
                ],
                "partner.timeout_ms",
            ),
        ];
        for (vars, key) in cases {
            let err = Config::load_with(None, env(vars)).unwrap_err();
            assert!(err.to_string().contains(key), "{vars:?}: {err}");
        }
    }

    #[test]
    fn consume_settings_override_only_what_is_given_and_are_checked() {
        let c = Config::load_with(None, env(BASE)).unwrap();
        assert_eq!(c.consume, ConsumeConfig::default());
        let mut e = BASE.to_vec();
        e.extend([
            ("FERRY_CONSUME_MAX_IN_FLIGHT", "64"),
            ("FERRY_CONSUME_PAUSE_AFTER_ATTEMPTS", "3"),
            ("FERRY_CONSUME_AUTO_RESUME_AFTER_MS", "5000"),
            ("FERRY_CONSUME_COMMIT_INTERVAL_MS", "250ms"),
            ("FERRY_CONSUME_SETTLE_INTERVAL_MS", "50"),
            ("FERRY_CONSUME_MAPPING_VIEWS", "0"),
        ]);
        let c = Config::load_with(None, env(&e)).unwrap();
        assert_eq!(c.consume.max_in_flight, Some(64));
        assert_eq!(c.consume.pause_after_attempts, Some(3));
        assert_eq!(c.consume.auto_resume_after, Some(Duration::from_secs(5)));
        assert_eq!(c.consume.commit_interval, Some(Duration::from_millis(250)));
        assert_eq!(c.consume.settle_interval, Some(Duration::from_millis(50)));
        assert_eq!(c.consume.mapping_views, Some(0));
        assert_eq!(c.consume.retry_base, None);
        assert_eq!(c.consume.unknown_event_types, UnknownEventTypes::Pause);
        let mut e = BASE.to_vec();
        e.push(("FERRY_CONSUME_UNKNOWN_EVENT_TYPES", "ignore"));
        let c = Config::load_with(None, env(&e)).unwrap();
        assert_eq!(c.consume.unknown_event_types, UnknownEventTypes::Ignore);
        for (var, value, key) in [
            ("FERRY_CONSUME_MAX_IN_FLIGHT", "0", "consume.max_in_flight"),
            (
                "FERRY_CONSUME_PAUSE_AFTER_ATTEMPTS",
                "0",
                "consume.pause_after_attempts",
            ),
            (
                "FERRY_CONSUME_RETRY_BASE_MS",
                "soon",
                "consume.retry_base_ms",
            ),
            (
                "FERRY_CONSUME_AUTO_RESUME_AFTER_MS",
                "0",
                "consume.auto_resume_after_ms",
            ),
            (
                "FERRY_CONSUME_COMMIT_INTERVAL_MS",
                "0",
                "consume.commit_interval_ms",
            ),
            (
                "FERRY_CONSUME_SETTLE_INTERVAL_MS",
                "0",
                "consume.settle_interval_ms",
            ),
            (
                "FERRY_CONSUME_UNKNOWN_EVENT_TYPES",
                "skip",
                "consume.unknown_event_types",
            ),
            (
                "FERRY_CONSUME_MAPPING_VIEWS",
                "lots",
                "consume.mapping_views",
            ),
        ] {
            let mut e = BASE.to_vec();
            e.push((var, value));
            let err = Config::load_with(None, env(&e)).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
        let mut e = BASE.to_vec();
        e.extend([
            ("FERRY_CONSUME_RETRY_BASE_MS", "5000"),
            ("FERRY_CONSUME_RETRY_MAX_MS", "100"),
        ]);
        let err = Config::load_with(None, env(&e)).unwrap_err();
        assert!(
            err.to_string()
                .contains("must not exceed consume.retry_max_ms"),
            "{err}"
        );
    }

    /// Inputs tried: the default, an environment override, and names that would need quoting,
    /// are Postgres's own, or are empty.
    #[test]
    fn ferrys_schema_is_a_plain_identifier() {
        let c = Config::load_with(None, env(BASE)).unwrap();
        assert_eq!(c.database.schema, "ferry");
        let mut e = BASE.to_vec();
        e.push(("FERRY_DATABASE_SCHEMA", "ferry_prod_2"));
        assert_eq!(
            Config::load_with(None, env(&e)).unwrap().database.schema,
            "ferry_prod_2"
        );
        for bad in [
            "Ferry",
            "ferry; drop table x",
            "2ferry",
            "pg_catalog",
            "a-b",
            " ",
        ] {
            let mut e = BASE.to_vec();
            e.push(("FERRY_DATABASE_SCHEMA", bad));
            match Config::load_with(None, env(&e)) {
                Err(err) => assert!(err.to_string().contains("database.schema"), "{bad}: {err}"),
                // Blank counts as unset.
                Ok(c) => assert!(bad.trim().is_empty() && c.database.schema == "ferry"),
            }
        }
    }

    #[test]
    fn the_admin_api_settings_are_read() {
        let c = Config::load_with(None, env(BASE)).unwrap();
        assert!(c.admin.addr.ip().is_loopback() && c.admin.token.is_none());
        let mut e = BASE.to_vec();
        e.push(("FERRY_ADMIN_ADDR", "0.0.0.0:9190"));
        e.push(("FERRY_ADMIN_TOKEN", "s3cret"));
        e.push(("FERRY_ADMIN_HOSTS", "ferry.svc:9190, ferry:9190"));
        let c = Config::load_with(None, env(&e)).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(c.admin.hosts, ["ferry.svc:9190", "ferry:9190"]);
        let mut e = BASE.to_vec();
        e.push(("FERRY_ADMIN_ADDR", "localhost"));
        let err = Config::load_with(None, env(&e)).unwrap_err();
        assert!(err.to_string().contains("admin.addr"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("ferry-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ferry.toml");
        std::fs::write(&path, "[kafka]\nbroker = \"typo:1\"\n").unwrap();
        let err = Config::load_with(Some(&path), env(BASE)).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("broker"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn kafka_security_settings_are_checked_without_echoing_a_password() {
        let props = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        // Accepted: none, TLS alone, SASL/SCRAM over TLS with credentials.
        for ok in [
            props(&[]),
            props(&[
                ("security.protocol", "SSL"),
                ("ssl.ca.location", "/etc/ca.pem"),
            ]),
            props(&[
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("sasl.username", "ferry"),
                ("sasl.password", "s3cret"),
            ]),
        ] {
            assert_eq!(validate_kafka_security(&ok), Ok(()), "{ok:?}");
        }
        // (what was tried, the key the error names)
        let cases = [
            (
                props(&[("security.protocol", "tls")]),
                "kafka.properties.security.protocol",
            ),
            (
                props(&[
                    ("security.protocol", "sasl_ssl"),
                    ("sasl.username", "u"),
                    ("sasl.password", "s3cret"),
                ]),
                "kafka.properties.sasl.mechanisms",
            ),
            (
                props(&[
                    ("security.protocol", "sasl_ssl"),
                    ("sasl.mechanisms", "PLAIN"),
                    ("sasl.password", "s3cret"),
                ]),
                "kafka.properties.sasl.username",
            ),
            (
                props(&[
                    ("security.protocol", "sasl_ssl"),
                    ("sasl.mechanisms", "SCRAM-SHA-256"),
                    ("sasl.username", "u"),
                ]),
                "kafka.properties.sasl.password",
            ),
        ];
        for (tried, key) in cases {
            let (got, value, reason) = validate_kafka_security(&tried).unwrap_err();
            assert_eq!(got, key, "{tried:?}");
            assert!(
                !value.contains("s3cret") && !reason.contains("s3cret"),
                "{reason}"
            );
        }
    }

    #[test]
    fn the_example_file_loads_and_holds_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ferry.example.toml");
        let c = Config::load_with(Some(&path), |_| None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.relay, RelayConfig::default());
        assert_eq!(c.kafka.topic, DEFAULT_TOPIC);
        assert_eq!(c.kafka.group_id, DEFAULT_GROUP_ID);
        let defaults = DatabaseConfig::new("postgres://ferry@db/shop");
        assert_eq!(c.database.max_connections, defaults.max_connections);
        assert_eq!(c.database.schema, defaults.schema);
        let partner = PartnerConfig::default();
        assert_eq!(
            (c.partner.timeout, c.partner.max_response_bytes),
            (partner.timeout, partner.max_response_bytes)
        );
        assert_eq!(c.admin.addr, AdminConfig::default().addr);
        assert_eq!(c.consume.unknown_event_types, UnknownEventTypes::Pause);
    }

    #[test]
    fn an_error_never_shows_a_password_or_a_token() {
        // Inputs tried: a database URL with a password and a bad pool size, and a token.
        let err = Config::load_with(None, |name| match name {
            "DATABASE_URL" => Some("mysql://ferry:hunter2@db/shop".to_owned()),
            "KAFKA_BROKERS" => Some("127.0.0.1:9092".to_owned()),
            _ => None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            !err.contains("hunter2") && err.contains("<redacted>"),
            "{err}"
        );
        assert_eq!(redacted("admin.token", "s3cret"), "<redacted>");
        assert_eq!(redacted("kafka.topic", "ferry.outbox"), "ferry.outbox");
    }

    #[test]
    fn only_the_commands_that_talk_to_kafka_need_a_broker() {
        // Input tried: a database and no broker, as `ferry migrate` would run.
        let c = Config::load_with(None, |name| {
            (name == "DATABASE_URL").then(|| "postgres://x/y".to_owned())
        })
        .expect("no broker needed to load");
        let err = c.require_kafka().unwrap_err().to_string();
        assert!(err.contains("kafka.brokers"), "{err}");
    }

    #[test]
    fn durations_are_written_with_their_unit_or_as_milliseconds() {
        let dir = std::env::temp_dir().join(format!("ferry-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ferry.toml");
        std::fs::write(
            &path,
            "[partner]\ntimeout_ms = \"30s\"\n[consume]\nretry_base_ms = 250\nretry_max_ms = \"1m 30s\"\n",
        )
        .unwrap();
        let mut e = BASE.to_vec();
        e.push(("FERRY_RELAY_POLL_INTERVAL_MS", "150ms"));
        let c = Config::load_with(Some(&path), env(&e)).unwrap();
        assert_eq!(c.partner.timeout, Duration::from_secs(30));
        assert_eq!(c.consume.retry_base, Some(Duration::from_millis(250)));
        assert_eq!(c.consume.retry_max, Some(Duration::from_secs(90)));
        assert_eq!(c.relay.poll_interval, Duration::from_millis(150));
        // Input tried: a duration without a number.
        e.push(("FERRY_PARTNER_TIMEOUT_MS", "soon"));
        let err = Config::load_with(Some(&path), env(&e))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("partner.timeout_ms") && err.contains("like 30s"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
