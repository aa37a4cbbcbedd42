//! What a reload swaps: the configuration and the pool state built from it. New connections
//! take the current generation; established ones keep the one they started with, so a reload
//! never touches them.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use crate::config::{Config, LoadError, Pool};
use crate::conn::{Settings, settings};
use crate::metrics::{BackendRow, BackendStats, Metrics};
use crate::upgrade::admission::Admission;
use crate::upstream::balance::PoolState;

/// One pool's live state: balancing and ejection, and the counters it exports.
pub(crate) struct PoolRuntime {
    pub(crate) state: Arc<PoolState>,
    pub(crate) stats: Vec<Arc<BackendStats>>,
}

/// A configuration and the pools built from it.
pub(crate) struct Generation {
    pub(crate) config: Config,
    pub(crate) pools: Vec<PoolRuntime>,
    /// Each route's connection settings, without and with permessage-deflate.
    pub(crate) settings: Vec<[Arc<Settings>; 2]>,
}

impl Generation {
    /// The settings of `route`'s connections.
    pub(crate) fn settings(&self, route: usize, deflate: bool) -> Arc<Settings> {
        Arc::clone(&self.settings[route][usize::from(deflate)])
    }
}

/// Who asked for a reload (the `via` field of its log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The process got SIGHUP.
    Signal,
    /// `POST /reload` on the admin listener.
    Admin,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Signal => "sighup",
            Self::Admin => "admin",
        })
    }
}

/// Why a reload did not happen; the running configuration stays in every case. The text
/// is for the operator (several lines when a file has several problems).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReloadError {
    /// The gateway runs from the CLI shorthand: there is no file to re-read.
    NoFile,
    /// The file could not be read (missing, unreadable).
    Unreadable(String),
    /// The file was read but does not parse or validate: every problem, named.
    Invalid(String),
}

impl ReloadError {
    /// The message on one line, for a log field: problems joined with "; ".
    pub(crate) fn one_line(&self) -> String {
        let text = self.to_string();
        let mut out = String::with_capacity(text.len());
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !out.is_empty() {
                out.push_str(if out.ends_with(':') { " " } else { "; " });
            }
            out.push_str(line);
        }
        out
    }
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoFile => f.write_str("no --config file to reload (the CLI shorthand is fixed)"),
            Self::Unreadable(why) | Self::Invalid(why) => f.write_str(why),
        }
    }
}

/// Process-wide state shared by the cores, the admin plane and the signal thread.
pub(crate) struct Shared {
    current: RwLock<Arc<Generation>>,
    /// The file reloads read; `None` for the CLI shorthand (nothing to reload).
    path: Option<PathBuf>,
    health: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
    reload_lock: Mutex<()>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) admission: Arc<Admission>,
    /// Set when a drain begins (`/healthz` then answers 503).
    pub(crate) draining: Arc<AtomicBool>,
}

impl Shared {
    /// Builds the first generation and starts its health checks.
    pub(crate) fn new(config: Config, path: Option<PathBuf>, cores: usize) -> Arc<Self> {
        let generation = Arc::new(build(config, None));
        let shared = Arc::new(Self {
            current: RwLock::new(Arc::clone(&generation)),
            path,
            health: Mutex::new(None),
            reload_lock: Mutex::new(()),
            metrics: Metrics::new(cores),
            admission: Arc::new(Admission::default()),
            draining: Arc::new(AtomicBool::new(false)),
        });
        shared.restart_health(&generation);
        shared
    }

    /// The generation new connections use.
    pub(crate) fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the configuration file and swaps it in for new connections. Logs one line
    /// whatever the outcome, naming `via`; callers only relay the result.
    pub(crate) fn reload(&self, via: Trigger) -> Result<String, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(message) => tracing::info!(%via, "{message}"),
            Err(e) => tracing::warn!(
                %via,
                why = %e.one_line(),
                "reload failed; the running configuration stays"
            ),
        }
        result
    }

    fn try_reload(&self) -> Result<String, ReloadError> {
        let _one_at_a_time = self
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(path) = &self.path else {
            return Err(ReloadError::NoFile);
        };
        let config = Config::load(path).map_err(|e| match e {
            LoadError::Unreadable(why) => ReloadError::Unreadable(why),
            LoadError::Invalid(why) => ReloadError::Invalid(why),
        })?;
        let old = self.current();
        let mut notes = Vec::new();
        if config.listeners != old.config.listeners {
            notes.push("listener changes take effect on restart");
        }
        if config.server != old.config.server {
            notes.push("[server] changes take effect on restart");
        }
        let mut config = config;
        // Process-wide settings stay as started; say so rather than half-apply them.
        config.listeners.clone_from(&old.config.listeners);
        config.server = old.config.server.clone();
        let generation = Arc::new(build(config, Some(&old)));
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&generation);
        self.restart_health(&generation);
        Ok(format!(
            "reloaded {}: {} routes, {} upstreams{}{}",
            path.display(),
            generation.config.routes.len(),
            generation.config.pools.len(),
            if notes.is_empty() { "" } else { "; " },
            notes.join("; ")
        ))
    }

    fn restart_health(&self, generation: &Generation) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((stop, handle)) = health.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            drop(handle.join());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pools = generation
            .config
            .pools
            .iter()
            .zip(&generation.pools)
            .map(|(pool, runtime)| crate::upstream::health::Probed {
                state: Arc::clone(&runtime.state),
                pool: pool.clone(),
                stats: runtime.stats.clone(),
            })
            .collect();
        if let Some(handle) = crate::upstream::health::spawn(pools, Arc::clone(&stop)) {
            *health = Some((stop, handle));
        }
    }

    /// Calls `row` once per backend of the current generation (for `/metrics`).
    pub(crate) fn backend_rows(&self, row: &mut dyn FnMut(BackendRow<'_>)) {
        let generation = self.current();
        for (pool, runtime) in generation.config.pools.iter().zip(&generation.pools) {
            for (i, backend) in pool.backends.iter().enumerate() {
                let name = backend.to_string();
                runtime.stats[i].set_healthy(runtime.state.is_available(i));
                row(runtime.stats[i].row(&pool.name, &name));
            }
        }
    }
}

/// Builds a generation, keeping the live state of pools that did not change (same name and
/// backends), so a reload neither forgets ejections nor resets counters.
fn build(config: Config, old: Option<&Generation>) -> Generation {
    let pools = config
        .pools
        .iter()
        .map(|pool| {
            let kept = old.and_then(|old| {
                old.config
                    .pools
                    .iter()
                    .position(|p| same_backends(p, pool))
                    .map(|i| &old.pools[i])
            });
            match kept {
                Some(runtime) => PoolRuntime {
                    state: Arc::clone(&runtime.state),
                    stats: runtime.stats.clone(),
                },
                None => PoolRuntime {
                    state: PoolState::new(pool.backends.len()),
                    stats: pool.backends.iter().map(|_| Arc::default()).collect(),
                },
            }
        })
        .collect();
    let settings = config
        .routes
        .iter()
        .map(|route| [false, true].map(|deflate| Arc::new(settings(&config, route, deflate))))
        .collect();
    Generation {
        config,
        pools,
        settings,
    }
}

fn same_backends(a: &Pool, b: &Pool) -> bool {
    a.name == b.name && a.backends == b.backends
}
