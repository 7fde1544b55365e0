//! Helpers shared by the integration tests: paths into the repository, the
//! real `inferd` binary, and temporary registries built from shipped models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path below the repository root.
pub fn repo(rel: &str) -> PathBuf {
    root().join(rel)
}

/// The fixtures' expected values, written by scripts/make_fixtures.py.
pub fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo("tests/fixtures/expected.json")).unwrap()).unwrap()
}

/// Runs the real `inferd` binary with `args` in the repository root.
pub fn inferd(args: &[&str]) -> Output {
    inferd_env(args, &[])
}

/// Runs `inferd` with extra environment variables.
pub fn inferd_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferd"));
    cmd.args(args)
        .current_dir(root())
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("inferd runs")
}

/// stdout and stderr of a finished command, as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temporary folder holding `models.json` written from `json`, with the
/// shipped `models/` folder linked beside it so relative paths resolve.
pub struct TempRegistry {
    pub dir: tempfile::TempDir,
}

impl TempRegistry {
    pub fn new(json: &serde_json::Value) -> TempRegistry {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(repo("models"), dir.path().join("models")).unwrap();
        std::fs::write(
            dir.path().join("models.json"),
            serde_json::to_vec_pretty(json).unwrap(),
        )
        .unwrap();
        TempRegistry { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("models.json")
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The shipped models.json as JSON, to edit into broken variants.
pub fn shipped_registry() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo("models.json")).unwrap()).unwrap()
}

/// The shipped entry for model `name`.
pub fn shipped_model(name: &str) -> serde_json::Value {
    shipped_registry()["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap()
        .clone()
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A JSON array of numbers as f64s.
pub fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Whether `path` exists (for messages).
pub fn exists(path: &Path) -> bool {
    path.exists()
}
