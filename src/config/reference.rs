//! Every setting, once: its file key, its environment variables, what it does and its default.
//! The documentation's table is generated from [`SETTINGS`] (`ferry config reference`; a test
//! checks `docs/configuration.md` holds it), and `ferry config check` reads it to print the
//! effective configuration with where each value came from, secrets redacted.

use std::path::Path;

use super::{Config, redacted};

/// One setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Its key in the file (`partner.timeout_ms`).
    pub key: &'static str,
    /// Its environment variables, the first set one winning.
    pub env: &'static [&'static str],
    /// What it does.
    pub what: &'static str,
    /// Its default, as a person reads it.
    pub default: &'static str,
}

const fn s(
    key: &'static str,
    env: &'static [&'static str],
    what: &'static str,
    default: &'static str,
) -> Setting {
    Setting {
        key,
        env,
        what,
        default,
    }
}

/// Every setting Ferry reads.
pub const SETTINGS: &[Setting] = &[
    s(
        "database.url",
        &["FERRY_DATABASE_URL", "DATABASE_URL"],
        "Postgres URL (`sslmode`, `sslrootcert` as libpq)",
        "required",
    ),
    s(
        "database.max_connections",
        &["FERRY_DATABASE_MAX_CONNECTIONS"],
        "pool size",
        "10",
    ),
    s(
        "database.schema",
        &["FERRY_DATABASE_SCHEMA"],
        "Ferry's own Postgres schema",
        "`ferry`",
    ),
    s(
        "kafka.brokers",
        &["FERRY_KAFKA_BROKERS", "KAFKA_BROKERS"],
        "Kafka bootstrap servers",
        "required by `relay`, `consume`, `smoke`",
    ),
    s(
        "kafka.topic",
        &["FERRY_KAFKA_TOPIC"],
        "outbox topic",
        "`ferry.outbox`",
    ),
    s(
        "kafka.group_id",
        &["FERRY_KAFKA_GROUP_ID"],
        "consumer group",
        "`ferry`",
    ),
    s(
        "kafka.properties",
        &["FERRY_KAFKA_PROPERTIES"],
        "librdkafka properties for every client (`security.*`, `ssl.*`, `sasl.*`, ...); the environment's `name=value,...` over the file's table",
        "none",
    ),
    s(
        "relay.slot",
        &["FERRY_RELAY_SLOT"],
        "replication slot",
        "`ferry_outbox`",
    ),
    s(
        "relay.publication",
        &["FERRY_RELAY_PUBLICATION"],
        "publication (inserts only)",
        "`ferry_outbox`",
    ),
    s(
        "relay.table",
        &["FERRY_RELAY_TABLE"],
        "the outbox table",
        "`public.outbox`",
    ),
    s(
        "relay.mode",
        &["FERRY_RELAY_MODE"],
        "`stream` (replication protocol) or `peek` (SQL, polled)",
        "`stream`",
    ),
    s(
        "relay.batch_changes",
        &["FERRY_RELAY_BATCH_CHANGES"],
        "peek mode: changes decoded per batch",
        "300000",
    ),
    s(
        "relay.poll_interval_ms",
        &["FERRY_RELAY_POLL_INTERVAL_MS"],
        "peek mode: wait after an idle peek",
        "`20ms`",
    ),
    s(
        "relay.max_message_bytes",
        &["FERRY_RELAY_MAX_MESSAGE_BYTES"],
        "larger records become rejection markers",
        "1000000",
    ),
    s(
        "relay.topic_partitions",
        &["FERRY_RELAY_TOPIC_PARTITIONS"],
        "partitions of the topic if the relay creates it",
        "12",
    ),
    s(
        "partner.url",
        &["FERRY_PARTNER_URL"],
        "the partner's base URL",
        "required by `consume`, `verify`",
    ),
    s(
        "partner.token",
        &["FERRY_PARTNER_TOKEN"],
        "the partner's bearer token (secret)",
        "empty",
    ),
    s(
        "partner.timeout_ms",
        &["FERRY_PARTNER_TIMEOUT_MS"],
        "one partner request's limit",
        "`10s`",
    ),
    s(
        "partner.rate_limit",
        &["FERRY_PARTNER_RATE_LIMIT"],
        "requests per second to the partner, all tenants",
        "unlimited",
    ),
    s(
        "partner.tenant_rate_limit",
        &["FERRY_PARTNER_TENANT_RATE_LIMIT"],
        "requests per second to the partner, per tenant",
        "unlimited",
    ),
    s(
        "partner.max_response_bytes",
        &["FERRY_PARTNER_MAX_RESPONSE_BYTES"],
        "largest partner answer read",
        "1048576",
    ),
    s(
        "consume.max_in_flight",
        &["FERRY_CONSUME_MAX_IN_FLIGHT"],
        "events in flight, all tenants",
        "256",
    ),
    s(
        "consume.mapping_views",
        &["FERRY_CONSUME_MAPPING_VIEWS"],
        "mappings held in memory, all tenants together, so events start without a query; 0: none",
        "100000",
    ),
    s(
        "consume.retry_base_ms",
        &["FERRY_CONSUME_RETRY_BASE_MS"],
        "first retry's backoff",
        "`200ms`",
    ),
    s(
        "consume.retry_max_ms",
        &["FERRY_CONSUME_RETRY_MAX_MS"],
        "longest backoff",
        "`30s`",
    ),
    s(
        "consume.pause_after_attempts",
        &["FERRY_CONSUME_PAUSE_AFTER_ATTEMPTS"],
        "pause a tenant after this many attempts at one event",
        "8",
    ),
    s(
        "consume.pause_after_ms",
        &["FERRY_CONSUME_PAUSE_AFTER_MS"],
        "...or after failing this long",
        "`2m`",
    ),
    s(
        "consume.retry_after_max_ms",
        &["FERRY_CONSUME_RETRY_AFTER_MAX_MS"],
        "longest `Retry-After` honoured",
        "`1m`",
    ),
    s(
        "consume.auto_resume_after_ms",
        &["FERRY_CONSUME_AUTO_RESUME_AFTER_MS"],
        "resume a tenant paused for a retryable cause after",
        "`1m`",
    ),
    s(
        "consume.commit_interval_ms",
        &["FERRY_CONSUME_COMMIT_INTERVAL_MS"],
        "commit the offsets that moved to the broker this often (a revoke and a shutdown commit at once)",
        "`1s`",
    ),
    s(
        "consume.settle_interval_ms",
        &["FERRY_CONSUME_SETTLE_INTERVAL_MS"],
        "how long a settled event waits for its batch of dedupe records: longer makes fewer, larger batches (less database work per event at a steady rate) and moves the commit point later",
        "`10ms`",
    ),
    s(
        "consume.unknown_event_types",
        &["FERRY_CONSUME_UNKNOWN_EVENT_TYPES"],
        "an event of a type the integration does not know: `pause` its tenant or `ignore` it",
        "`pause`",
    ),
    s(
        "consume.integration",
        &["FERRY_CONSUME_INTEGRATION"],
        "the integration file `ferry consume` runs (docs/integrations.md)",
        "the built-in shop integration",
    ),
    s(
        "consume.dead_letter_topic",
        &["FERRY_CONSUME_DEAD_LETTER_TOPIC"],
        "the terminal policy: set, an event an operator skips is exported with its attempts to this topic (`ferry dead-letters copy-back` writes it back); unset, skipped with an audit row",
        "unset: skip",
    ),
    s(
        "admin.addr",
        &["FERRY_ADMIN_ADDR"],
        "admin API address",
        "`127.0.0.1:9190`",
    ),
    s(
        "admin.token",
        &["FERRY_ADMIN_TOKEN"],
        "admin API bearer token (secret)",
        "generated at the first start, printed once",
    ),
    s(
        "admin.hosts",
        &["FERRY_ADMIN_HOSTS"],
        "`Host` names the admin API answers to besides its address (comma-separated)",
        "none",
    ),
];

