//! Custom resource types. Their doc comments become the CRDs' descriptions.

pub mod rabbit_cluster;

pub use rabbit_cluster::*;
pub mod rabbit_migration;

pub use rabbit_migration::*;
