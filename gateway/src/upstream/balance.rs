//! Which backend of a pool a connection tries first, and which backends to skip.
//!
//! Whether a backend is failing is a fact about the backend, not about a core, so [`PoolState`]
//! is shared by every core behind an `Arc` and kept in relaxed atomics: each field is an
//! independent hint, and a core acting on a value a few microseconds stale costs at most one
//! extra attempt or one extra skip. Only the round-robin cursor is per core (a `Cell` the
//! caller owns), so the hot path never contends on a shared counter.
//!
//! Hashing is rendezvous (highest random weight) hashing over the backends' URLs with a fixed
//! function ([`score`]), so that any number of gateway instances given the same pool send a key
//! to the same backend without talking to each other, and removing one backend moves only the
//! keys that lived on it.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::cmp::Reverse;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use codec::handshake::UpgradeRequest;

use crate::config::{BackendUrl, Balance, HashKey, Pool};

/// One backend's shared counters.
#[derive(Debug)]
struct BackendState {
    /// Connections holding an [`ActiveGuard`]: what least-connections compares.
    active: AtomicU32,
    /// Connect or upgrade failures since the last success or ejection.
    consecutive_failures: AtomicU32,
    /// Milliseconds after [`PoolState::epoch`] until which the backend is skipped (0: never
    /// ejected). A number rather than an `Instant` so it fits an atomic.
    ejected_until: AtomicU64,
    /// The last active probe's verdict; true until a probe says otherwise, so a pool without
    /// health checks (or before the first probe) uses every backend.
    probe_healthy: AtomicBool,
}

/// The live state of one pool's backends, indexed like `Pool::backends`; shared by all cores.
#[derive(Debug)]
pub(crate) struct PoolState {
    backends: Vec<BackendState>,
    /// The monotonic origin of `ejected_until`.
    epoch: Instant,
}

/// What one failure recorded by [`PoolState::record_failure`] did to its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Counted toward ejection: this many failures in a row so far, not (yet) enough to
    /// eject, or the pool never ejects.
    Counted(u32),
    /// Ejected a backend that was available: this many failures in a row did it.
    Ejected(u32),
    /// The backend was ejected already (attempts begun before the ejection failed late):
    /// its cool-down now ends later.
    Extended,
}

/// What a hashing pool hashes for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HashInput<'a> {
    /// The client's address; the key when `header` is `None`.
    pub(crate) client_ip: IpAddr,
    /// The configured header's or cookie's value (trimmed, non-empty), from [`hash_input`].
    pub(crate) header: Option<&'a [u8]>,
}

/// Keeps a backend's `active` count raised while it lives.
#[derive(Debug)]
#[must_use = "dropping the guard at once un-counts the connection"]
pub(crate) struct ActiveGuard {
    pool: Arc<PoolState>,
    backend: usize,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.pool.backends[self.backend]
            .active
            .fetch_sub(1, Relaxed);
    }
}

impl PoolState {
    /// State for a pool of `backends` backends, all available.
    pub(crate) fn new(backends: usize) -> Arc<Self> {
        Arc::new(Self {
            backends: (0..backends)
                .map(|_| BackendState {
                    active: AtomicU32::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    probe_healthy: AtomicBool::new(true),
                })
                .collect(),
            epoch: Instant::now(),
        })
    }

    /// The order in which to try backends for one connection: only available ones (not
    /// ejected, probe-healthy), the preferred one first. Empty means answer 502 at once: every
    /// backend is known bad, and trying them anyway would only add their timeouts to the wait.
    ///
    /// - Round-robin rotates the available backends by the per-core `cursor`.
    /// - Least-connections orders by [`active`](Self::active), ties in the cursor's rotation
    ///   (so equal backends still take turns).
    /// - Hash orders by descending [`score`] of the key and each backend's URL; the first is
    ///   the key's home, the rest are where it goes, in order, if the home is unavailable.
    pub(crate) fn candidates(
        &self,
        pool: &Pool,
        key: &HashInput<'_>,
        cursor: &Cell<usize>,
    ) -> Vec<usize> {
        self.candidates_at(pool, key, cursor, self.now_ms())
    }

