//! Connection limits, global and per client IP, counted across all cores.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Live connection counts. One lock for the per-IP map: it is taken twice per connection
/// (admit, release), never per frame.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The gateway holds `max_connections` already.
    Total,
    /// This client IP holds `max_connections_per_ip` already.
    PerIp,
}

impl Refusal {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Total => "too many connections",
            Self::PerIp => "too many connections from this address",
        }
    }
}

/// An admitted connection; dropping it gives the slots back.
#[derive(Debug)]
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    /// Takes a slot for a connection from `ip`, unless a limit is reached.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<Admitted, Refusal> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        let mut per_ip = self
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::PerIp);
        }
        *count += 1;
        Ok(Admitted {
            admission: Arc::clone(self),
            ip,
        })
    }

    /// Connections currently admitted.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_ip = self
            .admission
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_release() {
        let admission = Arc::new(Admission::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = admission.admit(a, 3, 2).unwrap();
        let _second = admission.admit(a, 3, 2).unwrap();
        assert_eq!(admission.admit(a, 3, 2).unwrap_err(), Refusal::PerIp);
        let _third = admission.admit(b, 3, 2).unwrap();
        assert_eq!(admission.admit(b, 3, 2).unwrap_err(), Refusal::Total);
        assert_eq!(admission.total(), 3);
        drop(first);
        assert!(admission.admit(a, 3, 2).is_ok());
        assert_eq!(admission.total(), 2, "the temporary admission was released");
    }
}
