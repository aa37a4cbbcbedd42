//! `benchreport RUN_DIR`: turns a `scripts/bench` run directory into `RUN_DIR/report.md` with
//! one table per scenario (medians over rounds, ratios to nginx) and SVG charts under
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

/// A chart written under `charts/`, with the caption it gets in the report.
struct Chart {
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
        "# Benchmark: gateway vs nginx vs HAProxy vs direct ({name})\n\n\
         Written by `scripts/bench` and `benchreport`; do not edit by hand. Every loadgen JSON, \
         config, command line and version is in `{name}/`. Each figure is the median over the \
         rounds; `÷ nginx` is the figure divided by nginx's.\n"
    );
    for scenario in scenarios() {
        if let Some(table) = report::scenario_table(samples, &scenario) {
            let _ = writeln!(out, "{table}");
            for chart in charts
                .iter()
                .filter(|c| c.file.starts_with(&format!("{}-", scenario.key)))
            {
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