    fn candidates_at(
        &self,
        pool: &Pool,
        key: &HashInput<'_>,
        cursor: &Cell<usize>,
        now: u64,
    ) -> Vec<usize> {
        debug_assert_eq!(
            pool.backends.len(),
            self.backends.len(),
            "pool {}",
            pool.name
        );
        let mut order: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.is_available_at(i, now))
            .collect();
        if order.is_empty() {
            return order;
        }
        let rotate = |order: &mut Vec<usize>| {
            let start = cursor.get();
            cursor.set(start.wrapping_add(1));
            let len = order.len();
            order.rotate_left(start % len);
        };
        match &pool.balance {
            Balance::RoundRobin => rotate(&mut order),
            Balance::LeastConnections => {
                rotate(&mut order);
                // Cached keys: other cores change the counts mid-sort, and a sort whose keys
                // move under it has no consistent order. The sort is stable, keeping the
                // rotation among ties.
                order.sort_by_cached_key(|&i| self.active(i));
            }
            Balance::Hash(_) => {
                let prefix = key_prefix(key);
                order.sort_by_cached_key(|&i| (Reverse(score(prefix, &pool.backends[i])), i));
            }
        }
        order
    }

    /// Counts a connection to `backend` until the guard drops.
    ///
    /// Taking it when the attempt starts (and dropping it if the attempt fails) rather than
    /// after the 101 makes least-connections see connections still in their handshake, so a
    /// burst of clients spreads out instead of all choosing the same idle backend.
    pub(crate) fn connected(self: &Arc<Self>, backend: usize) -> ActiveGuard {
        self.backends[backend].active.fetch_add(1, Relaxed);
        ActiveGuard {
            pool: Arc::clone(self),
            backend,
        }
    }

    /// A connect and upgrade that worked: the failure streak is over.
    pub(crate) fn record_success(&self, backend: usize) {
        self.backends[backend]
            .consecutive_failures
            .store(0, Relaxed);
    }

    /// A connect or upgrade that failed. After `pool.eject_after` in a row (0: never) the
    /// backend is skipped for `pool.eject_for`, and its streak starts again from 0, so after
    /// the cool-down it gets as many tries as a fresh backend.
    ///
    /// Says whether this failure ejected the backend, for the log line; a failure of an
    /// attempt begun before the ejection only extends it.
    pub(crate) fn record_failure(&self, backend: usize, pool: &Pool) -> Failure {
        self.record_failure_at(backend, pool, self.now_ms())
    }

    fn record_failure_at(&self, backend: usize, pool: &Pool, now: u64) -> Failure {
        let b = &self.backends[backend];
        // Counted even when ejection is off: the streak is what the log line reports.
        let failures = b
            .consecutive_failures
            .fetch_add(1, Relaxed)
            .saturating_add(1);
        if pool.eject_after == 0 || failures < pool.eject_after {
            return Failure::Counted(failures);
        }
        b.consecutive_failures.store(0, Relaxed);
        let until = now.saturating_add(millis(pool.eject_for));
        if b.ejected_until.fetch_max(until, Relaxed) <= now {
            Failure::Ejected(failures)
        } else {
            Failure::Extended
        }
    }

    /// Records an active probe's verdict; returns true if it changed (for the log line).
    pub(crate) fn set_probe_result(&self, backend: usize, healthy: bool) -> bool {
        self.backends[backend].probe_healthy.swap(healthy, Relaxed) != healthy
    }

    /// Whether `backend` may be tried now: not ejected and not failing its probes.
    pub(crate) fn is_available(&self, backend: usize) -> bool {
        self.is_available_at(backend, self.now_ms())
    }

    fn is_available_at(&self, backend: usize, now: u64) -> bool {
        let b = &self.backends[backend];
        b.probe_healthy.load(Relaxed) && b.ejected_until.load(Relaxed) <= now
    }

    /// Connections to `backend` currently counted by an [`ActiveGuard`].
    pub(crate) fn active(&self, backend: usize) -> u32 {
        self.backends[backend].active.load(Relaxed)
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Extracts what a hashing pool hashes from an upgrade request.
///
/// A header or cookie that is absent or empty falls back to the client IP: hashing every
/// key-less client as "" would pile them all onto one backend.
pub(crate) fn hash_input<'a>(
    key: &HashKey,
    client: IpAddr,
    req: &'a UpgradeRequest,
) -> HashInput<'a> {
    let value = match key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => req.header(name),
        HashKey::Cookie(name) => cookie(req, name),
    };
    HashInput {
        client_ip: client,
        header: value.map(<[u8]>::trim_ascii).filter(|v| !v.is_empty()),
    }
}

/// The first cookie called `name` (case-sensitive, as cookie names are) across all `Cookie`
/// headers (`a=1; b=2`), without the optional double quotes around its value.
fn cookie<'a>(req: &'a UpgradeRequest, name: &str) -> Option<&'a [u8]> {
    req.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, v)| v.split(|&b| b == b';'))
        .find_map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
            (n == name.as_bytes()).then(|| {
                v.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v)
            })
        })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a, continuing from `state`.
fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// The FNV state after the key and its 0xFF terminator, shared by every backend's score.
///
/// The key is the header or cookie value's bytes, or else the client IP's octets (4 for IPv4,
/// 16 for IPv6; an IPv4-mapped IPv6 address counts as its IPv4 address, so dual-stack and
/// IPv4-only instances agree). 0xFF never occurs in a URL, so key and URL cannot run together.
fn key_prefix(key: &HashInput<'_>) -> u64 {
    let state = match (key.header, key.client_ip.to_canonical()) {
        (Some(value), _) => fnv1a(FNV_OFFSET, value),
        (None, IpAddr::V4(ip)) => fnv1a(FNV_OFFSET, &ip.octets()),
        (None, IpAddr::V6(ip)) => fnv1a(FNV_OFFSET, &ip.octets()),
    };
    fnv1a(state, &[0xFF])
}

/// A backend's rendezvous weight for a key:
///
/// `splitmix64(fnv1a64(key ‖ 0xFF ‖ "ws://" ‖ authority ‖ path_prefix))`
///
/// where the URL part is the backend as it prints (`ws://10.0.0.1:9001/chat`, as written in
/// the config, trailing slash dropped), FNV-1a is the standard 64-bit variant (offset
/// 0xcbf29ce484222325, prime 0x100000001b3) and splitmix64 is its finaliser (below). Fixed
/// here rather than `std::hash`, whose output may change between Rust releases and
/// processes: instances must agree. FNV alone mixes the last bytes poorly (URLs differing
/// only in the port's last digit would rank alike for many keys); the finaliser fixes that.
fn score(prefix: u64, backend: &BackendUrl) -> u64 {
    let state = fnv1a(prefix, b"ws://");
    let state = fnv1a(state, backend.authority.as_bytes());
    splitmix64(fnv1a(state, backend.path_prefix.as_bytes()))
}

