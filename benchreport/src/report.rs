//! The figures of each scenario, their medians over rounds, and the markdown tables.

use std::fmt::Write as _;

use crate::data::Sample;

/// Reference target for the ratio columns.
pub(crate) const REFERENCE: &str = "nginx";
/// The bare forwarder (`floor/`): what any proxy pays on this machine. Scenarios it ran in get
/// a second ratio column, each figure divided by the floor's.
pub(crate) const FLOOR: &str = "floor";

/// How a figure is taken from one sample.
type Extract = fn(&Sample) -> Option<f64>;

/// One column of a scenario table.
pub(crate) struct Figure {
    /// Column header.
    pub(crate) name: &'static str,
    /// Takes the figure from one run.
    pub(crate) extract: Extract,
    /// Whether ratio columns (to nginx, and to the floor where it ran) follow it.
    pub(crate) ratio: bool,
}

/// One scenario: its key in `runs.json`, its heading, and its columns.
pub(crate) struct Scenario {
    /// `runs.json` scenario key.
    pub(crate) key: &'static str,
    /// Section heading in the report.
    pub(crate) title: &'static str,
    /// What the figures mean, printed under the heading.
    pub(crate) note: &'static str,
    /// Columns.
    pub(crate) figures: Vec<Figure>,
}

fn pct(s: &Sample, hist: &str, p: f64) -> Option<f64> {
    s.run.as_ref()?.percentile(hist, p)
}

pub(crate) fn msgs_per_s(s: &Sample) -> Option<f64> {
    s.run.as_ref().map(|r| r.summary.messages_per_s)
}

fn errors(s: &Sample) -> Option<f64> {
    s.run.as_ref().map(|r| r.summary.errors_total)
}

/// Proxy CPU seconds per million verified echoes. The CPU time spans loadgen's whole run,
/// warmup included, so every echo of the run counts, not only the measured ones.
pub(crate) fn cpu_per_million(s: &Sample) -> Option<f64> {
    let summary = &s.run.as_ref()?.summary;
    let messages = summary.messages + summary.unmeasured_messages;
    let cpu = s.entry.proxy_cpu_s?;
    (messages > 0.0).then(|| cpu / messages * 1e6)
}

/// Growth from `before` to `during` (KiB) per connection `s` held, bytes.
fn growth_per_connection(s: &Sample, before: Option<f64>, during: Option<f64>) -> Option<f64> {
    let conns = s.run.as_ref()?.summary.connections_opened;
    let growth = during? - before?;
    (conns > 0.0).then(|| growth * 1024.0 / conns)
}

/// Proxy PSS growth per held connection, bytes.
fn bytes_per_connection(s: &Sample) -> Option<f64> {
    growth_per_connection(s, s.entry.pss_before_kib, s.entry.pss_during_kib)
}

/// The machine's kernel slab growth per held connection, bytes: every socket of the
/// connection (loadgen's, the proxy's two, the backend's) and what waits on them.
fn slab_per_connection(s: &Sample) -> Option<f64> {
    growth_per_connection(s, s.entry.slab_before_kib, s.entry.slab_during_kib)
}

fn echo_figures() -> Vec<Figure> {
    vec![
        Figure {
            name: "msgs/s",
            extract: msgs_per_s,
            ratio: true,
        },
        Figure {
            name: "proxy CPU-s per M msgs",
            extract: cpu_per_million,
            ratio: true,
        },
        Figure {
            name: "RTT p50 µs",
            extract: |s| pct(s, "echo_rtt", 50.0),
            ratio: true,
        },
        Figure {
            name: "RTT p99 µs",
            extract: |s| pct(s, "echo_rtt", 99.0),
            ratio: true,
        },
        Figure {
            name: "RTT p99.9 µs",
            extract: |s| pct(s, "echo_rtt", 99.9),
            ratio: true,
        },
        Figure {
            name: "errors",
            extract: errors,
            ratio: false,
        },
    ]
}

