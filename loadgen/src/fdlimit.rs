//! The descriptor limit (`RLIMIT_NOFILE`), which caps how many connections one process holds.
//!
//! Read from `/proc/self/limits`. The soft limit is raised to the hard one with util-linux's
//! `prlimit` on our own pid when that tool exists: std has no `setrlimit`, and calling it
//! through `libc` would be the crate's only `unsafe`.

use std::process::{Command, Stdio};

/// Descriptors kept back for the rings, eventfds, stdio, the JSON file and slack, plus this
/// many per worker thread.
const RESERVED: u64 = 64;
const RESERVED_PER_CORE: u64 = 16;

/// `RLIMIT_NOFILE`; `u64::MAX` stands for unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdLimit {
    /// The limit in force.
    pub(crate) soft: u64,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub(crate) hard: u64,
}

fn parse(limits: &str) -> Option<FdLimit> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let value = |f: Option<&str>| match f? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some(FdLimit {
        soft: value(fields.next())?,
        hard: value(fields.next())?,
    })
}

impl FdLimit {
    /// The current limit, if `/proc` tells.
    pub(crate) fn current() -> Option<Self> {
        parse(&std::fs::read_to_string("/proc/self/limits").ok()?)
    }

    /// Tries to lift the soft limit to the hard one; returns the limit now in force.
    pub(crate) fn raised(self) -> Self {
        if self.soft >= self.hard {
            return self;
        }
        let hard = if self.hard == u64::MAX {
            "unlimited".to_owned()
        } else {
            self.hard.to_string()
        };
        let ok = Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Self::current().unwrap_or(self)
        } else {
            self
        }
    }

    /// How many connections fit beside what the process itself needs.
    pub(crate) fn max_connections(self, cores: usize) -> u64 {
        self.soft
            .saturating_sub(RESERVED + RESERVED_PER_CORE * cores as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 20000                files
Max locked memory         8388608              8388608              bytes
";

    #[test]
    fn parses_proc_limits() {
        assert_eq!(
            parse(SAMPLE),
            Some(FdLimit {
                soft: 1024,
                hard: 20000
            })
        );
        let unlimited = SAMPLE.replace("1024                 20000", "unlimited unlimited");
        assert_eq!(parse(&unlimited).unwrap().hard, u64::MAX);
        assert_eq!(parse("nothing here"), None);
    }

    #[test]
    fn reserves_descriptors_for_the_process() {
        let l = FdLimit {
            soft: 20_000,
            hard: 20_000,
        };
        assert_eq!(l.max_connections(2), 20_000 - 64 - 32);
        assert_eq!(FdLimit { soft: 10, hard: 10 }.max_connections(1), 0);
        // This process's own limit is readable on Linux.
        assert!(FdLimit::current().is_some_and(|l| l.soft <= l.hard));
    }
}
