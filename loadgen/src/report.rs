//! The result of a run: the readable summary on stdout and the same data as JSON, with each
//! histogram's percentile table and its base64 HdrHistogram (V2, deflate) so it can be
//! re-plotted or merged with other runs by any HdrHistogram tool.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializer};
use serde::Serialize;

use crate::config::{Config, Scenario};
use crate::duration::format_us;
use crate::errors::ErrorKind;
use crate::machine::{self, Machine};
use crate::stats::{Metric, Recorder};

/// Percentiles in the JSON table.
const JSON_PERCENTILES: [f64; 9] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 99.999, 100.0];
/// Percentiles in the summary table (100 is shown as max).
const TEXT_PERCENTILES: [(f64, &str); 6] = [
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (99.99, "p99.99"),
    (100.0, "max"),
];

/// When the run happened and how long its phases took.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub(crate) started_unix_ms: u64,
    /// From launch until every connection was open (the ramp).
    pub(crate) ramp: Duration,
    /// From the start of the run until the last connection finished.
    pub(crate) run: Duration,
}

/// The run's parameters, echoed so a JSON file stands on its own.
#[derive(Debug, Serialize)]
struct Parameters {
    url: String,
    scenario: &'static str,
    connections: usize,
    connections_requested: usize,
    cores: usize,
    duration_s: f64,
    warmup_s: f64,
    size: usize,
    message_type: &'static str,
    mode: &'static str,
    rate: Option<f64>,
    messages_before_close: u64,
    connect_timeout_s: f64,
    timeout_s: f64,
    close_timeout_s: f64,
    ramp_concurrency: usize,
}

/// The counted results.
#[derive(Debug, Serialize)]
struct Summary {
    ramp_s: f64,
    elapsed_s: f64,
    measured_s: f64,
    connections_opened: u64,
    connections_failed: u64,
    messages: u64,
    unmeasured_messages: u64,
    unfinished_messages: u64,
    bytes: u64,
    messages_per_s: f64,
    mb_per_s: f64,
    handshakes: u64,
    handshakes_per_s: f64,
    closes: u64,
    closes_per_s: f64,
    server_closes: u64,
    errors_total: u64,
    errors: BTreeMap<&'static str, u64>,
    handshake_statuses: BTreeMap<String, u64>,
    notes: Vec<String>,
}

/// One percentile of a histogram.
#[derive(Debug, Serialize)]
struct Percentile {
    percentile: f64,
    value_us: u64,
}

/// One latency histogram.
#[derive(Debug, Serialize)]
struct HistogramReport {
    unit: &'static str,
    count: u64,
    min_us: u64,
    mean_us: f64,
    stdev_us: f64,
    max_us: u64,
    percentiles: Vec<Percentile>,
    /// Base64 of the V2 deflate encoding: the histogram column of an HdrHistogram log.
    hdr_v2_deflate_base64: String,
}

impl HistogramReport {
    fn new(h: &Histogram<u64>) -> Self {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(h, &mut bytes)
            .expect("serializing into memory cannot fail");
        Self {
            unit: "us",
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            stdev_us: h.stdev(),
            max_us: h.max(),
            percentiles: JSON_PERCENTILES
                .iter()
                .map(|&p| Percentile {
                    percentile: p,
                    value_us: h.value_at_percentile(p),
                })
                .collect(),
            hdr_v2_deflate_base64: STANDARD.encode(bytes),
        }
    }
}

/// Everything a run produced.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    tool: &'static str,
    version: &'static str,
    parameters: Parameters,
    machine: Machine,
    git_revision: Option<String>,
    started_unix_ms: u64,
    summary: Summary,
    histograms: BTreeMap<&'static str, HistogramReport>,
    #[serde(skip)]
    text_rows: Vec<(&'static str, [u64; 6], u64)>,
}

#[expect(
    clippy::cast_precision_loss,
    reason = "rates are for display; counts are < 2^52"
)]
fn per_second(n: u64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        n as f64 / over.as_secs_f64()
    }
}

