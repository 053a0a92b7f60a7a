//! ovlconf: a conformance suite for Linux overlayfs.
//!
//! The pipeline, one module a stage:
//! [`scenario`] (parse) → [`layers`] (build layers) → [`mount`] →
//! [`steps`] (run steps) → [`observe`] → [`compare`] (and snapshot) →
//! [`report`]. [`harness`] turns scenarios into trials; [`sandbox`] gives
//! each trial its own namespaces; [`probe`] finds what the kernel can do;
//! [`kmsg`] watches the kernel log and taint while a trial runs.

pub mod baseline;
pub mod bench;
pub mod compare;
pub mod coverage;
pub mod errno;
pub mod harness;
pub mod html;
pub mod implementation;
pub mod kmsg;
pub mod layers;
pub mod matrix;
pub mod mount;
pub mod observe;
pub mod probe;
pub mod report;
pub mod sandbox;
pub mod scenario;
pub mod schema;
pub mod spec;
pub mod steps;
pub mod trial;
