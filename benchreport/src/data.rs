//! What `scripts/bench` leaves in a run directory: `runs.json` (one entry per loadgen run, with
//! the proxy's CPU time and memory measured around it) and the loadgen `--json` files it names.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::Deserialize;

/// One loadgen run as recorded by `scripts/bench` in `runs.json`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RunEntry {
    /// `direct`, `floor`, `gateway`, `nginx`, `haproxy`.
    pub(crate) target: String,
    /// `echo-20`, `echo-16k`, `open-50`, `open-90`, `close`, `rtt-1`, `connect`, `idle`, and
    /// `close-1cpu`, `rtt-1-1cpu` (the proxy on the CPU of loadgen and the backend).
    pub(crate) scenario: String,
    /// 1-based round of the interleaved schedule.
    pub(crate) round: u32,
    /// The loadgen JSON, relative to the run directory.
    pub(crate) file: String,
    /// Proxy user+system CPU seconds over the run (none for `direct`).
    #[serde(default)]
    pub(crate) proxy_cpu_s: Option<f64>,
    /// Proxy PSS before the idle connections were opened, KiB.
    #[serde(default)]
    pub(crate) pss_before_kib: Option<f64>,
    /// Proxy PSS while the idle connections were held, KiB.
    #[serde(default)]
    pub(crate) pss_during_kib: Option<f64>,
    /// The kernel's unreclaimable slab (`/proc/meminfo` `SUnreclaim`, the whole machine)
    /// before the idle connections were opened, KiB.
    #[serde(default)]
    pub(crate) slab_before_kib: Option<f64>,
    /// The same late in the hold, once idle reads were parked, KiB.
    #[serde(default)]
    pub(crate) slab_during_kib: Option<f64>,
}

/// The part of a loadgen `--json` file the report uses.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct LoadgenRun {
    /// Counters over the measured window.
    pub(crate) summary: Summary,
    /// Latency histograms by name (`echo_rtt`, `close_reply`, ...).
    #[serde(default)]
    pub(crate) histograms: BTreeMap<String, Histogram>,
}

/// loadgen's `summary` object.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Summary {
    /// Connections that completed the upgrade.
    pub(crate) connections_opened: f64,
    /// Verified echoes in the measured window.
    pub(crate) messages: f64,
    /// Verified echoes outside it (ramp and warmup): the proxy's CPU time covers them too.
    #[serde(default)]
    pub(crate) unmeasured_messages: f64,
    /// Verified echoes per second.
    pub(crate) messages_per_s: f64,
    /// Connect+upgrade+close cycles per second.
    pub(crate) handshakes_per_s: f64,
    /// Every counted error.
    pub(crate) errors_total: f64,
}

/// One histogram: its percentile table.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Histogram {
    /// Samples recorded.
    pub(crate) count: f64,
    /// Percentile table, ascending.
    pub(crate) percentiles: Vec<Percentile>,
}

/// One row of a percentile table.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct Percentile {
    /// 50.0, 99.9, ... 100.0.
    pub(crate) percentile: f64,
    /// Value at that percentile, microseconds.
    pub(crate) value_us: f64,
}

impl Histogram {
    /// The value at percentile `p` (for example 99.9), if the table has that row.
    pub(crate) fn at(&self, p: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|row| (row.percentile - p).abs() < 1e-9)
            .map(|row| row.value_us)
    }
}

impl LoadgenRun {
    /// Parses a loadgen `--json` document.
    pub(crate) fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Value at percentile `p` of histogram `name`, if both exist and it has samples.
    pub(crate) fn percentile(&self, name: &str, p: f64) -> Option<f64> {
        self.histograms
            .get(name)
            .filter(|h| h.count > 0.0)
            .and_then(|h| h.at(p))
    }
}

/// A `runs.json` entry with its loadgen result (none if the file is missing or unreadable).
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// The index entry.
    pub(crate) entry: RunEntry,
    /// The parsed loadgen JSON.
    pub(crate) run: Option<LoadgenRun>,
}

/// Reads `runs.json` and every loadgen JSON it names. Unreadable loadgen files are reported on
/// stderr and kept as samples without a result, so one failed run leaves a gap, not no report.
pub(crate) fn load(dir: &Path) -> Result<Vec<Sample>, String> {
    let index = dir.join("runs.json");
    let text = fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
    let entries: Vec<RunEntry> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
    Ok(entries
        .into_iter()
        .map(|entry| {
            let path = dir.join(&entry.file);
            let run = fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| LoadgenRun::parse(&t).map_err(|e| e.to_string()));
            let run = match run {
                Ok(run) => Some(run),
                Err(e) => {
                    eprintln!("benchreport: {}: {e}", path.display());
                    None
                }
            };
            Sample { entry, run }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSE: &str = r#"{
        "tool": "loadgen",
        "parameters": {"scenario": "close"},
        "summary": {"connections_opened": 50, "messages": 0, "messages_per_s": 0.0,
                    "handshakes_per_s": 0.0, "errors_total": 0, "closes": 50},
        "histograms": {
            "close_reply": {"unit": "us", "count": 50, "min_us": 0,
                "percentiles": [{"percentile": 50.0, "value_us": 32},
                                {"percentile": 99.0, "value_us": 120},
                                {"percentile": 99.9, "value_us": 431},
                                {"percentile": 100.0, "value_us": 431}],
                "hdr_v2_deflate_base64": "HISTFAAAAEd4nC2I"},
            "empty": {"count": 0, "percentiles": [{"percentile": 50.0, "value_us": 0}]}
        }
    }"#;

    #[test]
    fn parses_percentiles_from_loadgen_json() {
        let run = LoadgenRun::parse(CLOSE).unwrap();
        assert_eq!(run.percentile("close_reply", 50.0), Some(32.0));
        assert_eq!(run.percentile("close_reply", 99.9), Some(431.0));
        assert_eq!(run.percentile("close_reply", 99.99), None);
        assert_eq!(run.percentile("close_eof", 50.0), None);
        // A histogram without samples has no percentiles worth reporting.
        assert_eq!(run.percentile("empty", 50.0), None);
        assert!((run.summary.connections_opened - 50.0).abs() < f64::EPSILON);
    }

    #[test]
    fn parses_runs_index_with_optional_fields() {
        let entries: Vec<RunEntry> = serde_json::from_str(
            r#"[{"target": "nginx", "scenario": "echo-20", "round": 2, "file": "a.json",
                 "proxy_cpu_s": 1.5},
                {"target": "direct", "scenario": "idle", "round": 1, "file": "b.json"}]"#,
        )
        .unwrap();
        assert_eq!(entries[0].round, 2);
        assert_eq!(entries[0].proxy_cpu_s, Some(1.5));
        assert_eq!(entries[1].pss_during_kib, None);
    }
}
