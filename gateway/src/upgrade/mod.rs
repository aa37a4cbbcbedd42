//! Before the `101`: admission at accept, the client's request, the route, the backend's
//! upgrade, and every refusal (statuses from `crate::policy`).
//!
//! - `admission.rs`: connection limits, taken at accept;
//! - `machine.rs`: the upgrade as a state machine, from accept to the `101` or a refusal.
#![forbid(unsafe_code)]

pub(crate) mod admission;
mod machine;

pub(crate) use machine::Upgrade;
