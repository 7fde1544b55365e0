//! `inferd fleet status`, `keygen` and `sign`: an operator's tools.

use crate::config::{Broker, MqttConfig};
use crate::intake::mqtt_client::{Event, Session, connect};
use base64::Engine as _;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The retained reports of every node under `cfg.prefix`, by node, read for
/// `wait`; each with `"online"` from the node's retained status (its Last
/// Will says false when it dropped off the broker), when there is one.
pub async fn reports(cfg: &MqttConfig, wait: Duration) -> Result<BTreeMap<String, Value>, String> {
    let broker = Broker::parse(cfg)?;
    let link = crate::intake::link::start(&broker, cfg)?;
    let id = format!("inferd-fleet-status-{}", std::process::id());
    let (client, mut events) = connect(cfg, broker.v5, &link.path, &id, None, 4 << 20, Session::Clean)?;
    let mut reported = BTreeMap::new();
    let mut online: BTreeMap<String, bool> = BTreeMap::new();
    let end = Instant::now() + wait;
    let mut connected = false;
    let prefix = format!("{}/", cfg.prefix);
    loop {
        let event = tokio::time::timeout_at(end.into(), events.poll()).await;
        match event {
            Err(_) => break,
            Ok(Ok(Event::Connected)) => {
                connected = true;
                client.subscribe(&format!("{}/+/reported", cfg.prefix)).await?;
                client.subscribe(&format!("{}/+/status", cfg.prefix)).await?;
            }
            Ok(Ok(Event::Message(m))) => {
                let Some(rest) = m.topic.strip_prefix(&prefix) else { continue };
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else { continue };
                if let Some(node) = rest.strip_suffix("/reported") {
                    reported.insert(node.to_string(), v);
                } else if let (Some(node), Some(up)) = (rest.strip_suffix("/status"), v["online"].as_bool()) {
                    online.insert(node.to_string(), up);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) if !connected => return Err(format!("cannot reach the broker: {e}")),
            Ok(Err(e)) => return Err(format!("the broker closed the connection: {e}")),
        }
    }
    client.disconnect().await;
    for (node, report) in reported.iter_mut() {
        if let (Some(up), Some(obj)) = (online.get(node), report.as_object_mut()) {
            obj.insert("online".into(), Value::Bool(*up));
        }
    }
    Ok(reported)
}

/// The table `inferd fleet status` prints: one line a node.
pub fn table(reports: &BTreeMap<String, Value>) -> String {
    let mut rows =
        vec![["NODE", "ONLINE", "GENERATION", "DESIRED", "STATE", "MODELS", "ERROR"].map(String::from).to_vec()];
    for (node, r) in reports {
        let models = r["models"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(name, v)| {
                        let state = v["state"].as_str().unwrap_or("?");
                        match (v["progress"][0].as_u64(), v["progress"][1].as_u64()) {
                            (Some(done), Some(total)) if total > 0 => format!("{name}:{state} {}%", done * 100 / total),
                            (Some(done), _) => format!("{name}:{state} {} MiB", done >> 20),
                            _ => format!("{name}:{state}"),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let error = match (&r["error"], &r["refused"]) {
            (e, _) if e.is_object() => format!(
                "{} {}{}: {}",
                e["stage"].as_str().unwrap_or(""),
                e["model"].as_str().unwrap_or(""),
                e["generation"].as_u64().map(|g| format!(" (generation {g})")).unwrap_or_default(),
                e["message"].as_str().unwrap_or("")
            ),
            (_, f) if f.is_object() => {
                format!("refused {}: {}", f["kind"].as_str().unwrap_or(""), f["message"].as_str().unwrap_or(""))
            }
            _ => String::new(),
        };
        let online = match r["online"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        rows.push(vec![
            node.clone(),
            online.to_string(),
            r["generation"].to_string(),
            r["desired_generation"].to_string(),
            r["state"].as_str().unwrap_or("?").to_string(),
            if models.is_empty() { "-".into() } else { models },
            error,
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Writes a new signing key `NAME.key` (mode 0600) in `dir`; returns the
/// public key line to trust (`NAME:BASE64`), also written to `NAME.pub`.
pub fn keygen(name: &str, dir: &Path) -> Result<(PathBuf, String), String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    if !super::doc::valid_id(name) {
        return Err(format!("'{name}' is not a plain key name (A-Z a-z 0-9 . _ -)"));
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let file = dir.join(format!("{name}.key"));
    let b64 = base64::engine::general_purpose::STANDARD;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| f.write_all(format!("{}\n", b64.encode(seed)).as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let public = format!("{name}:{}", b64.encode(key.verifying_key().to_bytes()));
    std::fs::write(dir.join(format!("{name}.pub")), format!("{public}\n"))
        .map_err(|e| format!("cannot write {name}.pub: {e}"))?;
    Ok((file, public))
}

/// Signs the document in `doc` with the key in `key_file` (named by the file's stem, or `name`).
pub fn sign_file(doc: &Path, key_file: &Path, name: Option<&str>) -> Result<Value, String> {
    let text = std::fs::read_to_string(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{} is not a key `inferd fleet keygen` wrote", key_file.display()))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let name = match name {
        Some(n) => n.to_string(),
        None => key_file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let value: Value = serde_json::from_slice(&std::fs::read(doc).map_err(|e| format!("{}: {e}", doc.display()))?)
        .map_err(|e| format!("{} is not JSON: {e}", doc.display()))?;
    if !value.is_object() {
        return Err("a document is a JSON object".into());
    }
    Ok(super::doc::sign(&value, &name, &key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_has_a_line_a_node_with_progress_and_the_reason() {
        let reports: BTreeMap<String, Value> = [
            (
                "cam-1".to_string(),
                json!({"generation": 2, "desired_generation": 3, "state": "applying", "online": true,
                "models": {"big": {"state": "pulling", "progress": [1048576, 4194304]}, "color": {"state": "loaded"}}}),
            ),
            (
                "cam-2".to_string(),
                json!({"generation": 2, "desired_generation": 3, "state": "rolled_back", "models": {},
                "error": {"generation": 3, "model": "big", "stage": "digest", "message": "not the digest"}}),
            ),
        ]
        .into_iter()
        .collect();
        let t = table(&reports);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NODE") && lines.len() == 3, "{t}");
        assert!(lines[1].contains("applying") && lines[1].contains("big:pulling 25%,color:loaded"), "{t}");
        assert!(lines[1].starts_with("cam-1  yes") && lines[2].starts_with("cam-2  ?"), "{t}");
        assert!(lines[2].contains("digest big (generation 3): not the digest") && lines[2].contains(" -  "), "{t}");
    }
}
