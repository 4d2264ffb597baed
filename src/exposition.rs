//! Prometheus exposition through `prometheus-client`: the consumer and the relay keep their
//! counters where they count them (atomics in their stats), and at each scrape a [`Scrape`]
//! writes them through the crate's OpenMetrics encoder, which owns the format (names, `_total`
//! on counters, escaping, `# EOF`). Names carry their base unit (`_seconds`, `_bytes`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of what [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape's series, written by `write` through the encoder.
pub struct Scrape<F>(pub F);

impl<F> std::fmt::Debug for Scrape<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl<F> Collector for Scrape<F>
where
    F: Fn(&mut Series<'_, '_>) -> std::fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        (self.0)(&mut Series {
            encoder: &mut encoder,
        })
    }
}

/// The OpenMetrics text of the series `write` writes, and `ferry_build_info`.
pub fn render<F>(write: F) -> String
where
    F: Fn(&mut Series<'_, '_>) -> std::fmt::Result + Send + Sync + 'static,
{
    render_labelled(Vec::new(), write)
}

/// As [`render`], with `labels` on every series `write` writes (a consumer's `integration`).
pub fn render_labelled<F>(labels: Vec<(&'static str, String)>, write: F) -> String
where
    F: Fn(&mut Series<'_, '_>) -> std::fmt::Result + Send + Sync + 'static,
{
    use std::borrow::Cow;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(|series: &mut Series<'_, '_>| {
        series.info(
            "ferry_build",
            "The Ferry build this process runs.",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
    })));
    registry
        .sub_registry_with_labels(
            labels
                .into_iter()
                .map(|(name, value)| (Cow::Borrowed(name), Cow::Owned(value))),
        )
        .register_collector(Box::new(Scrape(write)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Writes series.
pub struct Series<'e, 'w> {
    encoder: &'e mut DescriptorEncoder<'w>,
}

impl Series<'_, '_> {
    /// A counter (`name` without `_total`: the encoder adds it).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> std::fmt::Result {
        let counter = ConstCounter::new(value);
        let metric = self
            .encoder
            .encode_descriptor(name, help, None, counter.metric_type())?;
        counter.encode(metric)
    }

    /// A gauge of a whole number (a count, bytes, a flag).
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> std::fmt::Result {
        let gauge = ConstGauge::new(value);
        let metric = self
            .encoder
            .encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }

    /// A gauge of a fraction (seconds).
    pub fn gauge_f64(&mut self, name: &str, help: &str, value: f64) -> std::fmt::Result {
        let gauge = ConstGauge::new(value);
        let metric = self
            .encoder
            .encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }

    /// A counter with one series per label set.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        series: &[(Vec<(&str, String)>, u64)],
    ) -> std::fmt::Result {
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in series {
            let metric = family.encode_family(labels)?;
            ConstCounter::new(*value).encode(metric)?;
        }
        Ok(())
    }

    /// A gauge with one series per label set.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        series: &[(Vec<(&str, String)>, i64)],
    ) -> std::fmt::Result {
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in series {
            let metric = family.encode_family(labels)?;
            ConstGauge::new(*value).encode(metric)?;
        }
        Ok(())
    }

    /// A histogram: the sum, the count, and each bucket's own count by its upper bound (the
    /// encoder accumulates them; `f64::MAX` is `+Inf`).
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) -> std::fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        metric
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, buckets, None)
    }

    /// An info metric (`name` without `_info`).
    pub fn info(&mut self, name: &str, help: &str, labels: &[(&str, &str)]) -> std::fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Info)?;
        metric.encode_info(&labels.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_written_in_openmetrics() {
        let text = render(|s: &mut Series<'_, '_>| {
            s.counter("ferry_things", "Things.", 3)?;
            s.gauge_f64("ferry_lag_seconds", "Lag.", 1.5)?;
            s.gauge("ferry_flag", "Flag.", 1)?;
            s.counters(
                "ferry_outcomes",
                "Outcomes.",
                &[(vec![("outcome", "delivered".to_owned())], 7)],
            )?;
            s.histogram(
                "ferry_latency_seconds",
                "Latency.",
                0.3,
                2,
                &[(0.1, 1), (f64::MAX, 1)],
            )
        });
        for line in [
            "# TYPE ferry_things counter",
            "ferry_things_total 3",
            "ferry_lag_seconds 1.5",
            "ferry_flag 1\n",
            "ferry_outcomes_total{outcome=\"delivered\"} 7",
            "ferry_latency_seconds_bucket{le=\"0.1\"} 1",
            "ferry_latency_seconds_bucket{le=\"+Inf\"} 2",
            "ferry_latency_seconds_count 2",
            &format!(
                "ferry_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn labels_given_go_on_every_series_but_the_build() {
        let text = render_labelled(vec![("integration", "webhooks".to_owned())], |s| {
            s.counter("ferry_things", "Things.", 3)?;
            s.counters(
                "ferry_outcomes",
                "Outcomes.",
                &[(vec![("outcome", "delivered".to_owned())], 7)],
            )
        });
        assert!(
            text.contains("ferry_things_total{integration=\"webhooks\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("ferry_outcomes_total{integration=\"webhooks\",outcome=\"delivered\"} 7"),
            "{text}"
        );
        assert!(!text.contains("ferry_build_info{integration"), "{text}");
    }
}