impl Report {
    /// Builds the report from the merged measurements.
    pub(crate) fn new(cfg: &Config, rec: &Recorder, timing: Timing) -> Self {
        let c = &rec.counts;
        // The measured window, or what of it passed before a run stopped early (every
        // connection refused), so an empty run never claims the full duration.
        let measured = match cfg.scenario {
            Scenario::Echo | Scenario::Connect => {
                cfg.duration.min(timing.run.saturating_sub(cfg.warmup))
            }
            Scenario::Idle => cfg.duration.min(timing.run),
            Scenario::Close => timing.run,
        };
        let messages_per_s = per_second(c.messages, measured);
        let mut notes = Vec::new();
        notes.extend(cfg.limit_note.clone());
        match (cfg.scenario, cfg.rate) {
            (Scenario::Echo, None) => notes.push(
                "closed loop: each latency is one message's round trip; a stall delays the \
                 messages behind it without being counted (use --rate for a corrected tail)"
                    .into(),
            ),
            (Scenario::Echo, Some(rate)) => {
                notes.push(
                    "open loop: echo_rtt counts from each message's intended send time (or its \
                     actual one if the 1 ms timer let it out early), so lateness, the server's \
                     or loadgen's own (send_lag), is always counted"
                        .into(),
                );
                if messages_per_s < rate * 0.95 {
                    notes.push(format!(
                        "achieved {messages_per_s:.0} of the {rate} msg/s asked for: the \
                         backlog is in the latencies"
                    ));
                }
            }
            _ => {}
        }
        if c.unfinished > 0 {
            notes.push(format!(
                "{} messages were still awaiting their echo when their connection ended",
                c.unfinished
            ));
        }
        let summary = Summary {
            ramp_s: timing.ramp.as_secs_f64(),
            elapsed_s: timing.run.as_secs_f64(),
            measured_s: measured.as_secs_f64(),
            connections_opened: c.opened,
            connections_failed: c.failed,
            messages: c.messages,
            unmeasured_messages: c.unmeasured_messages,
            unfinished_messages: c.unfinished,
            bytes: c.bytes,
            messages_per_s,
            mb_per_s: per_second(c.bytes, measured) / 1e6,
            handshakes: c.cycles,
            handshakes_per_s: per_second(c.cycles, measured),
            closes: c.closes,
            closes_per_s: per_second(c.closes, timing.run),
            server_closes: c.server_closes,
            errors_total: rec.total_errors(),
            errors: ErrorKind::ALL
                .iter()
                .map(|&k| (k.name(), rec.errors(k)))
                .collect(),
            handshake_statuses: rec
                .statuses
                .iter()
                .map(|(s, n)| (s.to_string(), *n))
                .collect(),
            notes,
        };
        let mut histograms = BTreeMap::new();
        let mut text_rows = Vec::new();
        for metric in Metric::ALL {
            let h = rec.histogram(metric);
            if h.is_empty() {
                continue;
            }
            histograms.insert(metric.name(), HistogramReport::new(h));
            let values = TEXT_PERCENTILES.map(|(p, _)| h.value_at_percentile(p));
            text_rows.push((metric.name(), values, h.len()));
        }
        Self {
            tool: "loadgen",
            version: env!("CARGO_PKG_VERSION"),
            parameters: parameters(cfg),
            machine: Machine::current(),
            git_revision: machine::git_revision(),
            started_unix_ms: timing.started_unix_ms,
            summary,
            histograms,
            text_rows,
        }
    }

    /// Errors counted, all kinds together.
    pub(crate) fn errors(&self) -> u64 {
        self.summary.errors_total
    }

