//! Desired-state documents: their format, their signature, the merge of a
//! box's layers (node over groups over fleet) and the plan that takes the
//! models applied now to the ones desired. Pure functions, table-tested.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Largest document accepted, by default (`fleet.max_document_kib`).
pub const MAX_DOCUMENT: usize = 256 << 10;

/// A document as published: a generation, the layer it is for (signed with
/// it, so it cannot be replayed on another layer's topic), the models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Raised by the operator with every document (one counter for the fleet).
    pub generation: u64,
    /// `fleet`, `group/NAME` or `node/NODE`: the topic it must arrive on.
    pub target: String,
    /// Models by name; `null` takes a model a lower layer names away.
    #[serde(default)]
    pub models: BTreeMap<String, Option<Desired>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// One model as desired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    /// `oci://REGISTRY/REPOSITORY@sha256:…` (or `:TAG` with `digest`),
    /// `https://HOST/FOLDER/` or `hf://ORG/REPO@REVISION` with `digest` (its SHA256SUMS's).
    pub source: String,
    /// The artifact's manifest digest, `sha256:…` (what `oras push` prints; for a
    /// folder or Hub source, its SHA256SUMS file's sha256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Loaded once applied, not on its first job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preload: bool,
    /// Never unloaded for memory or idleness.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin: bool,
    /// The golden job the model must answer before it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke: Option<Smoke>,
}

/// A smoke test: a job and the answer expected, numbers within `tolerance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smoke {
    /// The job as an MQTT JSON envelope (`{"image_base64": …}`, `{"inputs": …}`, `{"prompt": …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Or a file of the artifact, sent as a raw MQTT payload (an image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// What the answer must contain: every key given, with this value
    /// (arrays element by element, numbers within the tolerance).
    pub expect: Value,
    /// Largest difference allowed between numbers (absolute).
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

fn default_tolerance() -> f64 {
    1e-4
}

/// An Ed25519 signature by a named key over the canonical document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub key: String,
    /// The 64-byte signature, base64.
    pub ed25519: String,
}

/// The layer a document is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Layer {
    Fleet,
    Group(String),
    Node(String),
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layer::Fleet => write!(f, "fleet"),
            Layer::Group(g) => write!(f, "group/{g}"),
            Layer::Node(n) => write!(f, "node/{n}"),
        }
    }
}

impl From<Layer> for String {
    fn from(l: Layer) -> String {
        l.to_string()
    }
}

impl TryFrom<String> for Layer {
    type Error = String;
    fn try_from(s: String) -> Result<Layer, String> {
        match s.split_once('/') {
            None if s == "fleet" => Ok(Layer::Fleet),
            Some(("group", g)) if valid_id(g) => Ok(Layer::Group(g.to_string())),
            Some(("node", n)) if valid_id(n) => Ok(Layer::Node(n.to_string())),
            _ => Err(format!("'{s}' is not a target: fleet, group/NAME or node/NODE")),
        }
    }
}

/// A group or node name: a plain topic level.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The desired-state topics of a node, as pure functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTopics {
    pub prefix: String,
    pub node: String,
    pub groups: Vec<String>,
}

impl FleetTopics {
    /// What the node subscribes to: the fleet's, each group's, its own desired state.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut all = vec![self.desired(&Layer::Fleet)];
        all.extend(self.groups.iter().map(|g| self.desired(&Layer::Group(g.clone()))));
        all.push(self.desired(&Layer::Node(self.node.clone())));
        all
    }

    /// Where `layer`'s document is published (retained).
    pub fn desired(&self, layer: &Layer) -> String {
        match layer {
            Layer::Fleet => format!("{}/fleet/desired", self.prefix),
            Layer::Group(g) => format!("{}/groups/{g}/desired", self.prefix),
            Layer::Node(n) => format!("{}/{n}/desired", self.prefix),
        }
    }

    /// The layer of a desired topic of this node's, or `None`.
    pub fn layer_of(&self, topic: &str) -> Option<Layer> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?.strip_suffix("/desired")?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["fleet"] => Some(Layer::Fleet),
            ["groups", g] if self.groups.iter().any(|x| x == g) => Some(Layer::Group(g.to_string())),
            [n] if *n == self.node => Some(Layer::Node(n.to_string())),
            _ => None,
        }
    }

    /// Where this node reports (retained).
    pub fn reported(&self) -> String {
        reported_topic(&self.prefix, &self.node)
    }
}