/// The splitmix64 output function (Steele, Lea and Flood 2014; constants from Stafford's
/// "Mix13").
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use codec::handshake::{HeadLimits, parse_request};

    use super::*;

    fn pool(n: usize, balance: Balance) -> Pool {
        Pool {
            name: "test".to_owned(),
            backends: (0..n)
                .map(|i| format!("ws://127.0.0.1:{}", 9001 + i).parse().unwrap())
                .collect(),
            balance,
            eject_after: 2,
            eject_for: Duration::from_secs(10),
            health: None,
        }
    }

    fn ip_key(ip: [u8; 4]) -> HashInput<'static> {
        HashInput {
            client_ip: IpAddr::from(ip),
            header: None,
        }
    }

    fn header_key(value: &str) -> HashInput<'_> {
        HashInput {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            header: Some(value.as_bytes()),
        }
    }

    /// The home backend of `key`.
    fn home(state: &PoolState, pool: &Pool, key: &HashInput<'_>) -> usize {
        state.candidates(pool, key, &Cell::new(0))[0]
    }

    fn request(extra: &str) -> UpgradeRequest {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        );
        parse_request(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn round_robin_rotates_over_available_backends() {
        let pool = pool(3, Balance::RoundRobin);
        let state = PoolState::new(3);
        let cursor = Cell::new(0);
        let key = ip_key([10, 0, 0, 1]);
        let next = || state.candidates(&pool, &key, &cursor);
        assert_eq!(next(), [0, 1, 2]);
        assert_eq!(next(), [1, 2, 0]);
        assert_eq!(next(), [2, 0, 1]);
        assert_eq!(next(), [0, 1, 2]);
        // With 1 out, the other two alternate (rotating the full list would give 2 twice as
        // many first tries as 0).
        state.set_probe_result(1, false);
        let firsts: Vec<usize> = (0..4)
            .map(|_| state.candidates(&pool, &key, &cursor)[0])
            .collect();
        assert_eq!(firsts, [0, 2, 0, 2]);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_and_guards_decrement() {
        let pool = pool(3, Balance::LeastConnections);
        let state = PoolState::new(3);
        let cursor = Cell::new(0);
        let key = ip_key([10, 0, 0, 1]);
        let a = state.connected(0);
        let b = state.connected(0);
        let c = state.connected(2);
        assert_eq!(state.active(0), 2);
        assert_eq!(state.candidates(&pool, &key, &cursor), [1, 2, 0]);
        assert_eq!(state.candidates(&pool, &key, &cursor), [1, 2, 0]);
        drop((a, b));
        assert_eq!(state.active(0), 0);
        // 0 and 1 tie at zero: the cursor takes turns between them; 2 stays last.
        let orders: Vec<Vec<usize>> = (0..3)
            .map(|_| state.candidates(&pool, &key, &cursor))
            .collect();
        assert_eq!(orders, [[0, 1, 2], [0, 1, 2], [1, 0, 2]]);
        drop(c);
        assert_eq!(
            (state.active(0), state.active(1), state.active(2)),
            (0, 0, 0)
        );
    }

    #[test]
    fn hash_function_is_pinned() {
        // Changing these values changes which backend every sticky client lands on across a
        // fleet upgrade: only do it on purpose. (Cross-checked with an independent
        // implementation of the documented definition.)
        let b: BackendUrl = "ws://10.0.0.1:9001/chat".parse().unwrap();
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            score(key_prefix(&header_key("alice")), &b),
            0x50fd_a4b9_591d_4592
        );
        assert_eq!(
            score(key_prefix(&ip_key([192, 0, 2, 7])), &b),
            0x0c7b_3a8d_2237_e3ac
        );

        let pool = pool(3, Balance::Hash(HashKey::Header("X-User".to_owned())));
        let state = PoolState::new(3);
        let users = [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
            "mallory", "oscar",
        ];
        let homes: Vec<usize> = users
            .iter()
            .map(|k| home(&state, &pool, &header_key(k)))
            .collect();
        assert_eq!(homes, [1, 1, 1, 2, 1, 1, 1, 2, 0, 0, 0, 1]);
        assert_eq!(home(&state, &pool, &ip_key([192, 0, 2, 7])), 1);
    }

    #[test]
    fn hash_identity_is_the_url_not_the_index() {
        let key = header_key("alice");
        let forward = pool(3, Balance::Hash(HashKey::Header("X-User".to_owned())));
        let mut reversed = forward.clone();
        reversed.backends.reverse();
        let state = PoolState::new(3);
        let a = &forward.backends[home(&state, &forward, &key)];
        let b = &reversed.backends[home(&state, &reversed, &key)];
        assert_eq!(a, b);
    }

    #[test]
    fn ipv4_mapped_clients_hash_as_ipv4() {
        let v4 = ip_key([192, 0, 2, 7]);
        let mapped = HashInput {
            client_ip: IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped()),
            header: None,
        };
        assert_eq!(key_prefix(&v4), key_prefix(&mapped));
        let v6 = HashInput {
            client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
            header: None,
        };
        assert_ne!(key_prefix(&v6), key_prefix(&v4));
    }

    #[test]
    fn hash_spreads_keys_and_ejection_moves_only_the_ejected_backends_keys() {
        let pool = pool(3, Balance::Hash(HashKey::Header("X-User".to_owned())));
        let state = PoolState::new(3);
        let keys: Vec<String> = (0..3000).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| home(&state, &pool, &header_key(k)))
            .collect();
        for b in 0..3 {
            let share = before.iter().filter(|&&h| h == b).count();
            assert!(
                (750..=1260).contains(&share),
                "backend {b} has {share} of 3000 keys"
            );
        }

        assert_eq!(state.record_failure(1, &pool), Failure::Counted(1));
        assert_eq!(
            state.record_failure(1, &pool),
            Failure::Ejected(2),
            "second failure ejects (eject_after = 2)"
        );
        let mut moved_to = [0_usize; 3];
        for (k, &was) in keys.iter().zip(&before) {
            let now = home(&state, &pool, &header_key(k));
            if was == 1 {
                moved_to[now] += 1;
            } else {
                assert_eq!(now, was, "{k} moved off a backend that is still available");
            }
        }
        assert_eq!(moved_to[1], 0);
        assert!(moved_to[0] > 300 && moved_to[2] > 300, "{moved_to:?}");
    }

    #[test]
    fn hash_fallback_order_is_the_score_order() {
        let pool = pool(3, Balance::Hash(HashKey::ClientIp));
        let state = PoolState::new(3);
        let key = ip_key([10, 1, 2, 3]);
        let full = state.candidates(&pool, &key, &Cell::new(0));
        state.set_probe_result(full[0], false);
        assert_eq!(state.candidates(&pool, &key, &Cell::new(7)), full[1..]);
    }

    #[test]
    fn ejection_after_consecutive_failures_and_cool_down() {
        let pool = pool(2, Balance::RoundRobin); // eject_after 2, eject_for 10 s
        let state = PoolState::new(2);
        let key = ip_key([10, 0, 0, 1]);
        let order = |now| state.candidates_at(&pool, &key, &Cell::new(0), now);

        // A success in between resets the streak.
        assert_eq!(state.record_failure_at(0, &pool, 100), Failure::Counted(1));
        state.record_success(0);
        assert_eq!(state.record_failure_at(0, &pool, 200), Failure::Counted(1));
        assert!(state.is_available_at(0, 200));

        assert_eq!(state.record_failure_at(0, &pool, 300), Failure::Ejected(2));
        assert!(!state.is_available_at(0, 300));
        assert_eq!(order(300), [1]);
        assert_eq!(order(10_299), [1]);
        // A straggler failing during the cool-down extends it without reporting a new ejection.
        assert_eq!(
            state.record_failure_at(0, &pool, 5_000),
            Failure::Counted(1)
        );
        assert_eq!(state.record_failure_at(0, &pool, 5_000), Failure::Extended);
        assert_eq!(order(10_300), [1]);
        assert_eq!(order(15_000), [0, 1]);
        // The streak started over: one failure does not eject again.
        assert_eq!(
            state.record_failure_at(0, &pool, 15_001),
            Failure::Counted(1)
        );
        assert!(state.is_available_at(0, 15_001));

        // Both ejected: no candidates, so the caller answers 502 without trying.
        state.record_failure_at(0, &pool, 15_002);
        state.record_failure_at(1, &pool, 15_002);
        state.record_failure_at(1, &pool, 15_002);
        assert!(order(15_003).is_empty());
    }

    #[test]
    fn cool_down_expires_on_the_real_clock() {
        let mut pool = pool(1, Balance::RoundRobin);
        pool.eject_after = 1;
        pool.eject_for = Duration::from_millis(30);
        let state = PoolState::new(1);
        assert_eq!(state.record_failure(0, &pool), Failure::Ejected(1));
        assert!(!state.is_available(0));
        std::thread::sleep(Duration::from_millis(60));
        assert!(state.is_available(0));
    }

    #[test]
    fn eject_after_zero_never_ejects() {
        let mut pool = pool(1, Balance::RoundRobin);
        pool.eject_after = 0;
        let state = PoolState::new(1);
        for n in 1..=100 {
            assert_eq!(state.record_failure(0, &pool), Failure::Counted(n));
        }
        assert!(state.is_available(0));
    }

    #[test]
    fn probe_failures_exclude_a_backend_until_it_recovers() {
        let pool = pool(3, Balance::LeastConnections);
        let state = PoolState::new(3);
        let key = ip_key([10, 0, 0, 1]);
        assert!(state.set_probe_result(2, false));
        assert!(
            !state.set_probe_result(2, false),
            "no change, no transition"
        );
        assert!(!state.is_available(2));
        for _ in 0..3 {
            assert!(!state.candidates(&pool, &key, &Cell::new(0)).contains(&2));
        }
        assert!(state.set_probe_result(2, true));
        assert!(state.is_available(2));
        state.set_probe_result(0, false);
        state.set_probe_result(1, false);
        state.set_probe_result(2, false);
        assert!(state.candidates(&pool, &key, &Cell::new(0)).is_empty());
    }

    #[test]
    fn header_and_cookie_extraction() {
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let header = HashKey::Header("X-User".to_owned());
        let cookie = HashKey::Cookie("session".to_owned());

        let req = request("x-user:  alice \r\nCookie: theme=dark; session=\"s-42\"; x=1\r\n");
        let got = hash_input(&header, ip, &req);
        assert_eq!(got.header, Some(&b"alice"[..]));
        assert_eq!(got.client_ip, ip);
        assert_eq!(hash_input(&cookie, ip, &req).header, Some(&b"s-42"[..]));
        assert_eq!(hash_input(&HashKey::ClientIp, ip, &req).header, None);

        // A second Cookie header is searched too; names are case-sensitive and whole.
        let req = request("Cookie: Session=no; xsession=no\r\nCookie: session=yes\r\n");
        assert_eq!(hash_input(&cookie, ip, &req).header, Some(&b"yes"[..]));

        // Missing or empty: the client IP decides.
        let req = request("X-User: \r\nCookie: other=1; session\r\n");
        assert_eq!(hash_input(&header, ip, &req).header, None);
        assert_eq!(hash_input(&cookie, ip, &req).header, None);
        let req = request("");
        let fallback = hash_input(&cookie, ip, &req);
        assert_eq!(
            fallback,
            HashInput {
                client_ip: ip,
                header: None
            }
        );
        let pool = pool(3, Balance::Hash(cookie.clone()));
        let state = PoolState::new(3);
        assert_eq!(
            home(&state, &pool, &fallback),
            home(&state, &pool, &ip_key([192, 0, 2, 7]))
        );
    }
}
