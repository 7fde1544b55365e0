//! Fleet model delivery: desired state over MQTT, applied on each box.
//!
//! A box takes signed documents from the retained topics
//! `{prefix}/fleet/desired`, `{prefix}/groups/GROUP/desired` (its groups) and
//! `{prefix}/NODE/desired`, merges them (node over groups over fleet) and
//! applies a new generation: pull → verify → check → load → smoke test →
//! swap → report on `{prefix}/NODE/reported` (retained). Any failure before
//! the swap leaves the models that were serving untouched and reports
//! `rolled_back` with the reason; the folders a swap replaced are kept
//! (`models.d/.fleet/keep/N/NAME`) for the last good generations, and a box
//! killed in the middle of a swap puts them back before it reads its
//! registry. See docs/fleet.md.
//!
//! - [`doc`]: the document format, signatures, merge, plan (pure);
//! - [`store`]: the state on disk, swaps, recovery and garbage collection;
//! - [`apply`]: a generation applied, and the reported state;
//! - [`agent`]: the MQTT connection that feeds [`apply`] and publishes reports;
//! - [`status`]: `inferd fleet status|keygen|sign`.

pub(crate) mod agent;
pub(crate) mod apply;
pub mod doc;
pub mod status;
pub mod store;

use std::path::PathBuf;

/// `[fleet]`: desired state over MQTT.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Take desired state from the broker of `[mqtt]`.
    pub enabled: bool,
    /// The groups this box belongs to (later ones override earlier ones).
    pub groups: Vec<String>,
    /// Public keys whose signed documents are accepted, `NAME:BASE64` (`inferd fleet keygen` prints one).
    pub trusted_keys: Vec<String>,
    /// Files holding more such keys, one a line.
    pub trusted_keys_file: Option<PathBuf>,
    /// Accept unsigned documents: the broker's ACLs are the only guard.
    pub trust_broker: bool,
    /// Generations whose replaced folders are kept for rollback.
    pub keep_generations: usize,
    /// Largest document accepted, KiB.
    pub max_document_kib: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            enabled: false,
            groups: Vec::new(),
            trusted_keys: Vec::new(),
            trusted_keys_file: None,
            trust_broker: false,
            keep_generations: 2,
            max_document_kib: doc::MAX_DOCUMENT >> 10,
        }
    }
}

impl FleetConfig {
    /// The keys trusted, or why one cannot be read.
    pub fn keys(&self) -> Result<Vec<doc::TrustedKey>, String> {
        let mut lines: Vec<String> = self.trusted_keys.clone();
        if let Some(f) = &self.trusted_keys_file {
            let text =
                std::fs::read_to_string(f).map_err(|e| format!("fleet.trusted_keys_file {}: {e}", f.display()))?;
            lines
                .extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        }
        lines.iter().map(|l| doc::TrustedKey::parse(l).map_err(|e| format!("fleet.trusted_keys: {e}"))).collect()
    }

    /// Whether the settings can run, and why not.
    pub fn validate(&self, mqtt: &crate::config::MqttConfig) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if mqtt.url.is_none() {
            return Err("fleet.enabled needs [mqtt] url: desired state comes from the broker".into());
        }
        if let Some(g) = self.groups.iter().find(|g| !doc::valid_id(g)) {
            return Err(format!("fleet.groups: '{g}' is not a plain name (A-Z a-z 0-9 . _ -)"));
        }
        let node = mqtt.node();
        if !doc::valid_id(&node) || ["fleet", "groups", "jobs"].contains(&node.as_str()) {
            return Err(format!(
                "mqtt.node_id '{node}' cannot carry desired state (a plain name, not fleet/groups/jobs)"
            ));
        }
        if self.keys()?.is_empty() && !self.trust_broker {
            return Err(
                "fleet: no fleet.trusted_keys, and fleet.trust_broker is off: no document could be accepted".into()
            );
        }
        if self.max_document_kib == 0 {
            return Err("fleet.max_document_kib must be at least 1".into());
        }
        Ok(())
    }
}
