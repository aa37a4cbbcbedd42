//! Prometheus metrics: every metric name lives here, in one place.
//!
//! The hot path never allocates or locks: each core owns a [`CoreMetrics`] shard of relaxed
//! atomics in fixed tables (upgrade statuses, close codes, histogram buckets), aligned to
//! 128 bytes so no two cores ever write the same cache line (nor an adjacent-line prefetch
//! pair). Only [`Metrics::render`], on the admin thread, reads every shard and sums them.
//! Reads are not a snapshot across counters, which Prometheus tolerates; a histogram's
//! `_count` is derived from its buckets so the two always agree.
//!
//! Backend rows (connect failures, health) belong to the backend pools, which a reload
//! replaces: the gateway hands the renderer a [`BackendRows`] callback listing them instead of
//! registering them here, and can embed a [`BackendStats`] per backend to count into.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use codec::CloseCode;

use crate::relay::lifecycle::Side;
use crate::upstream::LocalError;

/// Accepted client connections not yet closed, per core (gauge).
pub(crate) const ACTIVE_CONNECTIONS: &str = "wsgate_active_connections";
/// Client connections accepted, per core (counter).
pub(crate) const CONNECTIONS: &str = "wsgate_connections_total";
/// Upgrade requests answered, by HTTP status (counter).
pub(crate) const UPGRADES: &str = "wsgate_upgrades_total";
/// Frames relayed, by direction (counter).
pub(crate) const FRAMES: &str = "wsgate_frames_total";
/// Payload bytes relayed, by direction (counter).
pub(crate) const PAYLOAD_BYTES: &str = "wsgate_payload_bytes_total";
/// Close frames, by peer, direction and code (counter).
pub(crate) const CLOSE_FRAMES: &str = "wsgate_close_frames_total";
/// Close handshake durations (histogram, seconds).
pub(crate) const CLOSE_HANDSHAKE: &str = "wsgate_close_handshake_duration_seconds";
/// Failed connects to a backend (counter).
pub(crate) const BACKEND_CONNECT_FAILURES: &str = "wsgate_backend_connect_failures_total";
/// Whether a backend is considered healthy (gauge, 0 or 1).
pub(crate) const BACKEND_HEALTHY: &str = "wsgate_backend_healthy";
/// Failed active health probes of a backend (counter).
pub(crate) const BACKEND_PROBE_FAILURES: &str = "wsgate_backend_probe_failures_total";
/// Backend connects that failed for want of the gateway's own resources, by errno (counter).
pub(crate) const LOCAL_ERRORS: &str = "wsgate_local_errors_total";
/// Reads that found every pooled read buffer of their core in use and waited (counter).
pub(crate) const READ_BUFFER_WAITS: &str = "wsgate_read_buffer_waits_total";
/// Reads that waited long enough to be parked behind a poll (counter).
pub(crate) const PARKED_READS: &str = "wsgate_parked_reads_total";

/// Upgrade statuses with their own series: what the gateway answers itself (101, 400, 405,
/// 426, 431, 502) and what a refusing backend commonly passes through. The rest is "other".
const STATUSES: [u16; 14] = [
    101, 400, 401, 403, 404, 405, 408, 426, 429, 431, 500, 502, 503, 504,
];
/// Index of the "other" status bucket.
const OTHER_STATUS: usize = STATUSES.len();

/// Close codes with their own series: the registered range 1000..=1015 (RFC 6455 section
/// 7.4.1 and the IANA registry), indexed by `code - 1000`, less the codes that never go on the
/// wire (1004, 1005, 1006, 1015: see [`CloseCode::is_sendable`]), whose buckets stay empty
/// and unrendered. Application codes are "other".
const FIRST_CODE: u16 = 1000;
/// Number of registered close codes.
const CODES: usize = 16;
/// Index of the "other" close-code bucket.
const OTHER_CODE: usize = CODES;
/// Index of the bucket for close frames with an empty payload (no code at all), rendered as
/// `code="none"` rather than as 1005, which a receiver reports locally but is never sent.
const NO_CODE: usize = CODES + 1;