fn open_loop_figures() -> Vec<Figure> {
    vec![
        Figure {
            name: "msgs/s",
            extract: msgs_per_s,
            ratio: false,
        },
        Figure {
            name: "p50 µs",
            extract: |s| pct(s, "echo_rtt", 50.0),
            ratio: true,
        },
        Figure {
            name: "p99 µs",
            extract: |s| pct(s, "echo_rtt", 99.0),
            ratio: true,
        },
        Figure {
            name: "p99.9 µs",
            extract: |s| pct(s, "echo_rtt", 99.9),
            ratio: true,
        },
        Figure {
            name: "proxy CPU-s per M msgs",
            extract: cpu_per_million,
            ratio: true,
        },
        Figure {
            name: "errors",
            extract: errors,
            ratio: false,
        },
    ]
}

fn close_figures() -> Vec<Figure> {
    vec![
        Figure {
            name: "reply p50 µs",
            extract: |s| pct(s, "close_reply", 50.0),
            ratio: true,
        },
        Figure {
            name: "reply p99 µs",
            extract: |s| pct(s, "close_reply", 99.0),
            ratio: true,
        },
        Figure {
            name: "reply p99.9 µs",
            extract: |s| pct(s, "close_reply", 99.9),
            ratio: true,
        },
        Figure {
            name: "eof p50 µs",
            extract: |s| pct(s, "close_eof", 50.0),
            ratio: true,
        },
        Figure {
            name: "eof p99 µs",
            extract: |s| pct(s, "close_eof", 99.0),
            ratio: true,
        },
        Figure {
            name: "eof p99.9 µs",
            extract: |s| pct(s, "close_eof", 99.9),
            ratio: true,
        },
        Figure {
            name: "errors",
            extract: errors,
            ratio: false,
        },
    ]
}

fn round_trip_figures() -> Vec<Figure> {
    vec![
        Figure {
            name: "RTT p50 µs",
            extract: |s| pct(s, "echo_rtt", 50.0),
            ratio: true,
        },
        Figure {
            name: "RTT p99 µs",
            extract: |s| pct(s, "echo_rtt", 99.0),
            ratio: true,
        },
        Figure {
            name: "RTT p99.9 µs",
            extract: |s| pct(s, "echo_rtt", 99.9),
            ratio: true,
        },
        Figure {
            name: "msgs/s",
            extract: msgs_per_s,
            ratio: true,
        },
        Figure {
            name: "proxy CPU-s per M msgs",
            extract: cpu_per_million,
            ratio: true,
        },
        Figure {
            name: "errors",
            extract: errors,
            ratio: false,
        },
    ]
}

