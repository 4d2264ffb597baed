//! Logs and traces. Logs go to stderr, filtered by `RUST_LOG` (default `info`). Traces are
//! exported over OTLP/HTTP when the standard OpenTelemetry environment names an endpoint
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; the exporter reads
//! the rest of the `OTEL_*` settings itself), and W3C `traceparent` is the propagation format.

pub mod json_lines;

use std::io::IsTerminal as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter rejected its settings.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
    /// `FERRY_LOG_FORMAT` is neither `text` nor `json`.
    #[error("FERRY_LOG_FORMAT={0:?}: expected text or json")]
    Format(String),
}

/// Keeps the trace pipeline alive; dropping it flushes the spans not yet exported.
#[must_use = "dropping the guard shuts tracing down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Nothing useful to do with a failed flush at exit but say so.
            if let Err(e) = provider.shutdown() {
                eprintln!("ferry: flushing traces failed: {e}");
            }
        }
    }
}

/// How log lines are written (`FERRY_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// For a person: one line per event, colours on a terminal (the default).
    Text,
    /// For a log pipeline: one JSON object per line, with `trace_id` and `span_id`
    /// ([`json_lines`]).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(TelemetryError::Format(other.to_owned())),
        }
    }
}

/// The service name traces and JSON lines carry: `OTEL_SERVICE_NAME` when set, else
/// `ferry-<command>` (`ferry-relay`, `ferry-consume`), so each command is a service of its own.
pub fn service_name(command: &str, otel_service_name: Option<String>) -> String {
    otel_service_name
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| format!("ferry-{command}"))
}

/// Installs logging (to stderr, as `FERRY_LOG_FORMAT` says) and, when an OTLP endpoint is
/// configured, the trace exporter, for the command `command`. JSON lines get their trace and
/// span ids from an OpenTelemetry layer, installed for them even without an exporter.
pub fn init(command: &str) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let format: LogFormat = std::env::var("FERRY_LOG_FORMAT")
        .unwrap_or_default()
        .parse()?;
    let service = service_name(command, std::env::var("OTEL_SERVICE_NAME").ok());
    // sqlx reports Postgres NOTICEs ("relation already exists, skipping") at info: not news.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => json_lines::JsonLines::new(service.clone(), std::io::stderr).boxed(),
    }
    .with_filter(filter);
    let provider = tracer_provider(&service, format)?;
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.clone())));
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// The trace pipeline: exporting over OTLP when the standard environment names an endpoint;
/// without an exporter for JSON lines alone (their ids); none otherwise.
fn tracer_provider(
    service: &str,
    format: LogFormat,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let otlp_configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    Ok(match (otlp_configured, format) {
        (true, _) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()?;
            Some(builder.with_batch_exporter(exporter).build())
        }
        (false, LogFormat::Json) => Some(builder.build()),
        (false, LogFormat::Text) => None,
    })
}

/// The current tracing span's W3C `traceparent`, when an OpenTelemetry layer is installed and
/// the span is sampled into a valid trace.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Makes `span` a child of the remote span a W3C `traceparent` names (the writer's, carried
/// in the outbox row and the Kafka header), so one trace runs from the user's click to the
/// partner's answer. A malformed value leaves the span a root of its own.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    // No subscriber wants the span: nothing to join, and parsing would cost every event.
    if span.is_disabled() {
        return;
    }
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // Only fails when no OpenTelemetry layer is installed: then there is no trace to join.
    let _ = span.set_parent(parent);
}

/// Serves `GET /metrics` (Prometheus text format, from `render`), `GET /health` (the process
/// answers) and `GET /ready` (200 while `ready()`, else 503, never why) on `listener` until
/// `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            crate::exposition::CONTENT_TYPE,
                        )],
                        render(),
                    )
                }
            }),
        )
        .route(
            "/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/ready",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (
                            StatusCode::OK,
                            axum::Json(serde_json::json!({"status": "ready"})),
                        )
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(serde_json::json!({"status": "not_ready"})),
                        )
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_is_a_service_unless_otel_service_name_says_otherwise() {
        assert_eq!(service_name("relay", None), "ferry-relay");
        assert_eq!(
            service_name("consume", Some(String::new())),
            "ferry-consume"
        );
        assert_eq!(
            service_name("consume", Some("shop-sync".into())),
            "shop-sync"
        );
    }

    #[test]
    fn the_log_format_is_text_or_json() {
        assert_eq!("".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        // Input tried: a format that is not one.
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.to_string().contains("expected text or json"), "{err}");
    }
}