/// The bucket a close frame's code counts in.
fn code_bucket(code: Option<u16>) -> usize {
    let Some(code) = code else {
        return NO_CODE;
    };
    match code.checked_sub(FIRST_CODE).map(usize::from) {
        Some(i) if i < CODES && on_the_wire(i) => i,
        // A local-only code cannot have come off the wire (the codec refuses it): count it
        // as "other" rather than in a series that must stay empty.
        _ => OTHER_CODE,
    }
}

/// Whether registered code `FIRST_CODE + i` may appear in a close frame.
fn on_the_wire(i: usize) -> bool {
    u16::try_from(i).is_ok_and(|i| CloseCode::new(FIRST_CODE + i).is_sendable())
}

/// Histogram upper bounds (inclusive, as Prometheus' `le`) in nanoseconds, with their labels.
const BUCKETS: [(u64, &str); 14] = [
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
];

/// Which way relayed frames travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Read from the client, written to the backend (or to the embedded echo).
    ClientToBackend,
    /// Read from the backend (or produced by the echo), written to the client.
    BackendToClient,
}

impl Direction {
    const ALL: [Self; 2] = [Self::ClientToBackend, Self::BackendToClient];

    /// The direction of frames read from `source`.
    pub(crate) const fn from(source: Side) -> Self {
        match source {
            Side::Client => Self::ClientToBackend,
            Side::Backend => Self::BackendToClient,
        }
    }

    const fn as_str(self) -> &'static str {
        match self {
            Self::ClientToBackend => "client_to_backend",
            Self::BackendToClient => "backend_to_client",
        }
    }
}

/// Whether the gateway read a close frame from a peer or wrote one to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseDirection {
    /// The peer sent it to the gateway.
    Received,
    /// The gateway sent it to the peer (relayed or its own).
    Sent,
}

impl CloseDirection {
    const ALL: [Self; 2] = [Self::Received, Self::Sent];

    const fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Sent => "sent",
        }
    }
}

const SIDES: [Side; 2] = [Side::Client, Side::Backend];

/// Flat index of a (side, direction) row in the close-code table.
const fn close_row(side: Side, dir: CloseDirection) -> usize {
    let side = match side {
        Side::Client => 0,
        Side::Backend => 1,
    };
    let dir = match dir {
        CloseDirection::Received => 0,
        CloseDirection::Sent => 1,
    };
    side * 2 + dir
}

/// One core's counters. Only its own core writes them.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct CoreMetrics {
    opened: AtomicU64,
    closed: AtomicU64,
    upgrades: [AtomicU64; STATUSES.len() + 1],
    /// Indexed by `Direction as usize`.
    frames: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    /// Indexed by [`close_row`], then by [`code_bucket`].
    close_codes: [[AtomicU64; CODES + 2]; 4],
    /// Non-cumulative counts per bucket; the last is `+Inf`.
    handshake_buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Microseconds: finer than the smallest bucket, and a u64 of them never overflows.
    handshake_sum_micros: AtomicU64,
    /// Indexed by [`LocalError::index`].
    local_errors: [AtomicU64; LocalError::ALL.len()],
    read_buffer_waits: AtomicU64,
    parked_reads: AtomicU64,
}

impl CoreMetrics {
    fn new() -> Self {
        Self {
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            upgrades: std::array::from_fn(|_| AtomicU64::new(0)),
            frames: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            close_codes: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            handshake_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            handshake_sum_micros: AtomicU64::new(0),
            local_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            read_buffer_waits: AtomicU64::new(0),
            parked_reads: AtomicU64::new(0),
        }
    }

    /// A read found every pooled read buffer in use and goes again once one is free.
    pub(crate) fn read_buffer_wait(&self) {
        self.read_buffer_waits.fetch_add(1, Relaxed);
    }

    /// A long-idle read was parked: a poll waits in its place.
    pub(crate) fn read_parked(&self) {
        self.parked_reads.fetch_add(1, Relaxed);
    }

    /// A client connection was accepted on this core.
    pub(crate) fn connection_opened(&self) {
        self.opened.fetch_add(1, Relaxed);
    }

    /// A connection accepted on this core is gone (pair with exactly one `connection_opened`).
    pub(crate) fn connection_closed(&self) {
        self.closed.fetch_add(1, Relaxed);
    }