/// The settings as a Markdown table: what `docs/configuration.md` holds.
pub fn markdown() -> String {
    let mut out = String::from("| file key | environment | what | default |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let env: Vec<String> = s.env.iter().map(|v| format!("`{v}`")).collect();
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            s.key,
            env.join(", else "),
            s.what,
            s.default
        ));
    }
    out
}

/// Where a setting's value came from.
fn source(
    setting: &Setting,
    file: Option<&toml::Table>,
    env: &dyn Fn(&str) -> Option<String>,
) -> String {
    if let Some((var, _)) = super::layers::first_set(env, setting.env) {
        return format!("environment {var}");
    }
    let (section, name) = setting.key.split_once('.').unwrap_or(("", setting.key));
    let in_file = file
        .and_then(|t| t.get(section))
        .and_then(toml::Value::as_table)
        .is_some_and(|s| s.contains_key(name));
    if in_file {
        "file".into()
    } else {
        "default".into()
    }
}

/// The effective configuration, a line per setting: key, value (secrets redacted), source.
pub fn effective(
    config: &Config,
    path: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> Vec<(&'static str, String, String)> {
    let file: Option<toml::Table> = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.parse().ok());
    SETTINGS
        .iter()
        .map(|s| {
            let value = value_of(config, s.key);
            (
                s.key,
                redacted(s.key, &value),
                source(s, file.as_ref(), &env),
            )
        })
        .collect()
}

