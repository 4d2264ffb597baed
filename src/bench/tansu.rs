//! A tansu broker with in-memory storage, started by a benchmark for its run: a real
//! Kafka-protocol broker on loopback whose storage is not the bottleneck, so a run measures the
//! client's side. The stack's tansu keeps its records in SQLite and serves a plain consumer some
//! 25,000 to 37,000 records/s on 2 cores; this one serves hundreds of thousands. It is not for
//! tests: its consumer groups fail with a second member and its watermarks are wrong
//! (`../shared/STACK.md`); a benchmark run is one member at a time.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::BenchError;

/// How long the broker may take to answer its first metadata request.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The running broker; dropping it stops it (its records go with it).
#[derive(Debug)]
pub struct MemoryTansu {
    child: Child,
    brokers: String,
    /// Where its output goes: a failed start reports the end of it.
    log: PathBuf,
}

impl MemoryTansu {
    /// Whether a tansu binary can be found (see [`MemoryTansu::start`]).
    pub fn available() -> bool {
        binary().is_some()
    }

    /// Starts `tansu broker` on a free loopback port with `memory://` storage and waits until it
    /// answers a metadata request. The binary is `FERRY_TANSU_BIN`, else `tansu` on `PATH`, else
    /// cargo's bin folder (where `scripts/stack up` installs it).
    pub fn start() -> Result<MemoryTansu, BenchError> {
        let bin = binary().ok_or_else(|| {
            BenchError::Tansu(
                "no tansu binary: `scripts/stack up` installs it, or set FERRY_TANSU_BIN".into(),
            )
        })?;
        // Free now; taken by tansu a moment later (another process could take it in between,
        // and the start then fails with tansu's reason).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| BenchError::Tansu(format!("finding a free port: {e}")))?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("ferry-bench-tansu-{port}.log"));
        let output = std::fs::File::create(&log)
            .map_err(|e| BenchError::Tansu(format!("creating {}: {e}", log.display())))?;
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            // Its own telemetry would go wherever Ferry's is configured to.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(output)
            .spawn()
            .map_err(|e| BenchError::Tansu(format!("starting {}: {e}", bin.display())))?;
        let mut tansu = MemoryTansu {
            child,
            brokers: format!("127.0.0.1:{port}"),
            log,
        };
        tansu.wait_until_it_answers()?;
        Ok(tansu)
    }

    /// The last lines tansu wrote, for an error.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The bootstrap servers to give a client.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    fn wait_until_it_answers(&mut self) -> Result<(), BenchError> {
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        let until = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError::Tansu(format!(
                    "tansu exited at start: {status}"
                )));
            }
            if client
                .fetch_metadata(None, Duration::from_millis(500))
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(BenchError::Tansu(format!(
                    "tansu on {} did not answer within {START_DEADLINE:?}: {}",
                    self.brokers,
                    self.tail()
                )));
            }
        }
    }
}

impl Drop for MemoryTansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Where the tansu binary is, if anywhere: `FERRY_TANSU_BIN`, else `tansu` on `PATH`, else
/// cargo's bin folder (where `scripts/stack up` installs it).
pub fn binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("FERRY_TANSU_BIN") {
        return Some(PathBuf::from(bin));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join("tansu"));
    on_path.chain(cargo_home).find(|p| p.is_file())
}