    /// An upgrade request was answered with `status` (101 when it succeeded).
    pub(crate) fn upgrade(&self, status: u16) {
        let i = STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(OTHER_STATUS);
        self.upgrades[i].fetch_add(1, Relaxed);
    }

    /// `frames` frames carrying `bytes` payload bytes were relayed `dir`; call it as they go
    /// (per flushed batch), not only at close, so a long-lived connection shows up live.
    pub(crate) fn frames(&self, dir: Direction, frames: u64, bytes: u64) {
        self.frames[dir as usize].fetch_add(frames, Relaxed);
        self.bytes[dir as usize].fetch_add(bytes, Relaxed);
    }

    /// A close frame was received from or sent to `side`; `None` is an empty payload.
    pub(crate) fn close_frame(&self, side: Side, dir: CloseDirection, code: Option<u16>) {
        self.close_codes[close_row(side, dir)][code_bucket(code)].fetch_add(1, Relaxed);
    }

    /// A close handshake took `d`, from the first close frame to the last (proxied and echo
    /// connections alike).
    pub(crate) fn close_handshake(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS
            .iter()
            .position(|&(le, _)| nanos <= le)
            .unwrap_or(BUCKETS.len());
        self.handshake_buckets[i].fetch_add(1, Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.handshake_sum_micros.fetch_add(micros, Relaxed);
    }
}

impl CoreMetrics {
    /// A backend connect failed with a local error (the client was answered 503).
    pub(crate) fn local_error(&self, why: LocalError) {
        self.local_errors[why.index()].fetch_add(1, Relaxed);
    }
}

/// Per-backend counters a backend pool can embed (one per backend, shared by all cores):
/// failures are rare, so one shared atomic per backend costs nothing on the hot path.
#[derive(Debug)]
pub(crate) struct BackendStats {
    healthy: AtomicBool,
    connect_failures: AtomicU64,
    probe_failures: AtomicU64,
}

impl Default for BackendStats {
    /// A backend starts healthy until a check says otherwise.
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            connect_failures: AtomicU64::new(0),
            probe_failures: AtomicU64::new(0),
        }
    }
}

impl BackendStats {
    /// A connect to this backend failed (refused, unreachable or timed out).
    pub(crate) fn connect_failure(&self) {
        self.connect_failures.fetch_add(1, Relaxed);
    }

    /// An active health probe of this backend failed.
    pub(crate) fn probe_failure(&self) {
        self.probe_failures.fetch_add(1, Relaxed);
    }

    /// Records the latest health verdict.
    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Relaxed);
    }

    /// The latest health verdict.
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// This backend's row for [`BackendRows`].
    pub(crate) fn row<'a>(&self, pool: &'a str, backend: &'a str) -> BackendRow<'a> {
        BackendRow {
            pool,
            backend,
            healthy: self.healthy(),
            connect_failures: self.connect_failures.load(Relaxed),
            probe_failures: self.probe_failures.load(Relaxed),
        }
    }
}

/// One backend as the renderer sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackendRow<'a> {
    /// The pool's name.
    pub(crate) pool: &'a str,
    /// The backend's URL.
    pub(crate) backend: &'a str,
    /// The latest health verdict.
    pub(crate) healthy: bool,
    /// Failed connects so far (a counter: keep it across reloads for a backend that stays).
    pub(crate) connect_failures: u64,
    /// Failed health probes so far (kept across reloads likewise).
    pub(crate) probe_failures: u64,
}

/// Lists the current backends: calls its argument once per backend. Supplied by the gateway,
/// which owns the pools and swaps them on reload; called on the admin thread per scrape.
/// `'a` lets tests and one-off renders borrow; the admin plane holds a `BackendRows<'static>`.
pub(crate) type BackendRows<'a> = dyn Fn(&mut dyn FnMut(BackendRow<'_>)) + Send + Sync + 'a;

/// Every core's shard.
#[derive(Debug)]
pub(crate) struct Metrics {
    cores: Vec<Arc<CoreMetrics>>,
}