/// Every scenario the report knows, in report order. Scenarios without runs are skipped.
#[expect(
    clippy::too_many_lines,
    reason = "one declarative list of every scenario's columns reads best in one place"
)]
pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            key: "echo-20",
            title: "Throughput: closed-loop echo, 100 connections x 20 B",
            note: "Client and backend share CPU 0, so msgs/s saturates near the direct figure; \
                   proxy CPU-seconds per million messages is the figure to compare.",
            figures: echo_figures(),
        },
        Scenario {
            key: "echo-16k",
            title: "Throughput: closed-loop echo, 100 connections x 16 KiB",
            note: "Here the proxy is the bottleneck.",
            figures: echo_figures(),
        },
        Scenario {
            key: "open-50",
            title: "Latency under load: open loop at 50% of the slowest proxy's capacity",
            note: "Latency from each message's intended send time (coordinated omission corrected).",
            figures: open_loop_figures(),
        },
        Scenario {
            key: "open-90",
            title: "Latency under load: open loop at 90% of the slowest proxy's capacity",
            note: "Latency from each message's intended send time (coordinated omission corrected).",
            figures: open_loop_figures(),
        },
        Scenario {
            key: "close",
            title: "Close handshake",
            note: "reply: from the write of our Close (when it was submitted) to the peer's Close; \
                   eof: to its TCP close. \
                   Much of a proxy's added time is the wake-up of the other CPU in this VM, \
                   so compare ratios and the time added over direct; the one-CPU table below \
                   has no such wake-up.",
            figures: close_figures(),
        },
        Scenario {
            key: "close-1cpu",
            title: "Close handshake, proxy, client and backend on one CPU",
            note: "As above, with the proxy on CPU 0 beside loadgen and the backend: no \
                   cross-CPU wake-up hides the proxy's own path.",
            figures: close_figures(),
        },
        Scenario {
            key: "rtt-1",
            title: "Round trip: closed-loop echo, one connection x 20 B",
            note: "One message in flight at a time: the latency of the path itself, \
                   including the wake-up of the proxy's CPU.",
            figures: round_trip_figures(),
        },
        Scenario {
            key: "rtt-1-1cpu",
            title: "Round trip, proxy, client and backend on one CPU",
            note: "As above, with the proxy on CPU 0 beside loadgen and the backend: no \
                   cross-CPU wake-up hides the proxy's own path.",
            figures: round_trip_figures(),
        },
        Scenario {
            key: "connect",
            title: "Connection setup",
            note: "Connect, upgrade and close in a closed loop.",
            figures: vec![
                Figure {
                    name: "handshakes/s",
                    extract: |s| s.run.as_ref().map(|r| r.summary.handshakes_per_s),
                    ratio: true,
                },
                Figure {
                    name: "upgrade p50 µs",
                    extract: |s| pct(s, "connect_upgrade", 50.0),
                    ratio: true,
                },
                Figure {
                    name: "upgrade p99 µs",
                    extract: |s| pct(s, "connect_upgrade", 99.0),
                    ratio: true,
                },
                Figure {
                    name: "errors",
                    extract: errors,
                    ratio: false,
                },
            ],
        },
        Scenario {
            key: "idle",
            title: "Memory: idle proxied connections",
            note: "PSS of the proxy process (all its processes for nginx) before and while \
                   loadgen holds the connections; the machine's unreclaimable kernel slab \
                   (`SUnreclaim`) before and late in the hold, after idle reads were parked, \
                   per connection, and what a proxy adds to direct's.",
            figures: vec![
                Figure {
                    name: "connections",
                    extract: |s| s.run.as_ref().map(|r| r.summary.connections_opened),
                    ratio: false,
                },
                Figure {
                    name: "PSS held KiB",
                    extract: |s| s.entry.pss_during_kib,
                    ratio: true,
                },
                Figure {
                    name: "bytes per connection",
                    extract: bytes_per_connection,
                    ratio: true,
                },
                Figure {
                    name: "kernel slab per connection B",
                    extract: slab_per_connection,
                    ratio: true,
                },
                Figure {
                    name: "errors",
                    extract: errors,
                    ratio: false,
                },
            ],
        },
    ]
}

/// Median of `values` (mean of the middle two for an even count); none if empty.
pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        f64::midpoint(values[mid - 1], values[mid])
    } else {
        values[mid]
    })
}

/// Median over rounds of `extract` for one target in one scenario.
pub(crate) fn median_of(
    samples: &[Sample],
    scenario: &str,
    target: &str,
    extract: Extract,
) -> Option<f64> {
    let mut values: Vec<f64> = samples
        .iter()
        .filter(|s| s.entry.scenario == scenario && s.entry.target == target)
        .filter_map(extract)
        .collect();
    median(&mut values)
}

