//! The node's device config (what an APPLY_DEVICE_CONFIG job set): device
//! name, tags, monitoring switches, the services it should run.
//!
//! SKELETON: the interface other modules build on; the device-config work
//! fills it in (stored config, validation, the live copy).

use crate::config::Settings;

/// The services this node should run, as `citadel up` and `citadel
/// services` see them: those of the stored device config, else the
/// `services` setting.
pub fn wanted_services(settings: &Settings) -> Vec<String> {
    settings.services.clone()
}
