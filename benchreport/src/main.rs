//! `benchreport RUN_DIR`: turns a `scripts/bench` run directory into `RUN_DIR/report.md` with
//! one table per scenario (medians over rounds, ratios to nginx and to the bare forwarder
//! `floor`) and SVG charts under
//! `RUN_DIR/charts/`, and copies the report to `latest.md` in the directory above `RUN_DIR`
//! (`bench-results/latest.md`) with the chart links adjusted.

mod charts;
mod data;
mod report;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use data::Sample;
use report::{median_of, scenarios, targets};

/// A chart written under `charts/`, with the scenario whose table it follows and its caption.
struct Chart {
    scenario: &'static str,
    file: String,
    caption: String,
}

fn write_charts(dir: &Path, samples: &[Sample]) -> Result<Vec<Chart>, Box<dyn std::error::Error>> {
    let chart_dir = dir.join("charts");
    fs::create_dir_all(&chart_dir)?;
    let mut out = Vec::new();
    let latency = [
        (
            "close",
            "close_reply",
            "Close handshake: our Close to the peer's Close",
        ),
        (
            "close",
            "close_eof",
            "Close handshake: our Close to the peer's TCP close",
        ),
        (
            "close-1cpu",
            "close_reply",
            "Close handshake on one CPU: our Close to the peer's Close",
        ),
        ("rtt-1", "echo_rtt", "Round trip, one connection x 20 B"),
        (
            "rtt-1-1cpu",
            "echo_rtt",
            "Round trip on one CPU, one connection x 20 B",
        ),
        (
            "connect",
            "connect_upgrade",
            "Connection setup: connect + upgrade",
        ),
        (
            "open-50",
            "echo_rtt",
            "Open-loop echo at 50% of the slowest proxy's capacity",
        ),
        (
            "open-90",
            "echo_rtt",
            "Open-loop echo at 90% of the slowest proxy's capacity",
        ),
    ];
    for (scenario, hist, title) in latency {
        let file = format!("{scenario}-{hist}.svg");
        if charts::percentile_chart(&chart_dir.join(&file), title, samples, scenario, hist)? {
            out.push(Chart {
                scenario,
                file,
                caption: title.to_owned(),
            });
        }
    }
    for (scenario, label) in [("echo-20", "100 x 20 B"), ("echo-16k", "100 x 16 KiB")] {
        let figures = [
            (
                "msgs",
                "msgs/s",
                "Throughput",
                report::msgs_per_s as fn(&Sample) -> Option<f64>,
            ),
            (
                "cpu",
                "proxy CPU-s per M msgs",
                "Proxy CPU per million messages",
                report::cpu_per_million,
            ),
        ];
        for (short, y_desc, what, extract) in figures {
            let bars: Vec<(String, f64)> = targets(samples)
                .into_iter()
                .filter_map(|t| median_of(samples, scenario, &t, extract).map(|v| (t, v)))
                .collect();
            let file = format!("{scenario}-{short}.svg");
            let title = format!("{what}, closed-loop echo {label}");
            if charts::bar_chart(&chart_dir.join(&file), &title, y_desc, &bars)? {
                out.push(Chart {
                    scenario,
                    file,
                    caption: title,
                });
            }
        }
    }
    Ok(out)
}

/// The report body; chart links are prefixed with `link_prefix`.
fn render(dir: &Path, samples: &[Sample], charts: &[Chart], link_prefix: &str) -> String {
    let name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmark: gateway vs nginx vs HAProxy vs floor vs direct ({name})\n\n\
         Written by `scripts/bench` and `benchreport`; do not edit by hand. Every loadgen JSON, \
         config, command line and version is in `{name}/`. Each figure is the median over the \
         rounds, and a figure added over direct the median of its differences to direct's in \
         the same round; `÷ nginx` is the figure divided by nginx's, `÷ floor` by the \
         floor's: `floor` is a bare epoll byte forwarder (one recv and one send per message, \
         nothing parsed), the least any proxy pays here.\n"
    );
    for scenario in scenarios() {
        if let Some(table) = report::scenario_table(samples, &scenario) {
            let _ = writeln!(out, "{table}");
            for chart in charts.iter().filter(|c| c.scenario == scenario.key) {
                let _ = writeln!(
                    out,
                    "![{}]({link_prefix}charts/{})\n",
                    chart.caption, chart.file
                );
            }
        }
    }
    if let Ok(env) = fs::read_to_string(dir.join("environment.md")) {
        let _ = writeln!(out, "## Machine, versions and placement\n\n{env}");
    }
    out
}

fn run(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let samples = data::load(dir)?;
    let charts = write_charts(dir, &samples)?;
    let report = dir.join("report.md");
    fs::write(&report, render(dir, &samples, &charts, ""))?;
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
        let prefix = format!("{}/", name.to_string_lossy());
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        fs::write(
            parent.join("latest.md"),
            render(dir, &samples, &charts, &prefix),
        )?;
    }
    Ok(report)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: benchreport RUN_DIR   (a directory written by scripts/bench)");
        return ExitCode::from(2);
    };
    match run(Path::new(dir.trim_end_matches('/'))) {
        Ok(report) => {
            println!("{}", report.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("benchreport: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::round_trip;

    #[test]
    fn each_chart_follows_its_own_scenario_only() {
        let samples = vec![
            round_trip("rtt-1", "direct", 20, None),
            round_trip("rtt-1-1cpu", "direct", 20, None),
            round_trip("rtt-1-1cpu", "floor", 30, None),
        ];
        let chart = |scenario: &'static str| Chart {
            scenario,
            file: format!("{scenario}-echo_rtt.svg"),
            caption: scenario.to_owned(),
        };
        let charts = [chart("rtt-1"), chart("rtt-1-1cpu")];
        let text = render(Path::new("run"), &samples, &charts, "");
        let one_cpu = text
            .find("### Round trip, proxy, client and backend on one CPU")
            .unwrap();
        let link = |scenario: &str| format!("(charts/{scenario}-echo_rtt.svg)");
        // "rtt-1-1cpu-..." starts with "rtt-1-": it must not also land under rtt-1.
        assert_eq!(text.matches(&link("rtt-1-1cpu")).count(), 1, "{text}");
        assert!(text.find(&link("rtt-1-1cpu")).unwrap() > one_cpu, "{text}");
        assert!(text.find(&link("rtt-1")).unwrap() < one_cpu, "{text}");
        // Without nginx in the runs, no column of dashes for it; the floor's ratio is there
        // where the floor ran.
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("| target")).collect();
        assert_eq!(headers.len(), 2, "{text}");
        assert!(headers.iter().all(|h| !h.contains("÷ nginx")), "{text}");
        assert!(
            !headers[0].contains("÷ floor") && headers[1].contains("÷ floor"),
            "{text}"
        );
    }
}
