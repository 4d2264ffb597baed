//! The `ferry` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use ferry::config::Config;

/// jemalloc rather than the system's allocator. A consumer's record is allocated on the poll
/// thread and freed on a runtime worker; glibc's per-thread arenas give such frees back
/// through a lock and periodic consolidation, which took a third of the consumer's CPU in the
/// overhead benchmark. jemalloc (as Vector and Quickwit run) rather than mimalloc: both cut
/// that cost, but mimalloc's peak RSS with 100,000 events parked was 141 MB against glibc's
/// 85 and jemalloc's 87 (docs/measurements.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Ferry keeps a partner platform in sync with ours through the transactional outbox.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about,
    after_help = "The commands that run in production come first; the development tools \
(smoke, load, partner-sim, bench) after them. Docs: README.md and docs/."
)]
struct Cli {
    /// A TOML config file; `FERRY_*` environment variables override it.
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// How read commands print (`tenant status`, `relay status`, `config check`, `verify`):
    /// tables for a person, or JSON for a script.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How a read command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Tables and lines for a person.
    Text,
    /// One JSON document.
    Json,
}

/// Prints `value` as one JSON document.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations (idempotent).
    #[command(display_order = 1)]
    Migrate,
    /// Development: prove the stack works: migrate, then send one event through Kafka and back.
    #[command(display_order = 20)]
    Smoke {
        /// How long to wait for the event to come back.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stream the outbox from the write-ahead log to Kafka until SIGTERM/SIGINT; `ferry relay
    /// status` prints the slot's position and lag instead.
    #[command(display_order = 2)]
    Relay {
        /// `status`: the slot's position and lag.
        #[command(subcommand)]
        action: Option<RelayAction>,
        /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9187.
        #[arg(long, env = "FERRY_RELAY_METRICS_ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// The same as `ferry relay status` (kept for scripts).
    #[command(hide = true)]
    #[command(display_order = 3)]
    RelayStatus,
    /// Deliver the outbox topic to the partner, each tenant in order, until SIGTERM/SIGINT.
    #[command(display_order = 4)]
    Consume,
    /// The configuration: `check` validates it and prints every setting's effective value and
    /// where it came from (secrets redacted); `reference` prints every setting Ferry reads.
    #[command(display_order = 8)]
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Check an integration file (`consume.integration`): validate it as `ferry consume`
    /// would and print what each event type does; non-zero exit, naming the key, if invalid.
    #[command(display_order = 9)]
    CheckIntegration {
        /// The file (TOML).
        file: std::path::PathBuf,
    },
    /// Development: play the partner's REST API (for tests and the demo) until SIGTERM/SIGINT.
    #[command(display_order = 22)]
    PartnerSim {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8081", env = "FERRY_PARTNER_SIM_ADDR")]
        addr: std::net::SocketAddr,
        /// The bearer token it accepts.
        #[arg(long, env = "FERRY_PARTNER_TOKEN", default_value = "sim-token")]
        token: String,
    },
    /// Compare our products with the partner's state per tenant; non-zero exit on drift or
    /// duplicate objects.
    #[command(display_order = 7)]
    Verify {
        /// Tenants to check besides those with products (e.g. ones whose products were all
        /// deleted).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// The partner is Ferry's simulator: also report the order violations it saw.
        #[arg(long)]
        simulator: bool,
        /// Latency of the events written since then only (RFC 3339, or seconds since the epoch).
        #[arg(long, value_parser = parse_time)]
        latency_since: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Switch tenants' partner integration on (backfilling their products) or off (deleting
    /// what Ferry created on the partner), or show where they stand.
    #[command(display_order = 5)]
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
    /// The events operators gave up on, exported to the dead-letter topic
    /// (`consume.dead_letter_topic`): list them, or copy a tenant's back into its stream.
    #[command(display_order = 6)]
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Development: write products and their outbox events like our platform does.
    #[command(display_order = 21)]
    Load {
        /// Distinct tenants.
        #[arg(long, default_value_t = 100)]
        tenants: usize,
        /// Product changes (one transaction and one event each).
        #[arg(long, default_value_t = 10_000)]
        events: usize,
        /// Concurrent writers.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Tenant name prefix.
        #[arg(long, default_value = "tenant-")]
        tenant_prefix: String,
        /// Seed of the change mix.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Changes per second in all, at most (as fast as it can when not given).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Development: benchmarks, printed as tables with the ratio to their baseline.
    #[command(display_order = 23)]
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// Operate a running `ferry consume` through its admin API: paused tenants and why,
    /// resume, retry, skip, pause, replay, the kill switch, partitions, failures, an event's
    /// history.
    #[command(display_order = 6)]
    Ctl(CtlArgs),
}

impl Command {
    /// The command as typed: the default service name of its traces is `ferry-<name>`.
    fn name(&self) -> &'static str {
        match self {
            Command::Migrate => "migrate",
            Command::Smoke { .. } => "smoke",
            Command::Relay { .. } => "relay",
            Command::RelayStatus => "relay-status",
            Command::Consume => "consume",
            Command::CheckIntegration { .. } => "check-integration",
            Command::Config { .. } => "config",
            Command::PartnerSim { .. } => "partner-sim",
            Command::Verify { .. } => "verify",
            Command::Tenant { .. } => "tenant",
            Command::DeadLetters { .. } => "dead-letters",
            Command::Load { .. } => "load",
            Command::Bench { .. } => "bench",
            Command::Ctl(_) => "ctl",
        }
    }
}

/// `ferry ctl`: its options go before or after its command.
#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// The admin API of a `ferry consume`: its `admin.addr`, as a URL or as host:port.
    #[arg(long, global = true, env = "FERRY_ADMIN_URL", default_value = ferry::ctl::DEFAULT_URL)]
    url: String,
    /// The admin API's bearer token (its `admin.token`).
    #[arg(long, global = true, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON answer instead of a table, for scripts.
    #[arg(long, global = true)]
    json: bool,
    /// The integration whose tenants and events to read and act on [default: the consumer's
    /// own; `tenants` and `failures` list every one]. Any consumer sharing the database can
    /// act on any integration's tenants.
    #[arg(long, global = true, env = "FERRY_CTL_INTEGRATION", value_parser = parse_integration)]
    integration: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

fn parse_integration(name: &str) -> Result<String, String> {
    if ferry::delivery::is_integration_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not an integration's name (1 to 64 of a-z, 0-9, _ and -)"
        ))
    }
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// The tenants that are not active: state, cause, backlog, since when, next retry, reason.
    Tenants,
    /// One tenant in full, with the partner's answer to its failing event.
    Tenant {
        /// The tenant id.
        #[arg(value_parser = ferry::ctl::parse_tenant)]
        tenant: String,
    },
    /// Replay a paused tenant's backlog in order, then deliver live again.
    Resume(CtlTenant),
    /// Try a paused tenant's failing event again now.
    Retry(CtlTenant),
    /// Skip a paused tenant's failing event (recorded as skipped) and replay the rest.
    Skip(CtlTenant),
    /// Pause a tenant: its events are parked, in order, until it is resumed.
    Pause(CtlTenant),
    /// Deliver a tenant's events since a point in time again, in order.
    Replay {
        #[command(flatten)]
        action: CtlTenant,
        /// From when: an RFC 3339 time, e.g. 2026-11-28T16:00:00Z.
        #[arg(long, value_name = "TIME", value_parser = ferry::ctl::parse_since)]
        since: chrono::DateTime<chrono::Utc>,
    },
    /// Show the kill switch, or turn it on (no instance dispatches anything) or off.
    KillSwitch {
        #[command(subcommand)]
        set: Option<KillSwitchSet>,
    },
    /// Committed offset, high watermark, lag and events in flight per partition.
    Partitions,
    /// The latest events that failed, with the error and the partner's answer.
    Failures {
        /// At most this many, 1 to 1000 (the API's default, 50, when not given).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
    },
    /// An event's history: its delivery, every attempt, its parked record and the operator
    /// actions on it.
    Event {
        /// The event id (a UUID).
        #[arg(value_parser = ferry::ctl::parse_event_id)]
        event_id: uuid::Uuid,
    },
    /// A tenant's webhook endpoint (a webhooks integration; `--integration` names it unless
    /// the consumer at --url runs it): show, set, rotate its secret, remove.
    Webhook {
        #[command(subcommand)]
        action: WebhookAction,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterAction {
    /// The integration's dead letters: which event, where it is in the topic, who gave up on
    /// it and why, whether it was copied back.
    List {
        /// Only this tenant's.
        tenant: Option<String>,
    },
    /// Write the tenant's dead letters not copied yet back into its stream: each a new event
    /// in the outbox, addressed to this integration alone, in the order they were exported.
    CopyBack {
        /// The tenant id.
        #[arg(value_parser = ferry::ctl::parse_tenant)]
        tenant: String,
        #[command(flatten)]
        who: Who,
    },
}

#[derive(Debug, Subcommand)]
enum WebhookAction {
    /// The endpoint: URL, whether it is disabled and why, a secret being rotated out.
    Show {
        /// The tenant id.
        #[arg(value_parser = ferry::ctl::parse_tenant)]
        tenant: String,
    },
    /// Set the endpoint (enabled again if it was disabled; a tenant paused in the integration
    /// is resumed). Prints the secret: give it to the tenant.
    Set {
        /// The tenant id.
        #[arg(value_parser = ferry::ctl::parse_tenant)]
        tenant: String,
        /// Where its events go (http:// or https://). (`--url` is the admin API's.)
        #[arg(long)]
        endpoint: String,
        /// Its secret (`whsec_` and base64) [default: a new one].
        #[arg(long, env = "FERRY_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[command(flatten)]
        who: Who,
    },
    /// A new secret; the old one keeps signing for `--keep`. Prints the new secret.
    Rotate {
        /// The tenant id.
        #[arg(value_parser = ferry::ctl::parse_tenant)]
        tenant: String,
        /// How long the old secret keeps signing [default: 24h].
        #[arg(long)]
        keep: Option<String>,
        #[command(flatten)]
        who: Who,
    },
    /// Remove the endpoint: the tenant's events are recorded as ignored from then on.
    Remove(CtlTenant),
}

#[derive(Debug, Subcommand)]
enum KillSwitchSet {
    /// Stop dispatching on every instance.
    On(Who),
    /// Dispatch again.
    Off(Who),
}

/// An audited action on one tenant.
#[derive(Debug, clap::Args)]
struct CtlTenant {
    /// The tenant id.
    #[arg(value_parser = ferry::ctl::parse_tenant)]
    tenant: String,
    #[command(flatten)]
    who: Who,
}

/// Who does it and why: every operator action is audited.
#[derive(Debug, clap::Args)]
struct Who {
    /// Why (required: it goes into the audit record).
    #[arg(long, value_parser = ferry::ctl::parse_reason)]
    reason: String,
    /// Who, as recorded [default: $USER, else `ctl`].
    #[arg(long)]
    actor: Option<String>,
}

impl Who {
    fn action(self) -> ferry::ctl::Action {
        ferry::ctl::Action {
            actor: ferry::ctl::actor(self.actor, std::env::var("USER").ok()),
            reason: self.reason,
        }
    }
}

impl CtlCommand {
    fn into_op(self) -> ferry::ctl::Op {
        use ferry::ctl::Op;
        let on =
            |a: CtlTenant, op: fn(String, ferry::ctl::Action) -> Op| op(a.tenant, a.who.action());
        match self {
            CtlCommand::Tenants => Op::Tenants,
            CtlCommand::Tenant { tenant } => Op::Tenant(tenant),
            CtlCommand::Resume(a) => on(a, Op::Resume),
            CtlCommand::Retry(a) => on(a, Op::Retry),
            CtlCommand::Skip(a) => on(a, Op::Skip),
            CtlCommand::Pause(a) => on(a, Op::Pause),
            CtlCommand::Replay { action, since } => {
                Op::Replay(action.tenant, since, action.who.action())
            }
            CtlCommand::KillSwitch { set: None } => Op::KillSwitch,
            CtlCommand::KillSwitch {
                set: Some(KillSwitchSet::On(who)),
            } => Op::SetKillSwitch(true, who.action()),
            CtlCommand::KillSwitch {
                set: Some(KillSwitchSet::Off(who)),
            } => Op::SetKillSwitch(false, who.action()),
            CtlCommand::Partitions => Op::Partitions,
            CtlCommand::Failures { limit } => Op::Failures(limit),
            CtlCommand::Event { event_id } => Op::Event(event_id),
            CtlCommand::Webhook { action } => action.into_op(),
        }
    }
}

impl WebhookAction {
    fn into_op(self) -> ferry::ctl::Op {
        use ferry::ctl::{Op, WebhookSet};
        match self {
            WebhookAction::Show { tenant } => Op::Webhook(tenant),
            WebhookAction::Set {
                tenant,
                endpoint,
                secret,
                who,
            } => Op::SetWebhook(
                tenant,
                WebhookSet {
                    url: endpoint,
                    secret,
                },
                who.action(),
            ),
            WebhookAction::Rotate { tenant, keep, who } => {
                Op::RotateWebhook(tenant, keep, who.action())
            }
            WebhookAction::Remove(a) => Op::RemoveWebhook(a.tenant, a.who.action()),
        }
    }
}

/// `ferry ctl`: one call; the answer on stdout, or `error: ...` on stderr and exit 1 (2 for
/// bad input, as clap does for bad usage).
async fn ctl_command(args: CtlArgs) -> ExitCode {
    let op = args.command.into_op();
    let answer = match ferry::ctl::Client::new(&args.url, args.token) {
        Ok(client) => {
            let client = client.for_integration(args.integration);
            ferry::ctl::run(&client, &op, args.json, chrono::Utc::now()).await
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok(text) => {
            use std::io::Write as _;
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                // `ferry ctl failures | head` closes the pipe early: that is no failure.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("error: cannot write the answer: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// `ferry bench pipeline`'s options.
#[derive(Debug, clap::Args)]
struct PipelineArgs {
    /// Changes written per second.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// For how many seconds.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Distinct tenants.
    #[arg(long, default_value_t = 50)]
    tenants: usize,
    /// `ferry consume` instances.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Partitions of the run's topic.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// The integration file the consumers run.
    #[arg(long, default_value = "integrations/shop.toml")]
    integration: PathBuf,
    /// The `ferry` executable the pipeline's processes are started from (this one when not
    /// given): another build, to compare two side by side.
    #[arg(long)]
    children: Option<PathBuf>,
    /// Changes written and delivered before the measured window.
    #[arg(long, default_value_t = 500)]
    warm_up: usize,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The consumer: key-ordered parallelism against one-in-flight, overhead, isolation of a failing
    /// tenant, and memory while a paused tenant's events are parked.
    Consume {
        /// Events of the parallelism run.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Tenants.
        #[arg(long, default_value_t = 1_000)]
        tenants: usize,
        /// The handler's time per event (ms) in the parallelism run.
        #[arg(long, default_value_t = 10)]
        handler_ms: u64,
        /// Events of the overhead run.
        #[arg(long, default_value_t = 200_000)]
        overhead_events: usize,
        /// Events of each isolation run (100 tenants, one failing).
        #[arg(long, default_value_t = 20_000)]
        isolation_events: usize,
        /// Events parked for the paused tenant in the memory run.
        #[arg(long, default_value_t = 100_000)]
        parked_events: usize,
        /// `configured` (the stack's broker), `memory` (a tansu with in-memory storage started
        /// for the run) or `mock` (librdkafka's in-process mock cluster): the last two keep the
        /// broker's storage from being the bottleneck.
        #[arg(long, default_value = "configured", value_parser = ["configured", "memory", "mock"])]
        broker: String,
    },
    /// The memory scenario of `bench consume`, started by it as a process of its own: consumes
    /// a filled topic until the paused tenant's events are parked, prints its peak RSS.
    #[command(hide = true)]
    ConsumeParked {
        /// The filled topic.
        #[arg(long)]
        topic: String,
        /// Events to park.
        #[arg(long)]
        parked_events: usize,
    },
    /// The WAL relay against a naive polling relay under concurrent writers.
    Relay {
        /// Outbox rows per relay.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Distinct tenants.
        #[arg(long, default_value_t = 1_000)]
        tenants: usize,
        /// Concurrent writers.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Partitions of each relay's topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// `configured` (the stack's broker) or `mock` (librdkafka's in-process mock cluster,
        /// where the broker's storage is not the bottleneck). Not `memory`: the in-memory tansu
        /// reports wrong watermarks, and reading the topic back loses rows on it.
        #[arg(long, default_value = "configured", value_parser = ["configured", "mock"])]
        broker: String,
    },
    /// The demo's whole pipeline at a steady rate (relay, consumers, the partner simulator,
    /// `ferry load`): CPU per process per 1,000 events, Postgres's time split by who caused
    /// it, and commit-to-partner latency against a reader that does nothing else.
    Pipeline(PipelineArgs),
    /// Commit-to-reader latency of the outbox at a steady write rate: the relay streaming
    /// the slot against the same relay peeking it.
    RelayLatency {
        /// Changes written per second.
        #[arg(long, default_value_t = 1_000.0)]
        rate: f64,
        /// For how many seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Distinct tenants.
        #[arg(long, default_value_t = 50)]
        tenants: usize,
        /// Partitions of each mode's topic.
        #[arg(long, default_value_t = 12)]
        partitions: i32,
        /// `configured` (the stack's broker) or `mock` (librdkafka's in-process mock cluster,
        /// where the broker's storage is not the bottleneck). Not `memory`: the in-memory tansu
        /// reports wrong watermarks, and reading the topic back loses rows on it.
        #[arg(long, default_value = "configured", value_parser = ["configured", "mock"])]
        broker: String,
    },
}

#[derive(Debug, Subcommand)]
enum RelayAction {
    /// Print the relay slot's position and lag (creating the slot and publication if missing).
    Status,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate the configuration and print each setting's value and source.
    Check,
    /// Print every setting as a Markdown table (what docs/configuration.md holds).
    Reference,
}

#[derive(Debug, Subcommand)]
enum TenantAction {
    /// Switch the integration on and backfill: a create for every existing product, written
    /// through the outbox so it is ordered with live changes. Waits until the partner has them.
    Enable(Switch),
    /// Switch the integration off: the tenant's events are ignored from now on, and every
    /// object Ferry created for it on the partner is deleted. Waits until that is done.
    Disable(Switch),
    /// Show tenants: integration on or off, state, pause reason, mapped objects, parked events.
    Status {
        /// Tenant ids.
        #[arg(required = true)]
        tenants: Vec<String>,
    },
}

/// What `ferry tenant enable` and `disable` take.
#[derive(Debug, clap::Args)]
struct Switch {
    /// Tenant ids.
    #[arg(required = true)]
    tenants: Vec<String>,
    /// Return once the events are written, without waiting until the consumers handled them.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the consumers.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    wait_timeout: Duration,
}

/// A progress bar on stderr: redrawn in place on a terminal, a line at most every few seconds
/// otherwise (logs stay readable).
struct Bar {
    tty: bool,
    last: Option<std::time::Instant>,
}

impl Bar {
    fn new() -> Bar {
        use std::io::IsTerminal as _;
        Bar {
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, label: &str, done: u64, total: u64, note: &str) {
        let finished = done >= total;
        if !self.tty
            && !finished
            && self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        const WIDTH: u64 = 30;
        let filled = (done.min(total) * WIDTH)
            .checked_div(total)
            .unwrap_or(WIDTH) as usize;
        let bar = format!(
            "{}{}",
            "#".repeat(filled),
            "-".repeat(WIDTH as usize - filled)
        );
        let line = format!("{label} [{bar}] {done}/{total}{note}");
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            if finished {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
    }
}

/// The tenant's state in a progress line, when it is not simply active.
fn state_note(status: Option<&ferry::tenant::TenantStatus>) -> String {
    match status {
        Some(s) if s.state != "active" => format!(
            "  (tenant {}: {})",
            s.state,
            s.pause_reason.as_deref().unwrap_or("no reason given")
        ),
        _ => String::new(),
    }
}

async fn tenant_command(
    config: &Config,
    action: TenantAction,
    output: Output,
) -> anyhow::Result<()> {
    let pool = ferry::store::connect(&config.database).await?;
    let spec = configured_integration(config)?;
    let integration = integration_name(spec.as_ref());
    let on = Integration {
        pool: &pool,
        name: integration,
    };
    match action {
        TenantAction::Enable(switch) => {
            // The backfill that integration says: its file's query, else the shop's products.
            let source = match spec.as_ref().map(|s| s.backfill.as_ref()) {
                None => ferry::tenant::BackfillSource::Products,
                Some(Some(query)) => ferry::tenant::BackfillSource::Query(query),
                Some(None) => ferry::tenant::BackfillSource::Nothing,
            };
            tenant_enable(on, switch, source).await
        }
        TenantAction::Disable(switch) => tenant_disable(on, switch).await,
        TenantAction::Status { tenants } => tenant_status(&pool, tenants, output).await,
    }
}

/// The integration file `ferry consume` runs with this configuration, if any (else the built-in
/// shop integration).
fn configured_integration(config: &Config) -> anyhow::Result<Option<ferry::partner::spec::Spec>> {
    Ok(match &config.consume.integration {
        Some(file) => Some(ferry::partner::spec::Spec::load(file)?),
        None => None,
    })
}

/// The name of the integration `spec` declares, or the built-in one's.
fn integration_name(spec: Option<&ferry::partner::spec::Spec>) -> &str {
    spec.map_or(ferry::partner::integration::INTEGRATION, |s| {
        s.name.as_str()
    })
}

/// The database and the integration a `ferry tenant` command switches tenants in.
#[derive(Clone, Copy)]
struct Integration<'a> {
    pool: &'a sqlx::PgPool,
    name: &'a str,
}

/// `ferry tenant enable`: each tenant switched on, its backfill written from `source`, then
/// (unless `--no-wait`) waited for.
async fn tenant_enable(
    Integration { pool, name }: Integration<'_>,
    Switch {
        tenants,
        no_wait,
        wait_timeout,
    }: Switch,
    source: ferry::tenant::BackfillSource<'_>,
) -> anyhow::Result<()> {
    for raw in tenants {
        let tenant = ferry::tenant::tenant_id(&raw)?;
        let mut bar = Bar::new();
        let enabled = ferry::tenant::enable(pool, name, &tenant, source, |b| {
            bar.show(
                &format!("{tenant}: backfill written "),
                b.written,
                b.total,
                "",
            );
        })
        .await?;
        if enabled.was_enabled {
            eprintln!(
                "{tenant}: was enabled already; the backfill resends every object (a resync)"
            );
        }
        if !no_wait {
            let mut bar = Bar::new();
            ferry::tenant::wait(pool, name, &tenant, &enabled.events, wait_timeout, |w| {
                bar.show(
                    &format!("{tenant}: delivered         "),
                    w.settled,
                    w.total,
                    &state_note(w.status.as_ref()),
                );
            })
            .await?;
        }
        println!(
            "{tenant}: {name} enabled, {} objects backfilled",
            enabled.events.len() - 1
        );
    }
    Ok(())
}

/// `ferry tenant disable`: each tenant switched off, then (unless `--no-wait`) its rollback
/// waited for.
async fn tenant_disable(
    Integration { pool, name }: Integration<'_>,
    Switch {
        tenants,
        no_wait,
        wait_timeout,
    }: Switch,
) -> anyhow::Result<()> {
    for raw in tenants {
        let tenant = ferry::tenant::tenant_id(&raw)?;
        let mapped = ferry::tenant::status(pool, name, &tenant)
            .await?
            .map_or(0, |s| s.mapped);
        let event = ferry::tenant::disable(pool, name, &tenant).await?;
        if !no_wait {
            let mut bar = Bar::new();
            ferry::tenant::wait(pool, name, &tenant, &[event], wait_timeout, |w| {
                let left = w.status.as_ref().map_or(0, |s| s.mapped);
                let done = if w.settled == w.total {
                    mapped as u64
                } else {
                    (mapped - left).max(0) as u64
                };
                bar.show(
                    &format!("{tenant}: objects deleted "),
                    done,
                    mapped as u64,
                    &state_note(w.status.as_ref()),
                );
            })
            .await?;
        }
        println!("{tenant}: {name} disabled, {mapped} mapped objects rolled back");
    }
    Ok(())
}

/// `ferry tenant status`: a table of the tenants, a row per integration that knows each.
async fn tenant_status(
    pool: &sqlx::PgPool,
    tenants: Vec<String>,
    output: Output,
) -> anyhow::Result<()> {
    if output == Output::Json {
        let mut found = Vec::new();
        for raw in tenants {
            let tenant = ferry::tenant::tenant_id(&raw)?;
            let integrations = ferry::tenant::statuses(pool, &tenant).await?;
            found
                .push(serde_json::json!({"tenant": tenant.as_str(), "integrations": integrations}));
        }
        return print_json(&found);
    }
    println!("| tenant | integration | on | state | mapped objects | parked events | reason |");
    println!("|---|---|---|---|---|---|---|");
    for raw in tenants {
        let tenant = ferry::tenant::tenant_id(&raw)?;
        let statuses = ferry::tenant::statuses(pool, &tenant).await?;
        if statuses.is_empty() {
            println!("| {tenant} | (none) | off (never enabled) | | | | |");
        }
        for s in statuses {
            println!(
                "| {tenant} | {} | {} | {} | {} | {} | {} |",
                s.integration,
                if s.integration_enabled { "on" } else { "off" },
                s.state,
                s.mapped,
                s.parked,
                s.pause_reason.unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(seconds) = s.trim().parse::<i64>() {
        return chrono::DateTime::from_timestamp(seconds, 0)
            .ok_or_else(|| format!("`{s}` seconds since the epoch is out of range"));
    }
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.to_utc())
        .map_err(|e| format!("`{s}` is not a time like 2026-11-28T16:00:00Z or 1795000000: {e}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s or m)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `ferry ctl` is a client of a running consumer: it needs none of Ferry's settings (no
    // database, no Kafka), logs nothing (its output is the answer) and has exit codes of its own.
    let cli = match cli {
        Cli {
            command: Command::Ctl(args),
            ..
        } => return runtime.block_on(ctl_command(args)),
        cli => cli,
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {}", causes_once(&e));
            if e.downcast_ref::<DriftFound>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs a long-lived command as a task on the runtime's workers rather than on the main
/// thread under `block_on`. A worker waiting for work waits on the I/O driver itself, so a
/// socket that becomes readable, or a message from another task, wakes the loop on the
/// thread where it runs. The main thread waits on a condition variable: every wake-up of a loop
/// run there (the relay's, the consumer's coordinator) went through a worker and then a futex
/// (docs/measurements.md counts them).
async fn on_worker<F>(command: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(command)
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the command's task ended: {e}")))
}

/// `ferry verify` found differences: exit code 3, told apart from a failure to check (1) and
/// bad usage (2).
#[derive(Debug, thiserror::Error)]
#[error("{0} differences: drifted or duplicate objects, or events out of order")]
struct DriftFound(u64);

/// An error and its causes, each once: a cause whose text the message already holds (an error
/// that prints its source, as most do) is not repeated.
fn causes_once(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = ferry::telemetry::init(cli.command.name())?;
    // The simulator is the partner, not Ferry: it needs none of Ferry's settings.
    if let Command::PartnerSim { addr, token } = &cli.command {
        return partner_sim(*addr, token.clone()).await;
    }
    if let Command::Config { action } = &cli.command {
        return config_command(cli.config.as_deref(), action, cli.output);
    }
    // A file check needs no database and no broker either.
    if let Command::CheckIntegration { file } = &cli.command {
        let spec = ferry::partner::spec::Spec::load(file)?;
        print!("{}", spec.describe());
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    let output = cli.output;
    match cli.command {
        Command::PartnerSim { .. } | Command::CheckIntegration { .. } | Command::Config { .. } => {
            unreachable!("handled above")
        }
        Command::Ctl(_) => unreachable!("handled in main"),
        Command::Consume => {
            config.require_kafka()?;
            on_worker(async move { consume(&config).await }).await
        }
        Command::Verify {
            tenants,
            simulator,
            latency_since,
        } => verify(&config, tenants, simulator, latency_since, output).await,
        Command::Tenant { action } => tenant_command(&config, action, output).await,
        Command::DeadLetters { action } => dead_letters_command(&config, action, output).await,
        Command::Migrate => {
            let pool = ferry::store::connect(&config.database).await?;
            ferry::store::migrate(&pool).await?;
            let version = ferry::store::schema_version(&pool).await?.unwrap_or(0);
            println!("schema at version {version}");
            Ok(())
        }
        Command::Smoke { timeout } => {
            config.require_kafka()?;
            smoke(&config, timeout).await
        }
        Command::Relay {
            action: Some(RelayAction::Status),
            ..
        }
        | Command::RelayStatus => relay_status(&config, output).await,
        Command::Relay { metrics_addr, .. } => {
            config.require_kafka()?;
            on_worker(async move { relay(&config, metrics_addr).await }).await
        }
        Command::Load {
            tenants,
            events,
            concurrency,
            tenant_prefix,
            seed,
            rate,
        } => {
            let options = ferry::load::LoadOptions {
                tenants,
                events,
                concurrency,
                tenant_prefix,
                seed,
                rate,
            };
            load(&config, &options).await
        }
        Command::Bench { which } => bench(&config, cli.config, which).await,
    }
}

/// `ferry partner-sim`: the partner's simulator, until a signal.
async fn partner_sim(addr: std::net::SocketAddr, token: String) -> anyhow::Result<()> {
    let shutdown = ferry::shutdown::on_signals()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "partner simulator listening");
    let sim = ferry::partner::sim::Sim::new(token);
    ferry::partner::sim::serve(listener, sim, shutdown).await?;
    Ok(())
}

/// Whoever starts first, relay or consumer, creates the topic (idempotent). A broker that does
/// not answer yet (starting, or restarting, with us) is waited for; false if a signal came
/// first.
async fn topic_ready(
    config: &Config,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<bool> {
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        match ferry::broker::ensure_topic(
            &config.kafka,
            &config.kafka.topic,
            config.relay.topic_partitions,
        )
        .await
        {
            Ok(()) => return Ok(true),
            Err(e @ ferry::broker::BrokerError::Unreachable { .. }) => {
                tracing::warn!(error = %e, retry_in = ?wait, "the broker does not answer yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `ferry consume`: the admin API and the consumer, until a signal.
async fn consume(config: &Config) -> anyhow::Result<()> {
    use ferry::partner::{client::PartnerClient, integration, rest, spec::Spec};
    let pool = ferry::store::connect(&config.database).await?;
    let options = ferry::consumer::runtime::ConsumeOptions::configured(&config.consume);
    match &config.consume.integration {
        Some(file) => {
            let spec = Spec::load(file)?;
            tracing::info!(file = %file.display(), integration = %spec.name, "running the integration file");
            if spec.webhooks.is_some() {
                let timeout = config.partner.timeout;
                let hooks = ferry::webhook::WebhookIntegration::new(spec, timeout, pool.clone())?;
                // Each tenant has an endpoint of its own: many refusing at once is many
                // tenants' trouble, never one partner's, so the breaker never opens (and its
                // deliveries are never classed partner-wide).
                let options = ferry::consumer::runtime::ConsumeOptions {
                    breaker_min_tenants: usize::MAX,
                    ..options
                };
                return consume_with(config, pool.clone(), hooks, options).await;
            }
            let client = PartnerClient::for_spec(&config.partner, &spec.partner)?;
            let mut rest = rest::RestIntegration::new(spec, client, pool.clone());
            if let Some(budget) = config.consume.mapping_views {
                rest = rest.with_mapping_views(budget);
            }
            consume_with(config, pool, rest, options).await
        }
        None => {
            let client = PartnerClient::new(&config.partner)?;
            let mut shop = integration::Integration::new(client, pool.clone());
            if let Some(budget) = config.consume.mapping_views {
                shop = shop.with_mapping_views(budget);
            }
            consume_with(config, pool, shop, options).await
        }
    }
}

/// The terminal policy's dead-letter topic, when `consume.dead_letter_topic` names one: made
/// with as many partitions as the outbox topic if missing.
async fn dead_letters(
    config: &Config,
) -> anyhow::Result<Option<std::sync::Arc<ferry::dead_letter::DeadLetters>>> {
    let Some(topic) = &config.consume.dead_letter_topic else {
        return Ok(None);
    };
    let kafka = config.require_kafka()?;
    let partitions = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || ferry::broker::partition_count(&kafka, &kafka.topic))
            .await?
            .ok()
            .flatten()
            .unwrap_or(1)
    };
    ferry::broker::ensure_topic(kafka, topic, partitions as i32)
        .await
        .with_context(|| format!("the dead-letter topic {topic}"))?;
    let letters = ferry::dead_letter::DeadLetters::new(kafka, topic)?;
    tracing::info!(topic = %topic, "an operator's skip exports to the dead-letter topic");
    Ok(Some(std::sync::Arc::new(letters)))
}

/// `ferry consume` with `handler`: the admin API, then the consumer until a signal.
async fn consume_with<H: ferry::delivery::Handler>(
    config: &Config,
    pool: sqlx::PgPool,
    handler: H,
    options: ferry::consumer::runtime::ConsumeOptions,
) -> anyhow::Result<()> {
    let shutdown = ferry::shutdown::on_signals()?;
    let handler = std::sync::Arc::new(handler);
    if !topic_ready(config, &shutdown).await? {
        return Ok(());
    }
    let stats = std::sync::Arc::new(ferry::consumer::runtime::ConsumeStats::default());
    let listener = tokio::net::TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("the admin API cannot listen on {}", config.admin.addr))?;
    tracing::info!(addr = %config.admin.addr, "admin API listening");
    tokio::spawn(ferry::admin::serve(
        listener,
        ferry::admin::Admin {
            pool: pool.clone(),
            integration: handler.integration().to_owned(),
            stats: std::sync::Arc::clone(&stats),
            token: Some(admin_token(config, &pool).await?),
            hosts: ferry::admin::access::hosts(config.admin.addr, &config.admin.hosts),
            dead_letters: dead_letters(config).await?,
        },
        shutdown.clone(),
    ));
    tracing::info!(topic = %config.kafka.topic, group = %config.kafka.group_id, "consuming");
    ferry::consumer::runtime::run(
        config,
        pool,
        handler,
        options,
        std::sync::Arc::clone(&stats),
        shutdown,
    )
    .await?;
    let bound = |h: &ferry::consumer::latency::Histogram, q| {
        h.quantile_bound_ms(q)
            .map_or_else(|| "-".to_owned(), |ms| format!("<={ms}ms"))
    };
    tracing::info!(
        delivered = stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        received = stats.received.load(std::sync::atomic::Ordering::Relaxed),
        intake_p50 = %bound(&stats.intake_latency, 0.5),
        intake_p99 = %bound(&stats.intake_latency, 0.99),
        ack_p50 = %bound(&stats.ack_latency, 0.5),
        ack_p99 = %bound(&stats.ack_latency, 0.99),
        "consumer stopped"
    );
    Ok(())
}

/// `ferry config check|reference`.
fn config_command(
    path: Option<&std::path::Path>,
    action: &ConfigAction,
    output: Output,
) -> anyhow::Result<()> {
    use ferry::config::reference;
    match action {
        ConfigAction::Reference => print!("{}", reference::markdown()),
        ConfigAction::Check if output == Output::Json => {
            let config = Config::load(path)?;
            let settings: Vec<serde_json::Value> =
                reference::effective(&config, path, |v| std::env::var(v).ok())
                    .into_iter()
                    .map(|(key, value, from)| serde_json::json!({"setting": key, "value": value, "from": from}))
                    .collect();
            print_json(&serde_json::json!({"valid": true, "settings": settings}))?;
        }
        ConfigAction::Check => {
            let config = Config::load(path)?;
            println!("| setting | value | from |\n|---|---|---|");
            for (key, value, source) in
                reference::effective(&config, path, |v| std::env::var(v).ok())
            {
                println!("| {key} | {value} | {source} |");
            }
            println!("configuration valid");
        }
    }
    Ok(())
}

/// The admin API's token: the configured one, else the one every instance shares in
/// Postgres, made (and printed, this once) if there is none yet.
async fn admin_token(
    config: &Config,
    pool: &sqlx::PgPool,
) -> anyhow::Result<ferry::admin::access::Token> {
    use ferry::admin::access;
    if let Some(token) = &config.admin.token {
        return Ok(access::Token::new(token));
    }
    let (token, made) = access::stored_or_new(pool)
        .await
        .context("the admin API's token (has `ferry migrate` run?)")?;
    if let Some(secret) = made {
        // Printed, not logged: it is shown this once and stored nowhere but as a hash.
        eprintln!(
            "ferry: the admin API's token, generated now and shown this once (ferry ctl reads it from \
             FERRY_ADMIN_TOKEN; set admin.token to choose your own): {secret}"
        );
    }
    Ok(token)
}

/// `ferry verify`: the partner's objects against ours, and the latencies.
async fn verify(
    config: &Config,
    tenants: Vec<String>,
    simulator: bool,
    latency_since: Option<chrono::DateTime<chrono::Utc>>,
    output: Output,
) -> anyhow::Result<()> {
    use ferry::partner::verify;
    let pool = ferry::store::connect(&config.database).await?;
    let client = ferry::partner::client::PartnerClient::new(&config.partner)?;
    let spec = configured_integration(config)?;
    let integration = integration_name(spec.as_ref());
    if let Some(spec) = spec.as_ref().filter(|s| s.webhooks.is_some()) {
        let check = HookCheck {
            pool: &pool,
            client: &client,
            simulator,
            latency_since,
        };
        return verify_webhooks(spec, check, output).await;
    }
    let order_violations = if simulator {
        let report = client
            .simulator_report()
            .await
            .map_err(|f| anyhow::anyhow!(f.message))?;
        Some(report.values().map(|a| a.order_violations).sum())
    } else {
        None
    };
    let found = verify::Verification {
        tenants: verify::verify(&pool, integration, &client, &tenants).await?,
        latency: verify::latency(&pool, integration, None).await?,
        window: match latency_since {
            Some(since) => Some((
                since,
                verify::latency(&pool, integration, Some(since)).await?,
            )),
            None => None,
        },
        order_violations,
    };
    report(&found.render(), &found, found.failures(), output)
}

/// `ferry dead-letters list|copy-back`.
async fn dead_letters_command(
    config: &Config,
    action: DeadLetterAction,
    output: Output,
) -> anyhow::Result<()> {
    let pool = ferry::store::connect(&config.database).await?;
    let spec = configured_integration(config)?;
    let integration = integration_name(spec.as_ref());
    match action {
        DeadLetterAction::List { tenant } => {
            let rows = ferry::dead_letter::list(&pool, integration, tenant.as_deref()).await?;
            match output {
                Output::Json => print_json(&rows)?,
                Output::Text => print!("{}", ferry::dead_letter::table(&rows)),
            }
            Ok(())
        }
        DeadLetterAction::CopyBack { tenant, who } => {
            let topic = config.consume.dead_letter_topic.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "consume.dead_letter_topic (FERRY_CONSUME_DEAD_LETTER_TOPIC) is not set: \
                     there is no dead-letter topic to copy from"
                )
            })?;
            let letters = ferry::dead_letter::DeadLetters::new(config.require_kafka()?, topic)?;
            let action = who.action();
            let giving = ferry::dead_letter::GiveUp {
                integration,
                tenant: &tenant,
                actor: &action.actor,
                reason: &action.reason,
            };
            let n = ferry::dead_letter::copy_back(&pool, &letters, giving).await?;
            println!("{tenant}: {n} dead letters written back into its stream ({integration})");
            Ok(())
        }
    }
}

/// Prints a verification (`text` or `found` as JSON); an error (exit 3) when it found
/// `failures`.
fn report(
    text: &str,
    found: &impl serde::Serialize,
    failures: u64,
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Text => print!("{text}"),
        Output::Json => print_json(found)?,
    }
    if failures > 0 {
        return Err(DriftFound(failures).into());
    }
    Ok(())
}

/// What `ferry verify` of a webhooks integration reads.
struct HookCheck<'a> {
    pool: &'a sqlx::PgPool,
    client: &'a ferry::partner::client::PartnerClient,
    simulator: bool,
    latency_since: Option<chrono::DateTime<chrono::Utc>>,
}

/// `ferry verify` of a webhooks integration: Ferry's records against what each endpoint
/// received (the simulator's receiver; without `--simulator`, only what Ferry lost).
async fn verify_webhooks(
    spec: &ferry::partner::spec::Spec,
    check: HookCheck<'_>,
    output: Output,
) -> anyhow::Result<()> {
    use ferry::webhook::verify;
    let received = if check.simulator {
        check
            .client
            .receiver_report()
            .await
            .map_err(|f| anyhow::anyhow!(f.message))?
    } else {
        ferry::webhook::receiver::Report::default()
    };
    let types: Vec<String> = spec.events.keys().cloned().collect();
    let mut tenants = verify::verify(check.pool, &spec.name, &types, &received).await?;
    if !check.simulator {
        // Nothing to compare the deliveries with: only what was owed and never settled counts.
        for t in tenants.values_mut() {
            t.seen.received = t.delivered;
        }
    }
    let found = verify::HookVerification {
        integration: spec.name.clone(),
        tenants: tenants.into_values().collect(),
        latency: ferry::partner::verify::latency(check.pool, &spec.name, check.latency_since)
            .await?,
    };
    report(&found.render(), &found, found.failures(), output)
}

/// `ferry smoke`: one round trip through Postgres and Kafka.
async fn smoke(config: &Config, timeout: std::time::Duration) -> anyhow::Result<()> {
    let report = ferry::smoke::run(config, timeout)
        .await
        .context("smoke round trip failed")?;
    println!(
        "smoke ok: schema version {}, {} broker(s), event {} at {}[{}]@{} back in {:?}, group {} committed {}",
        report.schema_version,
        report.brokers,
        report.event_id,
        ferry::smoke::SMOKE_TOPIC,
        report.partition,
        report.offset,
        report.round_trip,
        ferry::smoke::SMOKE_GROUP,
        report.committed,
    );
    Ok(())
}

/// `ferry relay`: the outbox's WAL into Kafka, until a signal.
async fn relay(config: &Config, metrics_addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let shutdown = ferry::shutdown::on_signals()?;
    let relay = ferry::relay::Relay::connect(config).await?;
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics"))?;
        let stats = relay.stats();
        let ready_stats = relay.stats();
        let render = move || stats.render_prometheus();
        let ready = move || ready_stats.is_ready();
        tokio::spawn(ferry::telemetry::serve_metrics(
            listener,
            render,
            ready,
            shutdown.clone(),
        ));
        tracing::info!(%addr, "serving relay metrics on /metrics, probes on /health and /ready");
    }
    let stats = relay.run(shutdown).await?;
    println!(
        "relay stopped: {} records acknowledged, {} rejected",
        stats
            .records_acked
            .load(std::sync::atomic::Ordering::Relaxed),
        stats
            .rows_rejected
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

/// `ferry relay-status`: the slot's confirmed position and lag.
async fn relay_status(config: &Config, output: Output) -> anyhow::Result<()> {
    let mut relay = ferry::relay::Relay::connect(config).await?;
    relay.setup().await?;
    let lag = relay.slot_lag().await?;
    let confirmed = relay
        .stats()
        .confirmed_lsn
        .load(std::sync::atomic::Ordering::Relaxed);
    let confirmed = ferry::relay::lsn::Lsn(confirmed);
    match output {
        Output::Text => println!(
            "slot {} confirmed at {confirmed}, lag {lag} bytes",
            config.relay.slot
        ),
        Output::Json => print_json(&serde_json::json!({
            "slot": config.relay.slot,
            "confirmed_lsn": confirmed.to_string(),
            "lag_bytes": lag,
        }))?,
    }
    Ok(())
}

/// `ferry load`: writes a synthetic stream of changes through the outbox.
async fn load(config: &Config, options: &ferry::load::LoadOptions) -> anyhow::Result<()> {
    let pool = ferry::store::connect(&config.database).await?;
    let report = ferry::load::run(&pool, options).await?;
    println!(
        "wrote {} events ({} created, {} updated, {} deleted) across {} tenants in {:.2} s ({:.0} events/s)",
        report.events(),
        report.created,
        report.updated,
        report.deleted,
        options.tenants,
        report.elapsed.as_secs_f64(),
        report.events() as f64 / report.elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// `ferry bench ...`: the benchmarks, printed as tables.
async fn bench(config: &Config, config_file: Option<PathBuf>, which: Bench) -> anyhow::Result<()> {
    match which {
        Bench::Consume {
            events,
            tenants,
            handler_ms,
            overhead_events,
            isolation_events,
            parked_events,
            broker,
        } => {
            let options = ferry::bench::consume::ConsumeBenchOptions {
                broker: bench_broker(&broker)?,
                events,
                tenants,
                handler_ms,
                overhead_events,
                isolation_events,
                parked_events,
                child: std::env::current_exe().ok(),
            };
            let report = ferry::bench::consume::run(config, &options).await?;
            print!("{}", report.render());
        }
        Bench::ConsumeParked {
            topic,
            parked_events,
        } => {
            let run = ferry::bench::consume::parked(config, &topic, parked_events).await?;
            println!("{}", run.to_line());
        }
        Bench::Relay {
            rows,
            tenants,
            writers,
            partitions,
            broker,
        } => {
            let options = ferry::bench::relay::RelayBenchOptions {
                broker: bench_broker(&broker)?,
                rows,
                tenants,
                writers,
                partitions,
            };
            let report = ferry::bench::relay::run(config, &options).await?;
            print!("{}", report.render());
        }
        Bench::Pipeline(args) => bench_pipeline(config, config_file, args).await?,
        Bench::RelayLatency {
            rate,
            seconds,
            tenants,
            partitions,
            broker,
        } => {
            if !(rate.is_finite() && rate > 0.0 && seconds.is_finite() && seconds > 0.0) {
                anyhow::bail!("--rate and --seconds must be positive numbers");
            }
            let options = ferry::bench::relay_latency::LatencyBenchOptions {
                broker: bench_broker(&broker)?,
                rate,
                seconds,
                tenants,
                partitions,
            };
            let report = ferry::bench::relay_latency::run(config, &options).await?;
            print!("{}", report.render());
        }
    }
    Ok(())
}

/// `ferry bench pipeline`.
async fn bench_pipeline(
    config: &Config,
    config_file: Option<PathBuf>,
    args: PipelineArgs,
) -> anyhow::Result<()> {
    let PipelineArgs {
        rate,
        seconds,
        tenants,
        consumers,
        partitions,
        integration,
        children,
        warm_up,
    } = args;
    if !(rate.is_finite() && rate > 0.0 && seconds.is_finite() && seconds > 0.0) {
        anyhow::bail!("--rate and --seconds must be positive numbers");
    }
    if consumers == 0 || tenants == 0 || partitions < 1 {
        anyhow::bail!("--consumers, --tenants and --partitions must be at least 1");
    }
    let children = match children {
        Some(path) => path,
        None => std::env::current_exe()?,
    };
    let options = ferry::bench::pipeline::PipelineBenchOptions {
        writer: std::env::current_exe()?,
        rate,
        seconds,
        tenants,
        consumers,
        partitions,
        integration: std::path::absolute(integration)?,
        children,
        config_file: config_file.map(std::path::absolute).transpose()?,
        warm_up,
        secrets: Vec::new(),
    };
    let report = ferry::bench::pipeline::run(config, &options).await?;
    print!("{}", report.render());
    Ok(())
}

/// The `--broker` of a benchmark: a clear error for anything but the three it knows.
fn bench_broker(name: &str) -> anyhow::Result<ferry::bench::relay::BenchBroker> {
    match name {
        "configured" => Ok(ferry::bench::relay::BenchBroker::Configured),
        "memory" => Ok(ferry::bench::relay::BenchBroker::Memory),
        "mock" => Ok(ferry::bench::relay::BenchBroker::Mock),
        other => anyhow::bail!("--broker {other:?}: expected `configured`, `memory` or `mock`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("postgres: {0}")]
        struct Outer(#[source] std::io::Error);
        let inner = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(Outer(inner)).context("the admin API's token");
        assert_eq!(
            causes_once(&e),
            "the admin API's token: postgres: connection refused"
        );
    }
}