/// The value `config` holds for `key`, as text.
fn value_of(c: &Config, key: &str) -> String {
    let duration = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let opt = |d: Option<std::time::Duration>| d.map_or_else(|| "(default)".into(), duration);
    match key {
        "database.url" => c.database.url.clone(),
        "database.max_connections" => c.database.max_connections.to_string(),
        "database.schema" => c.database.schema.clone(),
        "kafka.brokers" => c.kafka.brokers.clone(),
        "kafka.topic" => c.kafka.topic.clone(),
        "kafka.group_id" => c.kafka.group_id.clone(),
        "kafka.properties" => c
            .kafka
            .properties
            .iter()
            .map(|(k, v)| format!("{k}={}", redacted(k, v)))
            .collect::<Vec<_>>()
            .join(","),
        "relay.slot" => c.relay.slot.clone(),
        "relay.publication" => c.relay.publication.clone(),
        "relay.table" => format!("{}.{}", c.relay.schema, c.relay.table),
        "relay.mode" => format!("{:?}", c.relay.mode).to_lowercase(),
        "relay.batch_changes" => c.relay.batch_changes.to_string(),
        "relay.poll_interval_ms" => duration(c.relay.poll_interval),
        "relay.max_message_bytes" => c.relay.max_message_bytes.to_string(),
        "relay.topic_partitions" => c.relay.topic_partitions.to_string(),
        "partner.url" => c.partner.url.clone().unwrap_or_default(),
        "partner.token" => c.partner.token.clone(),
        "partner.timeout_ms" => duration(c.partner.timeout),
        "partner.rate_limit" => c
            .partner
            .rate_limit
            .map_or("unlimited".into(), |n| n.to_string()),
        "partner.tenant_rate_limit" => c
            .partner
            .tenant_rate_limit
            .map_or("unlimited".into(), |n| n.to_string()),
        "partner.max_response_bytes" => c.partner.max_response_bytes.to_string(),
        "consume.max_in_flight" => c
            .consume
            .max_in_flight
            .map_or("(default)".into(), |n| n.to_string()),
        "consume.mapping_views" => c
            .consume
            .mapping_views
            .map_or("(default)".into(), |n| n.to_string()),
        "consume.retry_base_ms" => opt(c.consume.retry_base),
        "consume.retry_max_ms" => opt(c.consume.retry_max),
        "consume.pause_after_attempts" => c
            .consume
            .pause_after_attempts
            .map_or("(default)".into(), |n| n.to_string()),
        "consume.pause_after_ms" => opt(c.consume.pause_after),
        "consume.retry_after_max_ms" => opt(c.consume.retry_after_max),
        "consume.auto_resume_after_ms" => opt(c.consume.auto_resume_after),
        "consume.commit_interval_ms" => opt(c.consume.commit_interval),
        "consume.settle_interval_ms" => opt(c.consume.settle_interval),
        "consume.unknown_event_types" => {
            format!("{:?}", c.consume.unknown_event_types).to_lowercase()
        }
        "consume.integration" => c
            .consume
            .integration
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string()),
        "consume.dead_letter_topic" => c.consume.dead_letter_topic.clone().unwrap_or_default(),
        "admin.addr" => c.admin.addr.to_string(),
        "admin.token" => c.admin.token.clone().unwrap_or_default(),
        "admin.hosts" => c.admin.hosts.join(","),
        other => format!("(unknown setting {other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documentation_holds_the_generated_reference() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
        )
        .unwrap();
        assert!(
            doc.contains(&markdown()),
            "docs/configuration.md is not the code's reference: paste `ferry config reference` into it"
        );
    }

    #[test]
    fn every_setting_has_a_value_and_a_source_and_secrets_are_redacted() {
        let env = |name: &str| match name {
            "DATABASE_URL" => Some("postgres://ferry:hunter2@db/shop".to_owned()),
            "FERRY_PARTNER_TOKEN" => Some("p-secret".to_owned()),
            "FERRY_KAFKA_PROPERTIES" => {
                Some("sasl.password=k-secret,sasl.username=ferry".to_owned())
            }
            _ => None,
        };
        let config = Config::load_with(None, env).unwrap();
        let lines = effective(&config, None, env);
        assert_eq!(lines.len(), SETTINGS.len());
        let text = format!("{lines:?}");
        for secret in ["hunter2", "p-secret", "k-secret"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        let of = |key: &str| lines.iter().find(|l| l.0 == key).cloned().unwrap();
        assert_eq!(of("database.url").2, "environment DATABASE_URL");
        assert_eq!(
            of("kafka.topic"),
            ("kafka.topic", "ferry.outbox".into(), "default".into())
        );
        assert!(of("kafka.properties").1.contains("sasl.username=ferry"));
        assert!(!lines.iter().any(|l| l.1.starts_with("(unknown setting")));
    }
}
