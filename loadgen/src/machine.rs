//! Where a result was measured: CPU, core count, kernel and source revision, so numbers in
//! `bench-results/` can be compared (or not) later.

use std::process::{Command, Stdio};

use serde::Serialize;

/// The machine a run happened on.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    /// `model name` from `/proc/cpuinfo`.
    pub(crate) cpu_model: Option<String>,
    /// CPUs this process may run on.
    pub(crate) cpus: usize,
    /// `/proc/sys/kernel/osrelease`.
    pub(crate) kernel: Option<String>,
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

impl Machine {
    /// Describes this machine; fields that cannot be read are `None`.
    pub(crate) fn current() -> Self {
        Self {
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| cpu_model(&s)),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_owned()),
        }
    }
}

/// `git rev-parse --short HEAD` in the current directory, if that works.
pub(crate) fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !rev.is_empty()).then_some(rev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_model_line() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n";
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 9B14"));
        assert_eq!(cpu_model("processor : 0\n"), None);
        let m = Machine::current();
        assert!(m.cpus >= 1);
        assert!(m.kernel.is_some(), "Linux exposes osrelease");
    }
}