impl Metrics {
    /// Metrics for `cores` workers; shard `i` is labelled `core="i"` (the worker index).
    pub(crate) fn new(cores: usize) -> Arc<Self> {
        Arc::new(Self {
            cores: (0..cores).map(|_| Arc::new(CoreMetrics::new())).collect(),
        })
    }

    /// Worker `core`'s shard, to keep in its per-core state.
    pub(crate) fn core(&self, core: usize) -> Arc<CoreMetrics> {
        Arc::clone(&self.cores[core])
    }

    /// Appends every metric in the Prometheus text exposition format 0.0.4.
    pub(crate) fn render(&self, out: &mut String, backends: &BackendRows<'_>) {
        self.render_connections(out);
        self.render_upgrades(out);
        self.render_frames(out);
        self.render_close_frames(out);
        self.render_close_handshake(out);
        self.render_local_errors(out);
        self.render_read_buffer_waits(out);
        self.render_parked_reads(out);
        render_backends(out, backends);
    }

    /// One counter summed over every shard.
    fn sum(&self, counter: impl Fn(&CoreMetrics) -> &AtomicU64) -> u64 {
        self.cores
            .iter()
            .map(|c| counter(c).load(Relaxed))
            .fold(0, u64::wrapping_add)
    }

    fn render_connections(&self, out: &mut String) {
        header(
            out,
            ACTIVE_CONNECTIONS,
            "gauge",
            "Accepted client connections not yet closed, per core.",
        );
        for (i, c) in self.cores.iter().enumerate() {
            // `closed` first: it never passes `opened`, so the gauge cannot dip below zero.
            let closed = c.closed.load(Relaxed);
            let active = c.opened.load(Relaxed).saturating_sub(closed);
            _ = writeln!(out, "{ACTIVE_CONNECTIONS}{{core=\"{i}\"}} {active}");
        }
        header(
            out,
            CONNECTIONS,
            "counter",
            "Client connections accepted, per core.",
        );
        for (i, c) in self.cores.iter().enumerate() {
            let opened = c.opened.load(Relaxed);
            _ = writeln!(out, "{CONNECTIONS}{{core=\"{i}\"}} {opened}");
        }
    }

    fn render_upgrades(&self, out: &mut String) {
        header(
            out,
            UPGRADES,
            "counter",
            "WebSocket upgrade requests answered, by HTTP status (101: upgraded).",
        );
        for i in 0..=OTHER_STATUS {
            let n = self.sum(|c| &c.upgrades[i]);
            match STATUSES.get(i) {
                Some(status) => _ = writeln!(out, "{UPGRADES}{{status=\"{status}\"}} {n}"),
                None => _ = writeln!(out, "{UPGRADES}{{status=\"other\"}} {n}"),
            }
        }
    }

    fn render_frames(&self, out: &mut String) {
        let help = "WebSocket frames relayed, by direction.";
        header(out, FRAMES, "counter", help);
        for dir in Direction::ALL {
            let n = self.sum(|c| &c.frames[dir as usize]);
            _ = writeln!(out, "{FRAMES}{{direction=\"{}\"}} {n}", dir.as_str());
        }
        let help = "WebSocket payload bytes relayed, by direction.";
        header(out, PAYLOAD_BYTES, "counter", help);
        for dir in Direction::ALL {
            let n = self.sum(|c| &c.bytes[dir as usize]);
            _ = writeln!(out, "{PAYLOAD_BYTES}{{direction=\"{}\"}} {n}", dir.as_str());
        }
    }

    /// Every (side, direction, code) series, zeros included: a series that appears only at
    /// its first increment hides that increment from `rate()` and `increase()`. Codes that
    /// never go on the wire get no series.
    fn render_close_frames(&self, out: &mut String) {
        header(
            out,
            CLOSE_FRAMES,
            "counter",
            "Close frames received from or sent to each peer, by close code \
             (none: empty payload).",
        );
        for side in SIDES {
            for dir in CloseDirection::ALL {
                let row = close_row(side, dir);
                let (side, dir) = (side.as_str(), dir.as_str());
                for i in (0..CODES)
                    .filter(|&i| on_the_wire(i))
                    .chain([OTHER_CODE, NO_CODE])
                {
                    let n = self.sum(|c| &c.close_codes[row][i]);
                    _ = write!(
                        out,
                        "{CLOSE_FRAMES}{{side=\"{side}\",direction=\"{dir}\",code=\""
                    );
                    match i {
                        OTHER_CODE => out.push_str("other"),
                        NO_CODE => out.push_str("none"),
                        _ => _ = write!(out, "{}", FIRST_CODE as usize + i),
                    }
                    _ = writeln!(out, "\"}} {n}");
                }
            }
        }
    }

