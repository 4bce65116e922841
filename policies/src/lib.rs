//! mechwatch policies: the TOML schema, validation (with line and column for every error),
//! and evaluation of feature probes, direction probes, steering and ablation checks and drift
//! checks on a model into findings with evidence and a verdict.
//!
//! The shipped policies and our own prompt sets live in `policies/shipped/`.

pub mod checks;
pub mod engine;
pub mod error;
mod instruments;
pub mod lens;
mod lineage;
pub mod load;
pub mod metrics;
pub mod refusal;
pub mod result;
pub mod schema;
pub mod selection;
mod session;
pub mod shipped;
pub mod store;

pub use error::{CheckError, Loc, PolicyError, PolicyErrors};
pub use load::{load_policies, Policy};
pub use result::{Finding, RunResult, Status};