/// `{prefix}/{node}/reported`.
pub fn reported_topic(prefix: &str, node: &str) -> String {
    format!("{prefix}/{node}/reported")
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocError {
    pub kind: DocErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DocErrorKind {
    /// Larger than `fleet.max_document_kib`.
    TooLarge,
    /// Not JSON, or not a document (unknown or missing fields, bad values).
    Malformed,
    /// No signature, and the broker is not trusted.
    Unsigned,
    /// Signed by a key the box does not trust, or the signature does not verify.
    BadSignature,
    /// Published on another layer's topic than its `target`.
    WrongTarget,
    /// A generation not above the one this layer last had.
    Stale,
}

impl DocError {
    fn new(kind: DocErrorKind, message: impl Into<String>) -> DocError {
        DocError { kind, message: message.into() }
    }
}

impl std::fmt::Display for DocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A public key the box trusts, by name.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub name: String,
    pub key: ed25519_dalek::VerifyingKey,
}

impl TrustedKey {
    /// `NAME:BASE64` (what `inferd fleet keygen` prints).
    pub fn parse(s: &str) -> Result<TrustedKey, String> {
        let (name, b64) = s.split_once(':').ok_or_else(|| format!("'{s}' is not NAME:BASE64"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("key '{name}': not base64: {e}"))?;
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|_| format!("key '{name}': an Ed25519 public key is 32 bytes"))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|e| format!("key '{name}': not an Ed25519 public key: {e}"))?;
        Ok(TrustedKey { name: name.to_string(), key })
    }
}

/// The bytes a signature covers: the document without `signature`, object
/// keys sorted by their UTF-8 bytes at every level, no whitespace, strings
/// and numbers as serde_json writes them (integers in decimal).
pub fn canonical(value: &Value) -> Vec<u8> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let mut v = sorted(value);
    if let Value::Object(m) = &mut v {
        m.shift_remove("signature");
    }
    serde_json::to_vec(&v).expect("JSON values serialise")
}

/// Signs `doc` (a document's JSON) with `key`, named `name`: the document with its `signature` set.
pub fn sign(doc: &Value, name: &str, key: &ed25519_dalek::SigningKey) -> Value {
    use ed25519_dalek::Signer;
    let sig = key.sign(&canonical(doc));
    let mut out = doc.clone();
    if let Value::Object(m) = &mut out {
        m.insert(
            "signature".into(),
            serde_json::json!({"key": name, "ed25519": base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())}),
        );
    }
    out
}