/// Targets in report order: direct, floor, gateway (io_uring, then epoll), nginx, haproxy, then
/// any other in the order it first appears in `runs.json`.
pub(crate) fn targets(samples: &[Sample]) -> Vec<String> {
    const ORDER: [&str; 6] = [
        "direct",
        "floor",
        "gateway",
        "gateway-epoll",
        "nginx",
        "haproxy",
    ];
    let mut out: Vec<String> = Vec::new();
    for s in samples {
        if !out.contains(&s.entry.target) {
            out.push(s.entry.target.clone());
        }
    }
    out.sort_by_key(|t| ORDER.iter().position(|o| o == t).unwrap_or(ORDER.len()));
    out
}

/// A figure for a table cell: thousands separators from 1,000 up, whole numbers as they are,
/// else one decimal from 10 and two below; `–` for a missing value.
pub(crate) fn format_value(v: Option<f64>) -> String {
    let Some(v) = v else { return "–".to_owned() };
    if !v.is_finite() {
        return "–".to_owned();
    }
    if v.abs() >= 1000.0 {
        let rounded = format!("{:.0}", v.abs());
        let mut grouped = String::new();
        for (i, c) in rounded.chars().enumerate() {
            if i > 0 && (rounded.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `value / reference` as `0.62x`; `–` when either is missing or the reference is zero.
pub(crate) fn format_ratio(value: Option<f64>, reference: Option<f64>) -> String {
    match (value, reference) {
        (Some(v), Some(r)) if r != 0.0 && v.is_finite() && r.is_finite() => {
            format!("{:.2}x", v / r)
        }
        _ => "–".to_owned(),
    }
}

/// Figures shown as what a proxy adds over `direct` (the median over rounds of the target's
/// figure minus direct's in the same round), by scenario: the round trips, where much of the
/// absolute time is not the proxy's.
fn added_over_direct(scenario: &str) -> Option<Figure> {
    match scenario {
        "close" | "close-1cpu" => Some(Figure {
            name: "reply p50 added over direct µs",
            extract: |s| pct(s, "close_reply", 50.0),
            ratio: true,
        }),
        "rtt-1" | "rtt-1-1cpu" => Some(Figure {
            name: "RTT p50 added over direct µs",
            extract: |s| pct(s, "echo_rtt", 50.0),
            ratio: true,
        }),
        "idle" => Some(Figure {
            name: "kernel slab added over direct B",
            extract: slab_per_connection,
            ratio: true,
        }),
        _ => None,
    }
}

/// Median of a figure for `target`, or with `minus_direct` of its excess over direct's.
fn cell(
    samples: &[Sample],
    scenario: &str,
    target: &str,
    f: &Figure,
    minus_direct: bool,
) -> Option<f64> {
    if minus_direct {
        paired_excess(samples, scenario, target, f.extract)
    } else {
        median_of(samples, scenario, target, f.extract)
    }
}

/// Median over rounds of `target`'s figure minus direct's in the same round. The machine
/// drifts by more than a proxy adds over minutes (direct's own close reply ranged from 33 to
/// 116 µs within one session), and a round runs its targets within seconds of each other, so
/// pairs cancel most of the drift that a difference of two medians keeps.
pub(crate) fn paired_excess(
    samples: &[Sample],
    scenario: &str,
    target: &str,
    extract: Extract,
) -> Option<f64> {
    let of = |t: &str, round: u32| {
        samples
            .iter()
            .filter(|s| s.entry.scenario == scenario && s.entry.target == t)
            .filter(|s| s.entry.round == round)
            .find_map(extract)
    };
    let mut values: Vec<f64> = samples
        .iter()
        .filter(|s| s.entry.scenario == scenario && s.entry.target == target)
        .filter_map(|s| Some(extract(s)? - of("direct", s.entry.round)?))
        .collect();
    median(&mut values)
}

/// Markdown table of one scenario: rows = targets with runs in it, columns = its figures
/// (medians over rounds), each followed where that makes sense by its ratios to nginx and to
/// the floor, for those of the two that ran in this scenario.
pub(crate) fn scenario_table(samples: &[Sample], scenario: &Scenario) -> Option<String> {
    let targets: Vec<String> = targets(samples)
        .into_iter()
        .filter(|t| {
            samples
                .iter()
                .any(|s| s.entry.scenario == scenario.key && &s.entry.target == t)
        })
        .collect();
    if targets.is_empty() {
        return None;
    }
    // A ratio column only for a reference that ran here (a smoke run may lack nginx).
    let references: Vec<&str> = [REFERENCE, FLOOR]
        .into_iter()
        .filter(|r| targets.iter().any(|t| t == r))
        .collect();
    let rounds = samples
        .iter()
        .filter(|s| s.entry.scenario == scenario.key)
        .map(|s| s.entry.round)
        .max()
        .unwrap_or(0);
    let added = added_over_direct(scenario.key);
    let columns: Vec<(&Figure, bool)> = scenario
        .figures
        .iter()
        .map(|f| (f, false))
        .chain(added.iter().map(|f| (f, true)))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### {}\n\n{} Medians over {rounds} round(s).\n",
        scenario.title, scenario.note
    );
    let mut header = String::from("| target |");
    let mut rule = String::from("| --- |");
    for (f, _) in &columns {
        let _ = write!(header, " {} |", f.name);
        rule.push_str(" ---: |");
        if f.ratio {
            for reference in &references {
                let _ = write!(header, " ÷ {reference} |");
                rule.push_str(" ---: |");
            }
        }
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for t in &targets {
        let _ = write!(out, "| {t} |");
        for &(f, minus_direct) in &columns {
            let v = cell(samples, scenario.key, t, f, minus_direct);
            let _ = write!(out, " {} |", format_value(v));
            if f.ratio {
                for reference in &references {
                    let r = cell(samples, scenario.key, reference, f, minus_direct);
                    let _ = write!(out, " {} |", format_ratio(v, r));
                }
            }
        }
        out.push('\n');
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{LoadgenRun, RunEntry};

    fn sample(target: &str, round: u32, msgs_per_s: f64, cpu: Option<f64>) -> Sample {
        let json = format!(
            r#"{{"summary": {{"connections_opened": 100, "messages": {m}, "messages_per_s": {msgs_per_s},
                "handshakes_per_s": 0, "errors_total": 0}},
               "histograms": {{"echo_rtt": {{"count": 10, "percentiles": [
                   {{"percentile": 50.0, "value_us": {p50}}}, {{"percentile": 99.0, "value_us": 900}},
                   {{"percentile": 99.9, "value_us": {p999}}}]}}}}}}"#,
            m = msgs_per_s * 10.0,
            p50 = msgs_per_s / 1000.0,
            p999 = msgs_per_s / 50.0,
        );
        Sample {
            entry: RunEntry {
                target: target.to_owned(),
                scenario: "echo-20".to_owned(),
                round,
                file: String::new(),
                proxy_cpu_s: cpu,
                pss_before_kib: None,
                pss_during_kib: None,
                slab_before_kib: None,
                slab_during_kib: None,
            },
            run: Some(LoadgenRun::parse(&json).unwrap()),
        }
    }

    #[test]
    fn cpu_counts_warmup_echoes_too() {
        // The proxy's CPU seconds span loadgen's whole run: 2 s of it for 1,000,000 measured
        // and 250,000 warmup echoes is 1.6 s per million, not 2.
        let json = r#"{"summary": {"connections_opened": 100, "messages": 1000000,
            "unmeasured_messages": 250000, "messages_per_s": 125000, "handshakes_per_s": 0,
            "errors_total": 0}}"#;
        let mut s = sample("gateway", 1, 0.0, Some(2.0));
        s.run = Some(LoadgenRun::parse(json).unwrap());
        let cpu = cpu_per_million(&s).unwrap();
        assert!((cpu - 1.6).abs() < 1e-9, "{cpu}");
    }

    #[test]
    fn formats_values() {
        assert_eq!(format_value(None), "–");
        assert_eq!(format_value(Some(f64::NAN)), "–");
        assert_eq!(format_value(Some(56_512.4)), "56,512");
        assert_eq!(format_value(Some(1_234_567.0)), "1,234,567");
        assert_eq!(format_value(Some(1000.0)), "1,000");
        assert_eq!(format_value(Some(-4321.0)), "-4,321");
        assert_eq!(format_value(Some(999.94)), "999.9");
        assert_eq!(format_value(Some(16.25)), "16.2");
        assert_eq!(format_value(Some(0.5)), "0.50");
        assert_eq!(format_value(Some(900.0)), "900");
        assert_eq!(format_value(Some(0.0)), "0");
    }

    #[test]
    fn formats_ratios() {
        assert_eq!(format_ratio(Some(10.0), Some(16.2)), "0.62x");
        assert_eq!(format_ratio(Some(16.2), Some(16.2)), "1.00x");
        assert_eq!(format_ratio(Some(1.0), Some(0.0)), "–");
        assert_eq!(format_ratio(None, Some(1.0)), "–");
        assert_eq!(format_ratio(Some(1.0), None), "–");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0]), Some(3.0));
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn table_has_medians_and_ratios_to_nginx() {
        let samples = vec![
            sample("direct", 1, 60_000.0, None),
            sample("nginx", 1, 50_000.0, Some(8.0)),
            sample("gateway", 1, 55_000.0, Some(3.3)),
            sample("nginx", 2, 56_000.0, Some(9.0)),
            sample("gateway", 2, 57_000.0, Some(3.42)),
            sample("nginx", 3, 54_000.0, Some(10.0)),
            sample("gateway", 3, 56_000.0, Some(3.36)),
        ];
        let scenario = scenarios()
            .into_iter()
            .find(|s| s.key == "echo-20")
            .unwrap();
        let table = scenario_table(&samples, &scenario).unwrap();
        assert!(table.contains("Medians over 3 round(s)"), "{table}");
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
            .collect();
        assert_eq!(
            rows[0],
            "| target | msgs/s | ÷ nginx | proxy CPU-s per M msgs | ÷ nginx | RTT p50 µs | ÷ nginx | RTT p99 µs | ÷ nginx | RTT p99.9 µs | ÷ nginx | errors |"
        );
        // direct: no proxy CPU; 60k / 54k (nginx median).
        assert_eq!(
            rows[1],
            "| direct | 60,000 | 1.11x | – | – | 60 | 1.11x | 900 | 1.00x | 1,200 | 1.11x | 0 |"
        );
        // nginx: 8/500k, 9/560k, 10/540k per M -> 16.0, 16.07, 18.5: median 16.07.
        assert_eq!(
            rows[3],
            "| nginx | 54,000 | 1.00x | 16.1 | 1.00x | 54 | 1.00x | 900 | 1.00x | 1,080 | 1.00x | 0 |"
        );
        // gateway: 6.0 per M in every round.
        assert_eq!(
            rows[2],
            "| gateway | 56,000 | 1.04x | 6 | 0.37x | 56 | 1.04x | 900 | 1.00x | 1,120 | 1.04x | 0 |"
        );
        assert!(scenario_table(&samples, &scenarios()[4]).is_none());
    }

    #[test]
    fn added_over_direct_pairs_each_round_with_its_own_direct() {
        let close = |target: &str, round: u32, p50: u32| {
            let json = format!(
                r#"{{"summary": {{"connections_opened": 10, "messages": 0, "messages_per_s": 0,
                    "handshakes_per_s": 0, "errors_total": 0}},
                   "histograms": {{"close_reply": {{"count": 10, "percentiles": [
                       {{"percentile": 50.0, "value_us": {p50}}}]}}}}}}"#
            );
            let mut s = sample(target, round, 0.0, None);
            s.entry.scenario = "close".to_owned();
            s.run = Some(LoadgenRun::parse(&json).unwrap());
            s
        };
        // The machine slows down over three rounds; the gateway adds 10, 12 and 14 µs.
        let samples = vec![
            close("direct", 1, 30),
            close("gateway", 1, 40),
            close("direct", 2, 90),
            close("gateway", 2, 102),
            close("direct", 3, 100),
            close("gateway", 3, 114),
        ];
        let p50 = |s: &Sample| pct(s, "close_reply", 50.0);
        assert_eq!(paired_excess(&samples, "close", "gateway", p50), Some(12.0));
        // The difference of the medians would say 12 too here, but not once a round is lost:
        let partial: Vec<Sample> = samples
            .into_iter()
            .filter(|s| !(s.entry.target == "gateway" && s.entry.round == 2))
            .collect();
        assert_eq!(paired_excess(&partial, "close", "gateway", p50), Some(12.0));
        let unpaired = median_of(&partial, "close", "gateway", p50).unwrap()
            - median_of(&partial, "close", "direct", p50).unwrap();
        assert!((unpaired - 12.0).abs() > 20.0, "{unpaired}");
        // A round without direct gives no pair.
        assert_eq!(paired_excess(&partial[1..2], "close", "gateway", p50), None);
    }

    #[test]
    fn close_table_shows_time_added_over_direct() {
        let close = |target: &str, p50: u32| {
            let json = format!(
                r#"{{"summary": {{"connections_opened": 10, "messages": 0, "messages_per_s": 0,
                    "handshakes_per_s": 0, "errors_total": 0}},
                   "histograms": {{"close_reply": {{"count": 10, "percentiles": [
                       {{"percentile": 50.0, "value_us": {p50}}}]}}}}}}"#
            );
            let mut s = sample(target, 1, 0.0, None);
            s.entry.scenario = "close".to_owned();
            s.run = Some(LoadgenRun::parse(&json).unwrap());
            s
        };
        let samples = vec![
            close("direct", 30),
            close("gateway", 100),
            close("nginx", 200),
        ];
        let scenario = scenarios().into_iter().find(|s| s.key == "close").unwrap();
        let table = scenario_table(&samples, &scenario).unwrap();
        assert!(
            table.contains("reply p50 added over direct µs | ÷ nginx |"),
            "{table}"
        );
        // gateway adds 70 µs, nginx 170 µs: 0.41x.
        let gateway = table.lines().find(|l| l.starts_with("| gateway")).unwrap();
        assert!(gateway.ends_with("| 70 | 0.41x |"), "{gateway}");
        let direct = table.lines().find(|l| l.starts_with("| direct")).unwrap();
        assert!(direct.ends_with("| 0 | 0.00x |"), "{direct}");
    }

    /// A one-connection round trip sample of `target` with RTT p50 `p50` µs.
    pub(crate) fn round_trip(scenario: &str, target: &str, p50: u32, cpu: Option<f64>) -> Sample {
        let json = format!(
            r#"{{"summary": {{"connections_opened": 1, "messages": 1000, "messages_per_s": 1000,
                "handshakes_per_s": 0, "errors_total": 0}},
               "histograms": {{"echo_rtt": {{"count": 1000, "percentiles": [
                   {{"percentile": 50.0, "value_us": {p50}}}]}}}}}}"#
        );
        let mut s = sample(target, 1, 0.0, cpu);
        s.entry.scenario = scenario.to_owned();
        s.run = Some(LoadgenRun::parse(&json).unwrap());
        s
    }

    #[test]
    fn tables_with_floor_runs_add_a_ratio_to_the_floor() {
        let samples = vec![
            round_trip("rtt-1-1cpu", "direct", 20, None),
            round_trip("rtt-1-1cpu", "floor", 30, Some(0.01)),
            round_trip("rtt-1-1cpu", "gateway", 45, Some(0.02)),
            round_trip("rtt-1-1cpu", "nginx", 60, Some(0.04)),
        ];
        let scenario = scenarios()
            .into_iter()
            .find(|s| s.key == "rtt-1-1cpu")
            .unwrap();
        let table = scenario_table(&samples, &scenario).unwrap();
        let header = table.lines().find(|l| l.starts_with("| target")).unwrap();
        assert!(
            header.starts_with("| target | RTT p50 µs | ÷ nginx | ÷ floor | RTT p99 µs |"),
            "{header}"
        );
        assert!(
            header.ends_with("| RTT p50 added over direct µs | ÷ nginx | ÷ floor |"),
            "{header}"
        );
        // The floor is a row of its own, right after direct.
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ")).collect();
        assert!(rows[2].starts_with("| direct |") && rows[3].starts_with("| floor |"));
        // gateway: 45 µs is 0.75x nginx's 60 and 1.5x the floor's 30; it adds 25 µs over
        // direct, 0.62x of nginx's 40 and 2.5x the floor's 10.
        let gateway = table.lines().find(|l| l.starts_with("| gateway")).unwrap();
        assert!(
            gateway.starts_with("| gateway | 45 | 0.75x | 1.50x |"),
            "{gateway}"
        );
        assert!(gateway.ends_with("| 25 | 0.62x | 2.50x |"), "{gateway}");
        // CPU per million: 0.02 s over 1000 messages vs the floor's 0.01.
        assert!(gateway.contains("| 20 | 0.50x | 2.00x |"), "{gateway}");
        let floor = table.lines().find(|l| l.starts_with("| floor")).unwrap();
        assert!(
            floor.starts_with("| floor | 30 | 0.50x | 1.00x |"),
            "{floor}"
        );
    }

    #[test]
    fn bytes_per_connection_from_pss() {
        let mut s = sample("haproxy", 1, 0.0, None);
        s.entry.pss_before_kib = Some(1000.0);
        s.entry.pss_during_kib = Some(1100.0);
        // 100 KiB over 100 connections.
        assert_eq!(bytes_per_connection(&s), Some(1024.0));
        s.entry.pss_during_kib = None;
        assert_eq!(bytes_per_connection(&s), None);
    }

    #[test]
    fn idle_table_shows_kernel_slab_added_over_direct() {
        let idle = |target: &str, slab_kib: f64, pss: bool| {
            let mut s = sample(target, 1, 0.0, None);
            s.entry.scenario = "idle".to_owned();
            s.entry.slab_before_kib = Some(50_000.0);
            s.entry.slab_during_kib = Some(50_000.0 + slab_kib);
            if pss {
                s.entry.pss_before_kib = Some(1000.0);
                s.entry.pss_during_kib = Some(1100.0);
            }
            s
        };
        // 100 connections: direct 200 KiB of slab (2,048 B each), nginx 800, the gateway 750.
        let samples = vec![
            idle("direct", 200.0, false),
            idle("nginx", 800.0, true),
            idle("gateway", 750.0, true),
        ];
        let idle_scenario = scenarios().into_iter().find(|s| s.key == "idle").unwrap();
        let table = scenario_table(&samples, &idle_scenario).unwrap();
        let header = table.lines().find(|l| l.starts_with("| target")).unwrap();
        assert!(
            header.ends_with(
                "| kernel slab per connection B | ÷ nginx | errors \
                 | kernel slab added over direct B | ÷ nginx |"
            ),
            "{header}"
        );
        // The gateway: 7,680 B per connection, 5,632 over direct's 2,048, 0.92x nginx's 6,144.
        let gateway = table.lines().find(|l| l.starts_with("| gateway")).unwrap();
        assert!(
            gateway.ends_with("| 7,680 | 0.94x | 0 | 5,632 | 0.92x |"),
            "{gateway}"
        );
        // Direct has no proxy, so no PSS.
        let direct = table.lines().find(|l| l.starts_with("| direct")).unwrap();
        assert!(direct.starts_with("| direct | 100 | – |"), "{direct}");
    }
}