    /// The report as pretty JSON.
    pub(crate) fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report is plain data")
    }

    /// The human-readable summary.
    pub(crate) fn text(&self) -> String {
        let (p, s) = (&self.parameters, &self.summary);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "loadgen {} {}: {} connections on {} core(s), {}",
            p.scenario,
            p.url,
            p.connections,
            p.cores,
            p.describe(),
        );
        let _ = writeln!(
            out,
            "  connections  {} opened, {} failed (ramp {:.2}s)",
            s.connections_opened, s.connections_failed, s.ramp_s
        );
        let _ = writeln!(out, "  {}", s.outcome(p.scenario));
        if s.server_closes > 0 {
            let _ = writeln!(
                out,
                "  server       started {} close handshakes",
                s.server_closes
            );
        }
        if s.errors_total == 0 {
            let _ = writeln!(out, "  errors       none");
        } else {
            let kinds: Vec<String> = s
                .errors
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "  errors       {}: {}",
                s.errors_total,
                kinds.join(", ")
            );
            for (status, n) in &s.handshake_statuses {
                let _ = writeln!(out, "               HTTP {status}: {n}");
            }
        }
        self.write_latencies(&mut out);
        for note in &s.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }

    fn write_latencies(&self, out: &mut String) {
        if self.text_rows.is_empty() {
            return;
        }
        let _ = write!(out, "  {:<18}{:>10}", "latency", "count");
        for (_, label) in TEXT_PERCENTILES {
            let _ = write!(out, "{label:>10}");
        }
        out.push('\n');
        for (name, values, count) in &self.text_rows {
            let _ = write!(out, "  {name:<18}{count:>10}");
            for v in values {
                let _ = write!(out, "{:>10}", format_us(*v));
            }
            out.push('\n');
        }
    }
}

impl Parameters {
    /// What the run did, in a phrase.
    fn describe(&self) -> String {
        let warmup = if self.warmup_s > 0.0 {
            format!(" + {}s warmup", self.warmup_s)
        } else {
            String::new()
        };
        let (d, size, kind) = (self.duration_s, self.size, self.message_type);
        match (self.scenario, self.rate) {
            ("echo", None) => format!("{d}s{warmup}, {size} B {kind} messages, closed loop"),
            ("echo", Some(r)) => {
                format!("{d}s{warmup}, {size} B {kind} messages, open loop at {r} msg/s")
            }
            ("close", rate) => format!(
                "{} messages each, then closed {}",
                self.messages_before_close,
                rate.map_or("all at once".to_owned(), |r| format!("at {r}/s"))
            ),
            ("connect", None) => format!("{d}s{warmup}, closed loop"),
            ("connect", Some(r)) => format!("{d}s{warmup}, open loop at {r} handshakes/s"),
            _ => format!("held for {d}s"),
        }
    }
}

impl Summary {
    /// The scenario's main count and rate, in a line.
    fn outcome(&self, scenario: &str) -> String {
        match scenario {
            "echo" => format!(
                "messages     {} verified in {:.1}s: {:.0} msg/s, {:.2} MB/s of payload each way",
                self.messages, self.measured_s, self.messages_per_s, self.mb_per_s
            ),
            "connect" => format!(
                "handshakes   {} connect+upgrade+close cycles in {:.1}s: {:.0}/s",
                self.handshakes, self.measured_s, self.handshakes_per_s
            ),
            "close" => format!(
                "closes       {} close handshakes completed in {:.2}s ({:.0}/s)",
                self.closes, self.elapsed_s, self.closes_per_s
            ),
            _ => format!(
                "held         {} connections for {:.1}s, {} closed cleanly",
                self.connections_opened, self.measured_s, self.closes
            ),
        }
    }
}