/// Reads a document that arrived on `layer`'s topic: size, JSON, signature
/// (unless `trust_broker` and it has none), fields, target, names and sources.
pub fn read(
    payload: &[u8],
    layer: &Layer,
    keys: &[TrustedKey],
    trust_broker: bool,
    max: usize,
) -> Result<Document, DocError> {
    use DocErrorKind::*;
    if payload.len() > max {
        return Err(DocError::new(
            TooLarge,
            format!("the document is {} bytes, over the {max} allowed", payload.len()),
        ));
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| DocError::new(Malformed, format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(DocError::new(Malformed, "a document is a JSON object"));
    }
    match value.get("signature") {
        Some(sig) => {
            let sig: Signature =
                serde_json::from_value(sig.clone()).map_err(|e| DocError::new(Malformed, format!("signature: {e}")))?;
            let key = keys.iter().find(|k| k.name == sig.key).ok_or_else(|| {
                DocError::new(BadSignature, format!("signed by key '{}', which this box does not trust", sig.key))
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&sig.ed25519)
                .ok()
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
                .ok_or_else(|| DocError::new(BadSignature, "signature.ed25519 is not 64 bytes of base64"))?;
            key.key
                .verify_strict(&canonical(&value), &ed25519_dalek::Signature::from_bytes(&bytes))
                .map_err(|_| DocError::new(BadSignature, format!("the signature by '{}' does not verify", sig.key)))?;
        }
        None if trust_broker => {}
        None => {
            return Err(DocError::new(
                Unsigned,
                "the document is not signed (sign it with `inferd fleet sign`, or set fleet.trust_broker)",
            ));
        }
    }
    let doc: Document = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(payload))
        .map_err(|e| DocError::new(Malformed, format!("{}: {}", e.path(), e.inner())))?;
    if doc.generation == 0 {
        return Err(DocError::new(Malformed, "generation: generations start at 1"));
    }
    let target = Layer::try_from(doc.target.clone()).map_err(|e| DocError::new(Malformed, format!("target: {e}")))?;
    if &target != layer {
        return Err(DocError::new(
            WrongTarget,
            format!("the document is for {target} and arrived on the topic of {layer}"),
        ));
    }
    for (name, desired) in &doc.models {
        if !crate::registry::valid_name(name) {
            return Err(DocError::new(Malformed, format!("models: '{}' is not a model name", name.escape_debug())));
        }
        if let Some(d) = desired {
            check_desired(d).map_err(|m| DocError::new(Malformed, format!("models.{name}: {m}")))?;
        }
    }
    Ok(doc)
}

fn check_desired(d: &Desired) -> Result<(), String> {
    let source = crate::pull::Source::parse(&d.source, &crate::pull::PullConfig::default())
        .map_err(|e| format!("source: {}", e.message))?;
    let pinned = source.pinned();
    match (&d.digest, pinned) {
        (Some(digest), _) if !is_digest(digest) => {
            return Err(format!("digest '{digest}' is not sha256:64 hex digits"));
        }
        (Some(digest), Some(p)) if !digest.eq_ignore_ascii_case(p) => {
            return Err(format!("digest {digest} and the source's {p} differ"));
        }
        (None, None) => {
            return Err(
                "the source needs its digest (a tag or a folder may change; a rollout names exactly one artifact)"
                    .into(),
            );
        }
        _ => {}
    }
    if let Some(s) = &d.smoke {
        match (&s.input, &s.file) {
            (Some(_), None) => {}
            (None, Some(f)) => crate::pull::check_file_name(f).map_err(|e| format!("smoke.file: {}", e.message))?,
            _ => {
                return Err(
                    "smoke: give input (an MQTT job envelope) or file (one of the artifact's), one of them".into()
                );
            }
        }
        if !(s.tolerance.is_finite() && s.tolerance >= 0.0) {
            return Err("smoke.tolerance is a number ≥ 0".into());
        }
    }
    Ok(())
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Desired {
    /// The manifest digest this entry names.
    pub fn digest(&self) -> Option<String> {
        self.digest
            .clone()
            .or_else(|| self.source.rsplit_once('@').map(|(_, d)| d.to_string()).filter(|d| d.starts_with("sha256:")))
    }
}

/// The models a box wants: its layers merged, node over its groups (later
/// groups of the config over earlier ones) over the fleet; a `null` entry
/// takes the model away. The generation is the highest of the layers'.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Merged {
    pub generation: u64,
    pub models: BTreeMap<String, Desired>,
}

impl Merged {
    /// A short name for exactly this set of models (sha256 of its JSON, 16 hex digits).
    pub fn id(&self) -> String {
        use sha2::Digest;
        let bytes = serde_json::to_vec(&self.models).expect("JSON");
        hex::encode(&sha2::Sha256::digest(&bytes)[..8])
    }
}

/// Merges `docs` in the order given (lowest layer first).
pub fn merge<'a>(docs: impl IntoIterator<Item = &'a Document>) -> Merged {
    let mut out = Merged::default();
    for doc in docs {
        out.generation = out.generation.max(doc.generation);
        for (name, desired) in &doc.models {
            match desired {
                Some(d) => out.models.insert(name.clone(), d.clone()),
                None => out.models.remove(name),
            };
        }
    }
    out
}

