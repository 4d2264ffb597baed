//! Log lines as JSON, one object per line, for a log pipeline to parse rather than a person to
//! read (`FERRY_LOG_FORMAT=json`): time, level, target, the service, the message and the
//! event's fields, the span it happened in, and that span's `trace_id` and `span_id`, so a line
//! leads to its trace.

use std::fmt;
use std::io::Write as _;
use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The JSON line layer, writing to `W` (stderr in `ferry`).
pub struct JsonLines<W> {
    /// The service name written on every line (`OTEL_SERVICE_NAME`, else `ferry-<command>`).
    service: String,
    writer: W,
    /// The subscriber it is part of: the OpenTelemetry layer's ids of a span are read through
    /// it.
    dispatch: OnceLock<WeakDispatch>,
}

impl<W> JsonLines<W> {
    /// Lines for `service`, written to `writer`.
    pub fn new(service: impl Into<String>, writer: W) -> Self {
        JsonLines {
            service: service.into(),
            writer,
            dispatch: OnceLock::new(),
        }
    }
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        let mut line = Map::new();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        line.insert("service".into(), self.service.clone().into());
        if let Some(message) = fields.remove("message") {
            line.insert("message".into(), message);
        }
        if !fields.is_empty() {
            line.insert("fields".into(), Value::Object(fields));
        }
        if let Some(span) = ctx.event_span(event) {
            line.insert("span".into(), span.name().into());
            self.trace_ids(&span.id(), &mut line);
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        let _ = self.writer.make_writer().write_all(text.as_bytes());
    }
}

impl<W> JsonLines<W> {
    /// The span's `trace_id` and `span_id`, as the OpenTelemetry layer assigned them.
    fn trace_ids(&self, span: &tracing::span::Id, line: &mut Map<String, Value>) {
        let Some(dispatch) = self.dispatch.get().and_then(WeakDispatch::upgrade) else {
            return;
        };
        let Some(cx) = tracing_opentelemetry::get_otel_context(span, &dispatch) else {
            return;
        };
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        if sc.is_valid() {
            line.insert("trace_id".into(), sc.trace_id().to_string().into());
            line.insert("span_id".into(), sc.span_id().to_string().into());
        }
    }
}

/// An event's fields as JSON values.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_is_json_with_its_fields_and_its_spans_trace() {
        let buffer = Buffer::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(JsonLines::new("ferry-test", move || writer.clone()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let traceparent = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("deliver event", tenant = "acme");
            let _entered = span.enter();
            tracing::warn!(attempt = 3, retry = true, "partner \"slow\"");
            super::super::current_traceparent().expect("the span has a trace")
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["service"], "ferry-test");
        assert_eq!(line["message"], "partner \"slow\"");
        assert_eq!(line["fields"]["attempt"], 3);
        assert_eq!(line["fields"]["retry"], true);
        assert_eq!(line["span"], "deliver event");
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(line["trace_id"], parts[1]);
        assert_eq!(line["span_id"], parts[2]);
    }
}