    fn render_close_handshake(&self, out: &mut String) {
        header(
            out,
            CLOSE_HANDSHAKE,
            "histogram",
            "Time from the first close frame to the end of the close handshake.",
        );
        let mut cumulative = 0u64;
        for (i, (_, le)) in BUCKETS.iter().enumerate() {
            cumulative = cumulative.wrapping_add(self.sum(|c| &c.handshake_buckets[i]));
            _ = writeln!(out, "{CLOSE_HANDSHAKE}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let inf = self.sum(|c| &c.handshake_buckets[BUCKETS.len()]);
        cumulative = cumulative.wrapping_add(inf);
        _ = writeln!(out, "{CLOSE_HANDSHAKE}_bucket{{le=\"+Inf\"}} {cumulative}");
        let micros = self.sum(|c| &c.handshake_sum_micros);
        // Exact below 2^53 µs (285 years); f64's Display prints the shortest exact form.
        #[expect(clippy::cast_precision_loss, reason = "see above")]
        let seconds = micros as f64 / 1e6;
        _ = writeln!(out, "{CLOSE_HANDSHAKE}_sum {seconds}");
        _ = writeln!(out, "{CLOSE_HANDSHAKE}_count {cumulative}");
    }
}

impl Metrics {
    /// Every errno's series, zeros included (see `render_close_frames`).
    fn render_local_errors(&self, out: &mut String) {
        header(
            out,
            LOCAL_ERRORS,
            "counter",
            "Backend connects that failed for want of the gateway's own resources (descriptors, \
             memory, local ports), by errno; answered 503 and not held against the backend.",
        );
        for why in LocalError::ALL {
            let n = self.sum(|c| &c.local_errors[why.index()]);
            _ = writeln!(out, "{LOCAL_ERRORS}{{why=\"{}\"}} {n}", why.as_str());
        }
    }
}

impl Metrics {
    fn render_read_buffer_waits(&self, out: &mut String) {
        header(
            out,
            READ_BUFFER_WAITS,
            "counter",
            "Reads that found every pooled read buffer of their core in use and waited for one \
             (raise server.read_buffers if it keeps growing).",
        );
        let n = self.sum(|c| &c.read_buffer_waits);
        _ = writeln!(out, "{READ_BUFFER_WAITS} {n}");
    }

    fn render_parked_reads(&self, out: &mut String) {
        header(
            out,
            PARKED_READS,
            "counter",
            "Reads that waited past server.park_reads_after and were parked behind a poll, \
             which holds less kernel memory (io_uring only).",
        );
        let n = self.sum(|c| &c.parked_reads);
        _ = writeln!(out, "{PARKED_READS} {n}");
    }
}

/// The backend families. Rows are collected first: each family's samples must be contiguous.
/// Every family labels the pool `upstream`, as the configuration names it.
fn render_backends(out: &mut String, backends: &BackendRows<'_>) {
    let mut rows = Vec::new();
    backends(&mut |row| {
        let mut pool = String::new();
        escape_label(&mut pool, row.pool);
        let mut backend = String::new();
        escape_label(&mut backend, row.backend);
        let counts = [
            row.connect_failures,
            u64::from(row.healthy),
            row.probe_failures,
        ];
        rows.push((pool, backend, counts));
    });
    let families = [
        (
            BACKEND_CONNECT_FAILURES,
            "counter",
            "Failed connects to a backend (refused, unreachable or timed out).",
        ),
        (
            BACKEND_HEALTHY,
            "gauge",
            "Whether a backend is considered healthy (1) or not (0).",
        ),
        (
            BACKEND_PROBE_FAILURES,
            "counter",
            "Active health probes of a backend that failed (no valid 101 in time).",
        ),
    ];
    for (i, (name, kind, help)) in families.into_iter().enumerate() {
        header(out, name, kind, help);
        for (pool, backend, counts) in &rows {
            _ = writeln!(
                out,
                "{name}{{upstream=\"{pool}\",backend=\"{backend}\"}} {}",
                counts[i]
            );
        }
    }
}

/// Writes a family's `# HELP` and `# TYPE` lines (the help texts need no escaping).
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and line feed, as the format requires.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_backends(_: &mut dyn FnMut(BackendRow<'_>)) {}

    fn render(m: &Metrics) -> String {
        let mut out = String::new();
        m.render(&mut out, &no_backends);
        out
    }

    fn has_line(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }

    #[test]
    fn shards_are_padded() {
        assert_eq!(align_of::<CoreMetrics>(), 128);
        assert_eq!(size_of::<CoreMetrics>() % 128, 0);
    }

    #[test]
    fn known_sequence_renders_exact_lines() {
        let m = Metrics::new(2);
        let (a, b) = (m.core(0), m.core(1));
        a.connection_opened();
        a.connection_opened();
        a.connection_closed();
        b.connection_opened();
        a.upgrade(101);
        b.upgrade(101);
        b.upgrade(426);
        b.upgrade(418);
        a.local_error(LocalError::Emfile);
        b.local_error(LocalError::Emfile);
        b.local_error(LocalError::Eaddrnotavail);
        a.frames(Direction::ClientToBackend, 3, 100);
        b.frames(Direction::from(Side::Client), 2, 50);
        b.frames(Direction::BackendToClient, 1, 7);
        let text = render(&m);
        for line in [
            "# HELP wsgate_active_connections Accepted client connections not yet closed, per core.",
            "# TYPE wsgate_active_connections gauge",
            r#"wsgate_active_connections{core="0"} 1"#,
            r#"wsgate_active_connections{core="1"} 1"#,
            r#"wsgate_connections_total{core="0"} 2"#,
            "# TYPE wsgate_upgrades_total counter",
            r#"wsgate_upgrades_total{status="101"} 2"#,
            r#"wsgate_upgrades_total{status="426"} 1"#,
            r#"wsgate_upgrades_total{status="429"} 0"#,
            r#"wsgate_upgrades_total{status="other"} 1"#,
            r#"wsgate_frames_total{direction="client_to_backend"} 5"#,
            r#"wsgate_frames_total{direction="backend_to_client"} 1"#,
            r#"wsgate_payload_bytes_total{direction="client_to_backend"} 150"#,
            r#"wsgate_payload_bytes_total{direction="backend_to_client"} 7"#,
            "# TYPE wsgate_local_errors_total counter",
            r#"wsgate_local_errors_total{why="emfile"} 2"#,
            r#"wsgate_local_errors_total{why="enfile"} 0"#,
            r#"wsgate_local_errors_total{why="eaddrnotavail"} 1"#,
        ] {
            has_line(&text, line);
        }
        assert!(text.ends_with('\n'));
        // Every family is announced once, and every sample line belongs to the family above.
        let mut family = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap();
                assert_eq!(text.matches(&format!("# TYPE {family} ")).count(), 1);
            } else if !line.starts_with('#') {
                assert!(line.starts_with(family), "{line:?} outside {family}");
            }
        }
    }

    #[test]
    fn close_code_table() {
        let m = Metrics::new(2);
        let (a, b) = (m.core(0), m.core(1));
        a.close_frame(Side::Client, CloseDirection::Received, Some(1000));
        b.close_frame(Side::Client, CloseDirection::Received, Some(1000));
        a.close_frame(Side::Backend, CloseDirection::Sent, Some(1001));
        a.close_frame(Side::Backend, CloseDirection::Received, None);
        a.close_frame(Side::Backend, CloseDirection::Received, Some(1015));
        a.close_frame(Side::Client, CloseDirection::Sent, Some(4000));
        a.close_frame(Side::Client, CloseDirection::Sent, Some(999));
        a.close_frame(Side::Client, CloseDirection::Sent, Some(1016));
        let text = render(&m);
        for line in [
            r#"wsgate_close_frames_total{side="client",direction="received",code="1000"} 2"#,
            r#"wsgate_close_frames_total{side="client",direction="sent",code="1000"} 0"#,
            r#"wsgate_close_frames_total{side="backend",direction="sent",code="1001"} 1"#,
            r#"wsgate_close_frames_total{side="backend",direction="received",code="none"} 1"#,
            r#"wsgate_close_frames_total{side="backend",direction="received",code="other"} 1"#,
            r#"wsgate_close_frames_total{side="client",direction="sent",code="other"} 3"#,
            r#"wsgate_close_frames_total{side="backend",direction="sent",code="other"} 0"#,
            r#"wsgate_close_frames_total{side="client",direction="sent",code="none"} 0"#,
            r#"wsgate_close_frames_total{side="client",direction="sent",code="1014"} 0"#,
        ] {
            has_line(&text, line);
        }
        // Codes that never go on the wire get no series.
        for code in [1004, 1005, 1006, 1015] {
            assert!(
                !text.contains(&format!("code=\"{code}\"")),
                "{code}:\n{text}"
            );
        }
        // 2 sides x 2 directions x (12 codes + other + none).
        assert_eq!(text.matches("wsgate_close_frames_total{").count(), 56);
    }

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::new(2);
        m.core(0).close_handshake(Duration::from_micros(500)); // le 0.0005 (inclusive)
        m.core(1).close_handshake(Duration::from_micros(501)); // le 0.001
        m.core(1).close_handshake(Duration::from_millis(3)); // le 0.005
        m.core(0).close_handshake(Duration::from_secs(11)); // +Inf
        let text = render(&m);
        let name = "wsgate_close_handshake_duration_seconds";
        has_line(&text, &format!("# TYPE {name} histogram"));
        for (le, n) in [
            ("0.0005", 1),
            ("0.001", 2),
            ("0.0025", 2),
            ("0.005", 3),
            ("5", 3),
            ("10", 3),
            ("+Inf", 4),
        ] {
            has_line(&text, &format!("{name}_bucket{{le=\"{le}\"}} {n}"));
        }
        has_line(&text, &format!("{name}_sum 11.004001"));
        has_line(&text, &format!("{name}_count 4"));
        let buckets: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket")))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), BUCKETS.len() + 1);
        assert!(buckets.is_sorted());
    }