/// What applying `to` over `from` does, by model name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// New or changed: pulled, checked, smoke-tested, swapped in.
    pub fetch: Vec<String>,
    /// Desired no more: taken out.
    pub remove: Vec<String>,
    /// Unchanged.
    pub keep: Vec<String>,
}

/// The plan from the models applied to the models desired.
pub fn plan(from: &BTreeMap<String, Desired>, to: &BTreeMap<String, Desired>) -> Plan {
    let mut p = Plan::default();
    for (name, d) in to {
        match from.get(name) {
            Some(now) if now == d => p.keep.push(name.clone()),
            _ => p.fetch.push(name.clone()),
        }
    }
    p.remove = from.keys().filter(|n| !to.contains_key(*n)).cloned().collect();
    p
}

/// Whether `got` holds `expect`: every key of an expected object present
/// with a matching value, arrays of the same length element by element,
/// numbers within `tolerance`, everything else equal. The first mismatch, by path, if not.
pub fn matches(expect: &Value, got: &Value, tolerance: f64) -> Result<(), String> {
    fn walk(e: &Value, g: &Value, tol: f64, path: &mut String) -> Result<(), String> {
        match (e, g) {
            (Value::Object(em), Value::Object(gm)) => {
                for (k, ev) in em {
                    let gv = gm.get(k).ok_or_else(|| format!("{path}.{k} is missing"))?;
                    let len = path.len();
                    path.push('.');
                    path.push_str(k);
                    walk(ev, gv, tol, path)?;
                    path.truncate(len);
                }
                Ok(())
            }
            (Value::Array(ea), Value::Array(ga)) => {
                if ea.len() != ga.len() {
                    return Err(format!("{path} has {} items, {} expected", ga.len(), ea.len()));
                }
                for (i, (ev, gv)) in ea.iter().zip(ga).enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(ev, gv, tol, path)?;
                    path.truncate(len);
                }
                Ok(())
            }
            (Value::Number(en), Value::Number(gn)) => {
                let (a, b) = (en.as_f64().unwrap_or(f64::NAN), gn.as_f64().unwrap_or(f64::NAN));
                if (a - b).abs() <= tol { Ok(()) } else { Err(format!("{path} is {gn}, {en} ± {tol} expected")) }
            }
            (e, g) if e == g => Ok(()),
            (e, g) => Err(format!("{path} is {g}, {e} expected")),
        }
    }
    let mut path = "$".to_string();
    walk(expect, got, tolerance, &mut path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn desired(d: &str) -> Desired {
        Desired { source: format!("oci://r.example/m@{d}"), digest: None, preload: false, pin: false, smoke: None }
    }

    fn doc(generation: u64, target: &str, models: &[(&str, Option<&str>)]) -> Document {
        Document {
            generation,
            target: target.into(),
            models: models.iter().map(|(n, d)| (n.to_string(), d.map(desired))).collect(),
            signature: None,
        }
    }

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
    }

    fn trusted() -> Vec<TrustedKey> {
        let public = base64::engine::general_purpose::STANDARD.encode(key().verifying_key().to_bytes());
        vec![TrustedKey::parse(&format!("ops:{public}")).unwrap()]
    }

    #[test]
    fn topics_name_each_layer_and_only_this_nodes() {
        let t = FleetTopics { prefix: "inferd".into(), node: "cam-1".into(), groups: vec!["canary".into()] };
        assert_eq!(t.subscriptions(), ["inferd/fleet/desired", "inferd/groups/canary/desired", "inferd/cam-1/desired"]);
        assert_eq!(t.layer_of("inferd/fleet/desired"), Some(Layer::Fleet));
        assert_eq!(t.layer_of("inferd/groups/canary/desired"), Some(Layer::Group("canary".into())));
        assert_eq!(t.layer_of("inferd/cam-1/desired"), Some(Layer::Node("cam-1".into())));
        assert_eq!(t.layer_of("inferd/groups/other/desired"), None);
        assert_eq!(t.layer_of("inferd/cam-2/desired"), None);
        assert_eq!(t.layer_of("inferd/cam-1/reported"), None);
        assert_eq!(t.reported(), "inferd/cam-1/reported");
        assert_eq!(Layer::try_from("group/a/b".to_string()).ok(), None);
    }

    #[test]
    fn node_overrides_groups_override_fleet_and_null_takes_away() {
        let fleet = doc(3, "fleet", &[("a", Some(DIGEST)), ("b", Some(DIGEST))]);
        let group = doc(5, "group/canary", &[("a", Some(OTHER)), ("c", Some(DIGEST))]);
        let node = doc(4, "node/cam-1", &[("b", None)]);
        let m = merge([&fleet, &group, &node]);
        assert_eq!(m.generation, 5);
        assert_eq!(m.models.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(m.models["a"].digest().as_deref(), Some(OTHER));
        let p = plan(&merge([&fleet]).models, &m.models);
        assert_eq!(p, Plan { fetch: vec!["a".into(), "c".into()], remove: vec!["b".into()], keep: vec![] });
        assert_eq!(plan(&m.models, &m.models).keep, ["a", "c"]);
    }

    #[test]
    fn a_signed_document_verifies_and_any_change_or_other_topic_is_refused() {
        let d = json!({"generation": 2, "target": "fleet", "models": {"a": {"source": format!("oci://r.example/m@{DIGEST}"), "preload": true}}});
        let signed = sign(&d, "ops", &key());
        let bytes = serde_json::to_vec_pretty(&signed).unwrap();
        let got = read(&bytes, &Layer::Fleet, &trusted(), false, MAX_DOCUMENT).unwrap();
        assert!(got.models["a"].as_ref().unwrap().preload);
        // Keys in another order, other whitespace: the same canonical bytes.
        let reordered = format!(
            "{{\"signature\": {},\n \"models\": {{\"a\": {{\"preload\": true, \"source\": \"oci://r.example/m@{DIGEST}\"}}}}, \"target\": \"fleet\", \"generation\": 2}}",
            signed["signature"]
        );
        assert!(read(reordered.as_bytes(), &Layer::Fleet, &trusted(), false, MAX_DOCUMENT).is_ok());
        let mut forged = signed.clone();
        forged["generation"] = json!(3);
        let e = read(&serde_json::to_vec(&forged).unwrap(), &Layer::Fleet, &trusted(), false, MAX_DOCUMENT);
        assert_eq!(e.unwrap_err().kind, DocErrorKind::BadSignature);
        let e = read(&bytes, &Layer::Group("canary".into()), &trusted(), false, MAX_DOCUMENT);
        assert_eq!(e.unwrap_err().kind, DocErrorKind::WrongTarget);
        let e = read(&serde_json::to_vec(&d).unwrap(), &Layer::Fleet, &trusted(), false, MAX_DOCUMENT);
        assert_eq!(e.unwrap_err().kind, DocErrorKind::Unsigned);
        assert!(read(&serde_json::to_vec(&d).unwrap(), &Layer::Fleet, &[], true, MAX_DOCUMENT).is_ok());
        let other = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let e = read(&serde_json::to_vec(&sign(&d, "ops", &other)).unwrap(), &Layer::Fleet, &trusted(), false, 1 << 20);
        assert_eq!(e.unwrap_err().kind, DocErrorKind::BadSignature);
        let e = read(&serde_json::to_vec(&sign(&d, "dev", &key())).unwrap(), &Layer::Fleet, &trusted(), false, 1 << 20);
        assert!(e.unwrap_err().message.contains("'dev'"));
    }

    #[test]
    fn malformed_documents_get_their_reason() {
        let cases: &[(&str, DocErrorKind, &str)] = &[
            ("not json", DocErrorKind::Malformed, "not JSON"),
            ("[1]", DocErrorKind::Malformed, "object"),
            (r#"{"generation": 1, "target": "fleet", "extra": 1}"#, DocErrorKind::Malformed, "extra"),
            (r#"{"generation": -1, "target": "fleet"}"#, DocErrorKind::Malformed, "generation"),
            (r#"{"generation": 0, "target": "fleet"}"#, DocErrorKind::Malformed, "start at 1"),
            (r#"{"generation": 1, "target": "everyone"}"#, DocErrorKind::Malformed, "target"),
            (
                r#"{"generation": 1, "target": "fleet", "models": {"../x": null}}"#,
                DocErrorKind::Malformed,
                "model name",
            ),
            (
                r#"{"generation": 1, "target": "fleet", "models": {"a": {"source": "oci://r.example/m:latest"}}}"#,
                DocErrorKind::Malformed,
                "needs its digest",
            ),
            (
                r#"{"generation": 1, "target": "fleet", "models": {"a": {"source": "ftp://x/y/"}}}"#,
                DocErrorKind::Malformed,
                "source",
            ),
            (
                r#"{"generation": 1, "target": "fleet", "models": {"a": {"source": "https://x/y/"}}}"#,
                DocErrorKind::Malformed,
                "needs its digest",
            ),
            (
                r#"{"generation": 1, "target": "fleet", "models": {"a": {"source": "oci://r.example/m:v1", "digest": "sha256:12"}}}"#,
                DocErrorKind::Malformed,
                "digest",
            ),
            (
                r#"{"generation": 1, "target": "fleet", "models": {"a": {"source": "oci://r.example/m:v1", "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111", "smoke": {"file": "../etc/passwd", "expect": {}}}}}"#,
                DocErrorKind::Malformed,
                "smoke.file",
            ),
        ];
        for (text, kind, says) in cases {
            let e = read(text.as_bytes(), &Layer::Fleet, &[], true, MAX_DOCUMENT).unwrap_err();
            assert_eq!((e.kind, e.message.contains(says)), (*kind, true), "{text}: {}", e.message);
        }
        let big = format!(r#"{{"generation": 1, "target": "fleet", "pad": "{}"}}"#, "x".repeat(300 << 10));
        assert_eq!(
            read(big.as_bytes(), &Layer::Fleet, &[], true, MAX_DOCUMENT).unwrap_err().kind,
            DocErrorKind::TooLarge
        );
    }

    #[test]
    fn answers_match_by_subset_with_a_tolerance() {
        let got = json!({"model": "m", "result": {"classes": [{"label": "red", "score": 0.91}, {"label": "blue", "score": 0.05}]}});
        assert!(
            matches(&json!({"result": {"classes": [{"label": "red", "score": 0.9}, {"label": "blue"}]}}), &got, 0.02)
                .is_ok()
        );
        let e = matches(&json!({"result": {"classes": [{"label": "red", "score": 0.8}, {}]}}), &got, 0.02).unwrap_err();
        assert!(e.contains("$.result.classes[0].score"), "{e}");
        assert!(
            matches(&json!({"result": {"classes": [{"label": "blue"}, {}]}}), &got, 1.0).unwrap_err().contains("label")
        );
        assert!(matches(&json!({"result": {"classes": [{}]}}), &got, 1.0).unwrap_err().contains("2 items"));
        assert!(matches(&json!({"result": {"boxes": []}}), &got, 1.0).unwrap_err().contains("missing"));
    }
}
