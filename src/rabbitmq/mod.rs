//! The broker side: version rules, the HA plan and the management API.

pub mod broker;
pub mod ha;
pub mod management;
pub mod queue_type;
pub mod scale_down;
pub mod version;