    #[test]
    fn backend_labels_are_escaped() {
        let stats = BackendStats::default();
        stats.connect_failure();
        stats.connect_failure();
        stats.probe_failure();
        let down = BackendStats::default();
        down.set_healthy(false);
        let rows = |emit: &mut dyn FnMut(BackendRow<'_>)| {
            emit(stats.row("chat", "ws://10.0.0.1:9001/chat"));
            emit(down.row("we\"ird\\pool\nx", "ws://b"));
        };
        let mut text = String::new();
        Metrics::new(1).render(&mut text, &rows);
        for line in [
            "# TYPE wsgate_backend_connect_failures_total counter",
            r#"wsgate_backend_connect_failures_total{upstream="chat",backend="ws://10.0.0.1:9001/chat"} 2"#,
            r#"wsgate_backend_connect_failures_total{upstream="we\"ird\\pool\nx",backend="ws://b"} 0"#,
            "# TYPE wsgate_backend_healthy gauge",
            r#"wsgate_backend_healthy{upstream="chat",backend="ws://10.0.0.1:9001/chat"} 1"#,
            r#"wsgate_backend_healthy{upstream="we\"ird\\pool\nx",backend="ws://b"} 0"#,
            "# TYPE wsgate_backend_probe_failures_total counter",
            r#"wsgate_backend_probe_failures_total{upstream="chat",backend="ws://10.0.0.1:9001/chat"} 1"#,
            r#"wsgate_backend_probe_failures_total{upstream="we\"ird\\pool\nx",backend="ws://b"} 0"#,
        ] {
            has_line(&text, line);
        }
    }

    #[test]
    fn every_name_is_prefixed() {
        let text = render(&Metrics::new(1));
        for line in text.lines() {
            let name = line
                .trim_start_matches("# HELP ")
                .trim_start_matches("# TYPE ");
            assert!(name.starts_with("wsgate_"), "{line:?}");
        }
    }
}