fn parameters(cfg: &Config) -> Parameters {
    Parameters {
        url: cfg.target.url.clone(),
        scenario: cfg.scenario.name(),
        connections: cfg.connections,
        connections_requested: cfg.connections_requested,
        cores: cfg.cores,
        duration_s: cfg.duration.as_secs_f64(),
        warmup_s: cfg.warmup.as_secs_f64(),
        size: cfg.size,
        message_type: if cfg.text { "text" } else { "binary" },
        mode: if cfg.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        },
        rate: cfg.rate,
        messages_before_close: cfg.messages_before_close,
        connect_timeout_s: cfg.connect_timeout.as_secs_f64(),
        timeout_s: cfg.timeout.as_secs_f64(),
        close_timeout_s: cfg.close_timeout.as_secs_f64(),
        ramp_concurrency: cfg.ramp_concurrency,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use hdrhistogram::serialization::Deserializer;

    use super::*;
    use crate::cli::Args;

    /// A report of a run that went the distance: long enough for the warmup and `-d`.
    fn report(extra: &[&str], rec: &Recorder) -> Report {
        report_after(extra, rec, Duration::from_secs(60))
    }

    fn report_after(extra: &[&str], rec: &Recorder, run: Duration) -> Report {
        let argv = ["loadgen", "ws://127.0.0.1:9/x"].iter().chain(extra);
        let cfg = Config::new(Args::try_parse_from(argv).unwrap(), None).unwrap();
        let timing = Timing {
            started_unix_ms: 1,
            ramp: Duration::from_millis(20),
            run,
        };
        Report::new(&cfg, rec, timing)
    }

    #[test]
    fn a_run_that_stopped_early_does_not_claim_the_whole_duration() {
        let text = report_after(
            &["-d", "30s"],
            &Recorder::default(),
            Duration::from_millis(3),
        )
        .text();
        assert!(text.contains("0 verified in 0.0s"), "{text}");
        let text = report_after(
            &["-d", "30s"],
            &Recorder::default(),
            Duration::from_secs(36),
        )
        .text();
        assert!(text.contains("0 verified in 30.0s"), "{text}");
    }

    fn sample_recorder() -> Recorder {
        let mut rec = Recorder::default();
        for us in 1..=10_000 {
            rec.record(Metric::Echo, Duration::from_micros(us));
        }
        rec.counts.messages = 10_000;
        rec.counts.bytes = 320_000;
        rec.error(ErrorKind::PayloadMismatch);
        rec
    }

    #[test]
    fn json_has_parameters_machine_summary_and_replottable_histograms() {
        let r = report(&["-d", "2s", "--rate", "5000"], &sample_recorder());
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["parameters"]["scenario"], "echo");
        assert_eq!(v["parameters"]["mode"], "open-loop");
        assert_eq!(v["parameters"]["duration_s"], 2.0);
        assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
        assert!(v.get("git_revision").is_some());
        let s = &v["summary"];
        assert_eq!(s["messages"], 10_000);
        assert_eq!(s["messages_per_s"], 5000.0);
        assert_eq!(s["mb_per_s"], 0.16);
        assert_eq!(s["errors_total"], 1);
        assert_eq!(s["errors"]["payload_mismatch"], 1);
        assert_eq!(s["errors"]["timeout"], 0);
        let h = &v["histograms"]["echo_rtt"];
        assert_eq!(h["count"], 10_000);
        let table = h["percentiles"].as_array().unwrap();
        let p99 = table.iter().find(|p| p["percentile"] == 99.0).unwrap();
        assert_eq!(p99["value_us"], 9_903); // 9 900 at 3 significant figures
        assert!(
            v["histograms"].get("close_reply").is_none(),
            "empty histograms are left out"
        );
        // The serialized form decodes to the same histogram.
        let bytes = STANDARD
            .decode(h["hdr_v2_deflate_base64"].as_str().unwrap())
            .unwrap();
        let back: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
        assert_eq!(&back, sample_recorder().histogram(Metric::Echo));
    }

    #[test]
    fn summary_text_shows_rates_errors_and_percentiles() {
        let text = report(&["-d", "2s"], &sample_recorder()).text();
        assert!(text.contains("5000 msg/s, 0.16 MB/s"), "{text}");
        assert!(
            text.contains("errors       1: payload_mismatch 1"),
            "{text}"
        );
        let header = text.lines().find(|l| l.contains("latency")).unwrap();
        for label in ["p50", "p90", "p99", "p99.9", "p99.99", "max"] {
            assert!(header.contains(label), "{header}");
        }
        let row = text
            .lines()
            .find(|l| l.trim_start().starts_with("echo_rtt"))
            .unwrap();
        assert!(
            row.contains("10000") && row.contains("5.00ms") && row.contains("10.01ms"),
            "{row}"
        );
        assert!(text.contains("note: closed loop"), "{text}");
    }

    #[test]
    fn open_loop_shortfall_is_called_out() {
        let text = report(&["-d", "2s", "--rate", "50000"], &sample_recorder()).text();
        assert!(text.contains("achieved 5000 of the 50000 msg/s"), "{text}");
    }
}
