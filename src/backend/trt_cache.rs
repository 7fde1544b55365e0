//! TensorRT engine caches as managed state. An engine is only valid for the
//! exact model file, ONNX Runtime and TensorRT versions, GPU, precision and
//! shape profile it was built for; a stale one either fails to deserialize
//! or, worse, loads and misbehaves. So each model's engines live under
//! `{state_dir}/tensorrt/{model}/{key}/`, where the key hashes all of those;
//! a folder with another key is stale and is removed when the model loads,
//! and `manifest.json` in each folder says what it was built for.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Everything an engine depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineIdentity {
    pub model_sha256: String,
    pub onnxruntime: String,
    /// TensorRT's version as its library reports it, or `unknown`.
    pub tensorrt: String,
    /// GPU name and compute capability (or the Jetson module), or `unknown`.
    pub gpu: String,
    /// `fp16` or `fp32`.
    pub precision: String,
    /// The shape profile in ONNX Runtime's form (`x:1x3x32x32/…/…`), empty for static shapes.
    pub profile: String,
}

impl EngineIdentity {
    /// The cache key: the first 16 hex digits of the identity's sha256.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("identity serializes");
        hex::encode(Sha256::digest(json))[..16].to_string()
    }
}

/// The engine folder for `identity` of `model`, created, with its manifest;
/// folders of other keys for the same model (stale engines) are removed.
pub fn prepare(state_dir: &Path, model: &str, identity: &EngineIdentity) -> std::io::Result<PathBuf> {
    let model_dir = state_dir.join("tensorrt").join(model);
    let key = identity.key();
    let dir = model_dir.join(&key);
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&model_dir)? {
        let entry = entry?;
        if entry.file_name() != key.as_str() && entry.file_type()?.is_dir() {
            tracing::info!(model, stale = %entry.path().display(), "removing a TensorRT engine cache built for something else");
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(identity)?)?;
    Ok(dir)
}

/// Whether `dir` holds a built engine.
pub fn has_engine(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "engine")))
        .unwrap_or(false)
}

/// This machine's GPU: `nvidia-smi`'s name and compute capability, else the
/// Jetson module from the device tree, else `unknown`.
pub fn gpu_identity() -> String {
    let smi = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,compute_cap", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(s) = smi {
        return s;
    }
    std::fs::read_to_string("/proc/device-tree/model")
        .map(|m| m.trim_end_matches('\0').trim().to_string())
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// TensorRT's version from its library (`getInferLibVersion`), if one loads.
pub fn tensorrt_version() -> Option<String> {
    for lib in ["libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"] {
        // SAFETY: libnvinfer is TensorRT; getInferLibVersion takes nothing and returns an int.
        let version = unsafe {
            let Ok(l) = libloading::Library::new(lib) else { continue };
            let Ok(f) = l.get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion") else { continue };
            f()
        };
        return Some(decode_version(version));
    }
    None
}

/// TensorRT writes its version as one int: 8.6.1 is 8601, 10.8.0 is 100800.
fn decode_version(v: i32) -> String {
    if v >= 10_000 {
        format!("{}.{}.{}", v / 10_000, (v / 100) % 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v / 100) % 10, v % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> EngineIdentity {
        EngineIdentity {
            model_sha256: "ab".repeat(32),
            onnxruntime: "1.31.1".into(),
            tensorrt: "10.8.0".into(),
            gpu: "Orin (nvgpu), 8.7".into(),
            precision: "fp16".into(),
            profile: String::new(),
        }
    }

    #[test]
    fn every_part_of_the_identity_changes_the_key() {
        let base = identity();
        let variants = [
            EngineIdentity { model_sha256: "cd".repeat(32), ..base.clone() },
            EngineIdentity { onnxruntime: "1.32.0".into(), ..base.clone() },
            EngineIdentity { tensorrt: "10.9.0".into(), ..base.clone() },
            EngineIdentity { gpu: "NVIDIA H100, 9.0".into(), ..base.clone() },
            EngineIdentity { precision: "fp32".into(), ..base.clone() },
            EngineIdentity { profile: "x:1x3x32x32/x:1x3x64x64/x:1x3x96x96".into(), ..base.clone() },
        ];
        for v in &variants {
            assert_ne!(v.key(), base.key(), "{v:?}");
        }
        assert_eq!(base.key(), identity().key(), "stable");
        assert_eq!(base.key().len(), 16);
    }

    #[test]
    fn a_stale_engine_folder_is_removed_and_the_current_one_kept() {
        let state = tempfile::tempdir().unwrap();
        let old = EngineIdentity { tensorrt: "8.6.1".into(), ..identity() };
        let old_dir = prepare(state.path(), "ocr", &old).unwrap();
        std::fs::write(old_dir.join("TensorrtExecutionProvider_model.engine"), b"old").unwrap();
        assert!(has_engine(&old_dir));
        let dir = prepare(state.path(), "ocr", &identity()).unwrap();
        assert!(!old_dir.exists(), "the engine for TensorRT 8.6.1 is gone");
        assert!(!has_engine(&dir), "nothing is built yet for the new identity");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["tensorrt"], "10.8.0");
        std::fs::write(dir.join("x.engine"), b"new").unwrap();
        assert_eq!(prepare(state.path(), "ocr", &identity()).unwrap(), dir);
        assert!(has_engine(&dir), "the current engine survives a reload");
    }

    #[test]
    fn tensorrt_versions_decode_from_their_int() {
        assert_eq!(decode_version(8601), "8.6.1");
        assert_eq!(decode_version(100800), "10.8.0");
    }
}
