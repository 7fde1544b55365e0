//! A real OCI registry for the tests: Debian's `docker-registry` (CNCF
//! distribution) on a free loopback port, artifacts pushed with the `oras`
//! Python SDK (scripts/oci_push.py; scripts/setup.sh installs both).

use super::{repo, shipped_model};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A registry process with its storage in a temporary folder.
pub struct OciRegistry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl OciRegistry {
    /// Anonymous, or with one htpasswd user (a Basic challenge, as private registries answer).
    pub fn start(user: Option<(&str, &str)>) -> OciRegistry {
        Self::start_with(user, None, None)
    }

    /// A second registry over `other`'s storage that answers with a Bearer
    /// challenge: tokens from the service at `realm`, signed by the key of `cert`.
    pub fn start_token_over(other: &OciRegistry, realm: &str, service: &str, issuer: &str, cert: &Path) -> OciRegistry {
        let auth = format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
            cert.display()
        );
        Self::start_config(Some(other.dir.path().join("data")), None, |_| auth)
    }

    /// A second registry over `other`'s storage, serving https with `certs` (server.pem, server.key).
    pub fn start_tls_over(other: &OciRegistry, certs: &Path) -> OciRegistry {
        Self::start_with(None, Some(other.dir.path().join("data")), Some(certs))
    }

    pub fn start_with(user: Option<(&str, &str)>, data: Option<PathBuf>, certs: Option<&Path>) -> OciRegistry {
        Self::start_config(data, certs, |dir| match user {
            Some((u, p)) => {
                let out =
                    Command::new("htpasswd").args(["-Bbn", u, p]).output().expect("htpasswd (apache2-utils) runs");
                std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
                format!("auth:\n  htpasswd:\n    realm: inferd-test\n    path: {}\n", dir.join("htpasswd").display())
            }
            None => String::new(),
        })
    }

    /// A registry with `auth` (given its folder) as its config's auth section.
    fn start_config(data: Option<PathBuf>, certs: Option<&Path>, auth: impl FnOnce(&Path) -> String) -> OciRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let data = data.unwrap_or_else(|| dir.path().join("data"));
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            data.display()
        );
        if let Some(c) = certs {
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.join("server.pem").display(),
                c.join("server.key").display()
            );
        }
        config += &auth(dir.path());
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .args(["serve", &dir.path().join("config.yml").display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry runs (scripts/setup.sh installs it)");
        super::wait_for_port(port, "the registry");
        OciRegistry { port, dir, child }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes every file of `folder` with oras; returns the manifest's digest.
    pub fn push(&self, target: &str, folder: &Path, user: Option<&str>) -> String {
        self.run_push(&[target, &folder.display().to_string()], user)
    }

    /// Pushes `TITLE=FILE` layers by hand (what oras would not publish).
    pub fn push_raw(&self, target: &str, layers: &[(&str, &Path)]) -> String {
        let mut args = vec![target.to_string(), "--raw".into()];
        args.extend(layers.iter().map(|(t, f)| format!("{t}={}", f.display())));
        self.run_push(&args.iter().map(String::as_str).collect::<Vec<_>>(), None)
    }

    pub fn run_push(&self, args: &[&str], user: Option<&str>) -> String {
        let mut cmd = Command::new(repo(".cache/oras-venv/bin/python"));
        cmd.arg(repo("scripts/oci_push.py")).arg(self.host()).args(args);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        let out = cmd.output().expect("the oras venv (scripts/setup.sh) runs");
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped colour classifier as an artifact folder: model.json (paths relative to it) and its files.
pub fn color_artifact(extra: &[(&str, &[u8])], entry_edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut entry = shipped_model("color");
    entry["variants"][0]["file"] = json!("color.onnx");
    entry["variants"][0].as_object_mut().unwrap().remove("sha256");
    entry["labels"] = json!("labels.txt");
    entry_edit(&mut entry);
    std::fs::write(dir.path().join("model.json"), serde_json::to_vec_pretty(&entry).unwrap()).unwrap();
    std::fs::copy(repo("models/color/color.onnx"), dir.path().join("color.onnx")).unwrap();
    std::fs::copy(repo("models/color/labels.txt"), dir.path().join("labels.txt")).unwrap();
    for (name, bytes) in extra {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}
