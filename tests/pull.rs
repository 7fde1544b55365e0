//! `inferd pull` against a real OCI registry: Debian's `docker-registry`
//! (CNCF distribution) on a free loopback port, artifacts pushed with the
//! `oras` Python SDK (scripts/oci_push.py; scripts/setup.sh installs both).

mod util;

use base64::Engine as _;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::oci::{OciRegistry, color_artifact};
use util::*;

/// An empty registry folder (models.json with no models) to pull into.
fn empty_registry() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("models.json");
    std::fs::write(&file, r#"{"version": 1, "models": []}"#).unwrap();
    (dir, file)
}

fn pull(models: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, Value, String) {
    let mut all = vec!["pull", "--models", models.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    // No credentials unless the test gives an auth file.
    let nowhere = std::env::temp_dir().join("inferd-tests-no-docker-config");
    let mut env: Vec<(&str, &str)> = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "DOCKER_CONFIG") {
        env.push(("DOCKER_CONFIG", nowhere.to_str().unwrap()));
    }
    let out = inferd_env(&all, &env);
    let (stdout, stderr) = text(&out);
    let json = stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

#[test]
fn a_model_pulled_by_tag_and_by_digest_is_checked_and_serves() {
    let reg = OciRegistry::start(None);
    let art = color_artifact(&[], |_| {});
    let digest = reg.push("models/color:1", art.path(), None);
    let (dir, models) = empty_registry();
    let source = format!("oci://{}/models/color:1", reg.host());
    let (code, got, stderr) = pull(&models, &[&source, "--name", "color-pulled"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got["digest"], digest.as_str(), "{got}");
    assert_eq!(got["files"].as_array().unwrap().len(), 3, "{got}");
    assert!(stderr.contains("color.onnx: sha256"), "progress on stderr: {stderr}");
    // The entry has its sum, the files are in models.d/NAME, nothing is left in the staging folder.
    let folder = dir.path().join("models.d/color-pulled");
    let entry: Value = serde_json::from_slice(&std::fs::read(folder.join("model.json")).unwrap()).unwrap();
    assert_eq!(entry["name"], "color-pulled");
    assert_eq!(entry["variants"][0]["sha256"], sha256_of(&repo("models/color/color.onnx")).as_str());
    assert!(!dir.path().join("models.d/.pull/color-pulled").exists());
    let out = inferd(&["check", "--models", models.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out =
        inferd(&["infer", "--local", "--models", models.to_str().unwrap(), "-m", "color-pulled", "examples/red.jpg"]);
    assert!(out.status.success() && text(&out).0.contains("red"), "{:?}", text(&out));
    // By digest: the same files, all already here, none fetched.
    let by_digest = format!("oci://{}/models/color@{digest}", reg.host());
    let (code, again, stderr) = pull(&models, &[&by_digest, "--name", "color-pulled"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((again["downloaded"].as_u64(), again["digest"].as_str()), (Some(0), Some(digest.as_str())), "{again}");
    // A digest the registry does not have, and a tag it does not have.
    let missing = format!("oci://{}/models/color@sha256:{}", reg.host(), "0".repeat(64));
    let (code, _, stderr) = pull(&models, &[&missing], &[]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
    let (code, _, stderr) = pull(&models, &[&format!("oci://{}/models/color:nope", reg.host())], &[]);
    assert_eq!(code, 5, "{stderr}");
}

#[test]
fn an_https_registry_is_verified_against_the_system_and_the_configured_ca() {
    let plain = OciRegistry::start(None);
    let art = color_artifact(&[], |_| {});
    plain.push("models/color:1", art.path(), None);
    let certs = tempfile::tempdir().unwrap();
    util::broker::make_certs(certs.path());
    let tls = OciRegistry::start_tls_over(&plain, certs.path());
    let (dir, models) = empty_registry();
    let source = format!("oci://{}/models/color:1", tls.host());
    // Its certificate comes from a site CA the system does not know: refused (and it speaks no plain http).
    let (code, _, stderr) = pull(&models, &[&source], &[]);
    assert_eq!(code, 8, "{stderr}");
    assert!(stderr.contains("TLS with 127.0.0.1") && stderr.contains("certificate"), "{stderr}");
    let ca = certs.path().join("ca.pem");
    let (code, got, stderr) = pull(&models, &[&source], &[("INFERD_PULL__CA_FILE", ca.to_str().unwrap())]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got["name"], "color");
    assert!(dir.path().join("models.d/color/color.onnx").is_file());
}

#[test]
fn a_private_repository_is_pulled_with_the_auth_files_credentials() {
    let reg = OciRegistry::start(Some(("alice", "s3cret")));
    let art = color_artifact(&[], |_| {});
    reg.push("private/color:1", art.path(), Some("alice:s3cret"));
    let (dir, models) = empty_registry();
    let source = format!("oci://{}/private/color:1", reg.host());
    let (code, _, stderr) = pull(&models, &[&source], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("needs credentials") && stderr.contains("oras login"), "{stderr}");
    let auth = |password: &str| {
        let d = tempfile::tempdir().unwrap();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("alice:{password}"));
        let file = json!({"auths": {reg.host(): {"auth": token}}});
        std::fs::write(d.path().join("config.json"), file.to_string()).unwrap();
        d
    };
    let wrong = auth("guess");
    let (code, _, stderr) = pull(&models, &[&source], &[("DOCKER_CONFIG", wrong.path().to_str().unwrap())]);
    assert_ne!(code, 0);
    assert!(stderr.contains("access refused"), "{stderr}");
    let right = auth("s3cret");
    let (code, got, stderr) = pull(&models, &[&source], &[("DOCKER_CONFIG", right.path().to_str().unwrap())]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got["name"], "color");
    assert!(dir.path().join("models.d/color/color.onnx").is_file());
}

#[test]
fn an_interrupted_download_resumes_and_a_part_that_is_not_the_file_is_fetched_again() {
    let reg = OciRegistry::start(None);
    // 3 MiB of data beside the model, so a cut leaves a real part behind.
    let blob = noise(3 << 20);
    let art = color_artifact(&[("weights.bin", &blob)], |_| {});
    reg.push("models/big:1", art.path(), None);
    let (dir, models) = empty_registry();
    let source = format!("oci://{}/models/big:1", reg.host());
    // What a kill -9 in the middle of the download leaves: the first half in the staging folder.
    let staging = dir.path().join("models.d/.pull/color");
    std::fs::create_dir_all(&staging).unwrap();
    let half = blob.len() / 2;
    std::fs::write(staging.join("weights.bin.part"), &blob[..half]).unwrap();
    let (code, got, stderr) = pull(&models, &[&source], &[]);
    assert_eq!(code, 0, "{stderr}");
    let small: u64 = ["model.json", "color.onnx", "labels.txt"]
        .iter()
        .map(|f| std::fs::metadata(art.path().join(f)).unwrap().len())
        .sum();
    assert_eq!(got["downloaded"].as_u64().unwrap(), small + (blob.len() - half) as u64, "only the rest: {got}");
    assert_eq!(std::fs::read(dir.path().join("models.d/color/weights.bin")).unwrap(), blob);
    // A part that is not the start of the file: the resumed bytes do not verify, the file is fetched whole.
    let (dir, models) = empty_registry();
    let staging = dir.path().join("models.d/.pull/color");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("weights.bin.part"), vec![7u8; half]).unwrap();
    let (code, got, stderr) = pull(&models, &[&source], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(got["downloaded"].as_u64().unwrap() >= blob.len() as u64, "{got}");
    assert_eq!(std::fs::read(dir.path().join("models.d/color/weights.bin")).unwrap(), blob);
}

#[test]
fn a_pull_killed_in_the_middle_resumes_where_it_stopped() {
    let reg = OciRegistry::start(None);
    let blob = noise(4 << 20);
    let art = color_artifact(&[("weights.bin", &blob)], |_| {});
    reg.push("models/big:1", art.path(), None);
    let (dir, models) = empty_registry();
    let source = format!("oci://{}/models/big:1", reg.host());
    // At 1 MiB/s (pull.max_kib_s) the 4 MiB file takes 4 s: kill -9 once half a MiB is on disk.
    let nowhere = std::env::temp_dir().join("inferd-tests-no-docker-config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args(["pull", "--models", models.to_str().unwrap(), &source])
        .env("INFERD_PULL__MAX_KIB_S", "1024")
        .env("DOCKER_CONFIG", &nowhere)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = dir.path().join("models.d/.pull/color/weights.bin.part");
    let end = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 512 << 10 {
        assert!(Instant::now() < end && child.try_wait().unwrap().is_none(), "the pull should be under way");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < blob.len() as u64, "{kept}");
    assert!(!dir.path().join("models.d/color").exists(), "no partial model in use");
    let out = inferd(&["check", "--models", models.to_str().unwrap()]);
    assert!(out.status.success(), "the registry reads without it: {:?}", text(&out));
    // The next pull fetches only what the killed one had not.
    let (code, got, stderr) = pull(&models, &[&source], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("weights.bin"), "{stderr}");
    // (The small files were likely finished and verified before the kill: they count 0 or their size.)
    let small: u64 =
        ["color.onnx", "labels.txt"].iter().map(|f| std::fs::metadata(art.path().join(f)).unwrap().len()).sum();
    let rest = blob.len() as u64 - kept;
    let downloaded = got["downloaded"].as_u64().unwrap();
    assert!((rest..=rest + small).contains(&downloaded), "{downloaded} fetched, {rest} of weights.bin left: {got}");
    assert_eq!(std::fs::read(dir.path().join("models.d/color/weights.bin")).unwrap(), blob);
}

#[test]
fn a_registry_outside_pull_registries_is_refused() {
    let (_dir, models) = empty_registry();
    let (code, _, stderr) =
        pull(&models, &["oci://127.0.0.1:9/models/x:1"], &[("INFERD_PULL__REGISTRIES", "reg.corp.example,.lan")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not in pull.registries"), "{stderr}");
}

#[test]
fn bad_artifacts_are_refused_with_the_reason_and_change_nothing() {
    let reg = OciRegistry::start(None);
    let good = color_artifact(&[], |_| {});
    reg.push("models/color:good", good.path(), None);
    let (dir, models) = empty_registry();
    let (code, _, stderr) = pull(&models, &[&format!("oci://{}/models/color:good", reg.host())], &[]);
    assert_eq!(code, 0, "{stderr}");
    let serving = std::fs::read(dir.path().join("models.d/color/model.json")).unwrap();
    let tree = |d: &Path| {
        let mut all: Vec<String> = walk(d).iter().map(|p| p.strip_prefix(d).unwrap().display().to_string()).collect();
        all.sort();
        all
    };
    let before = tree(dir.path());

    // A file name that climbs out of the model's folder.
    let evil = tempfile::tempdir().unwrap();
    std::fs::write(evil.path().join("x"), b"payload").unwrap();
    reg.push_raw(
        "models/evil:1",
        &[("model.json", &good.path().join("model.json")), ("../../evil.onnx", &evil.path().join("x"))],
    );
    // A model.json that states another sum for its file.
    let lying = color_artifact(&[], |e| e["variants"][0]["sha256"] = json!("ab".repeat(32)));
    reg.push("models/color:lying", lying.path(), None);
    // A model.json naming a file the artifact does not carry.
    let short = color_artifact(&[], |e| e["variants"][0]["file"] = json!("missing.onnx"));
    reg.push("models/color:short", short.path(), None);
    // No model.json; a model.json that is not JSON; an entry the registry refuses.
    reg.push_raw("models/bare:1", &[("color.onnx", &good.path().join("color.onnx"))]);
    std::fs::write(evil.path().join("model.json"), b"{not json").unwrap();
    reg.push_raw("models/broken:1", &[("model.json", &evil.path().join("model.json"))]);
    let bad_entry = color_artifact(&[], |e| e["input"]["layout"] = json!("sideways"));
    reg.push("models/color:bad-entry", bad_entry.path(), None);

    for (tag, why) in [
        ("evil:1", "not a plain file name"),
        ("color:lying", "sha256"),
        ("color:short", "does not carry"),
        ("bare:1", "no model.json"),
        ("broken:1", "not JSON"),
        ("color:bad-entry", "not a valid entry"),
    ] {
        let (code, got, stderr) =
            pull(&models, &[&format!("oci://{}/models/{tag}", reg.host()), "--name", "color"], &[]);
        assert_eq!(code, 4, "{tag}: {stderr}");
        assert!(stderr.contains(why), "{tag}: {stderr}");
        assert!(got["error"].as_str().is_some_and(|e| e.contains(why)), "{tag}: {got}");
        assert_eq!(std::fs::read(dir.path().join("models.d/color/model.json")).unwrap(), serving, "{tag}");
    }
    assert!(!dir.path().join("evil.onnx").exists() && !dir.path().join("models.d/evil.onnx").exists());
    let after: Vec<String> = tree(dir.path()).into_iter().filter(|p| !p.starts_with("models.d/.pull")).collect();
    assert_eq!(after, before.into_iter().filter(|p| !p.starts_with("models.d/.pull")).collect::<Vec<_>>());
    let out = inferd(&["check", "--models", models.to_str().unwrap()]);
    assert!(out.status.success(), "the pulled model still serves: {:?}", text(&out));
}

#[test]
fn models_d_entries_join_the_registry_and_may_not_clash_or_leave_their_folder() {
    let dir = TempRegistry::new(&json!({"version": 1, "models": [shipped_model("color")]}));
    let add = |name: &str, entry: Value| {
        let folder = dir.dir.path().join("models.d").join(name);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(repo("models/color/color.onnx"), folder.join("color.onnx")).unwrap();
        std::fs::copy(repo("models/color/labels.txt"), folder.join("labels.txt")).unwrap();
        std::fs::write(folder.join("model.json"), entry.to_string()).unwrap();
        folder
    };
    let mut entry = shipped_model("color");
    entry["name"] = json!("color-two");
    entry["variants"][0]["file"] = json!("color.onnx");
    entry["labels"] = json!("labels.txt");
    add("color-two", entry.clone());
    let out = inferd(&["models", "--models", &dir.path_str()]);
    assert!(out.status.success() && text(&out).0.contains("color-two"), "{:?}", text(&out));
    let out = inferd(&["infer", "--local", "--models", &dir.path_str(), "-m", "color-two", "examples/blue.jpg"]);
    assert!(out.status.success() && text(&out).0.contains("blue"), "{:?}", text(&out));
    // A second model called color: refused by name, where it is written.
    let mut clash = entry.clone();
    clash["name"] = json!("color");
    let folder = add("clash", clash);
    let out = inferd(&["check", "--models", &dir.path_str()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("duplicate model name 'color'"), "{stderr}");
    assert!(stderr.contains("models.d/clash/model.json"), "{stderr}");
    std::fs::remove_dir_all(folder).unwrap();
    // A path out of its folder is refused even where models_outside allows it for models.json.
    let mut escape = entry.clone();
    escape["name"] = json!("escape");
    escape["variants"][0]["file"] = json!("../color-two/color.onnx");
    add("escape", escape);
    let out = inferd(&["check", "--models", &dir.path_str()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("outside the folder"), "{stderr}");
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn a_pull_over_the_socket_streams_its_progress_and_the_model_serves_at_once() {
    let reg = OciRegistry::start(None);
    let art = color_artifact(&[], |_| {});
    let digest = reg.push("models/color:1", art.path(), None);
    let d = Daemon::start(|_| {});
    let ask = |body: Value| {
        let r = d.client().post("/v1/models/pull", "application/json", body.to_string().as_bytes()).unwrap();
        let lines: Vec<Value> =
            String::from_utf8(r.body.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (r.status, r.content_type.clone(), lines)
    };
    let (status, kind, lines) =
        ask(json!({"source": format!("oci://{}/models/color:1", reg.host()), "name": "color-pulled"}));
    assert_eq!((status, kind.as_deref()), (200, Some("application/x-ndjson")), "{lines:?}");
    assert_eq!(lines[0]["event"], "manifest", "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l["event"] == "verified").count(), 3, "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!((last["event"].as_str(), last["pulled"]["digest"].as_str()), (Some("done"), Some(digest.as_str())));
    // Served at once, without a restart or a reload signal.
    let red = std::fs::read(repo("examples/red.jpg")).unwrap();
    let r = d.client().post("/v1/models/color-pulled/infer", "image/jpeg", &red).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json().unwrap()["result"]["classes"][0]["label"], "red", "{}", String::from_utf8_lossy(&r.body));
    // A failed pull ends with its error and leaves the daemon serving.
    let (status, _, lines) = ask(json!({"source": format!("oci://{}/models/nothing:1", reg.host())}));
    assert_eq!(status, 200);
    assert_eq!(lines.last().unwrap()["error"]["kind"], "not_found", "{lines:?}");
    let (status, _, _) = ask(json!({"from": "somewhere"}));
    assert_eq!(status, 400);
    assert_eq!(d.client().post("/v1/models/color-pulled/infer", "image/jpeg", &red).unwrap().status, 200);
    drop(d);
    // Pulling is for the socket's administrators, as loading is.
    let d = Daemon::start(|c| c.socket.admin_uids = vec![4_000_000]);
    let r = d.client().post("/v1/models/pull", "application/json", br#"{"source": "oci://127.0.0.1:1/x:1"}"#).unwrap();
    assert_eq!(r.status, 403);
}

#[test]
fn a_packed_model_round_trips_through_the_registry() {
    // PP-OCR: two variants whose files share names in different folders (v4/det.onnx, v6-small/det.onnx).
    let reg = OciRegistry::start(None);
    let art = tempfile::tempdir().unwrap();
    let out = inferd(&["pack", "ocr", art.path().join("ocr").to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let entry: Value = serde_json::from_slice(&std::fs::read(art.path().join("ocr/model.json")).unwrap()).unwrap();
    let files: Vec<String> = std::fs::read_dir(art.path().join("ocr"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for f in &files {
        assert!(!f.contains('/'), "{f}");
    }
    let variants = entry["variants"].as_array().unwrap();
    assert!(variants.len() >= 2, "{entry}");
    let mains: Vec<&str> = variants.iter().map(|v| v["file"].as_str().unwrap()).collect();
    assert!(mains.iter().all(|m| files.iter().any(|f| f == m)), "{mains:?} in {files:?}");
    assert_ne!(mains[0], mains[1], "files that share a name are told apart");
    assert!(files.iter().any(|f| f == "cls.onnx"), "a file both variants use is one file: {files:?}");
    reg.push("models/ocr:v1", &art.path().join("ocr"), None);
    let (dir, models) = empty_registry();
    let (code, got, stderr) = pull(&models, &[&format!("oci://{}/models/ocr:v1", reg.host())], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got["name"], "ocr");
    let out = inferd(&["check", "--models", models.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = inferd(&[
        "infer",
        "--local",
        "--models",
        models.to_str().unwrap(),
        "-m",
        "ocr",
        "tests/fixtures/text-line.png",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(dir.path().join("models.d/ocr/model.json").is_file());
    // A model the registry does not have.
    let out = inferd(&["pack", "nothing", art.path().join("x").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out));
}

/// A free loopback port and a Python server process on it, stopped on drop.
struct Server(std::process::Child, u16);

impl Server {
    fn start(python: &Path, args: &[&str]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new(python);
        cmd.args(args.iter().map(|a| a.replace("{port}", &port.to_string())));
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("python runs");
        wait_for_port(port, "the server");
        Server(child, port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_folder_on_a_web_server_is_pulled_by_its_sums_file_and_its_digest() {
    let web = tempfile::tempdir().unwrap();
    let out = inferd(&["pack", "color", web.path().join("color").to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let digest = format!("sha256:{}", sha256_of(&web.path().join("color/SHA256SUMS")));
    let server = Server::start(
        Path::new("python3"),
        &["-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory", web.path().to_str().unwrap()],
    );
    let url = format!("http://127.0.0.1:{}/color/", server.1);
    let (dir, models) = empty_registry();
    // A digest that is not the sums file's: refused, nothing written.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (code, got, stderr) = pull(&models, &[&url, "--digest", &wrong], &[]);
    assert_eq!((code, got["kind"].as_str()), (4, Some("digest")), "{stderr}");
    assert!(!dir.path().join("models.d/color").exists());
    let (code, got, stderr) = pull(&models, &[&url, "--digest", &digest], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((got["name"].as_str(), got["digest"].as_str()), (Some("color"), Some(digest.as_str())));
    let out = inferd(&["infer", "--local", "--models", models.to_str().unwrap(), "-m", "color", "examples/red.jpg"]);
    assert!(text(&out).0.contains("red"), "{:?}", text(&out));
    // A file changed on the server after its sums were written: that file is refused.
    std::fs::write(web.path().join("color/labels.txt"), "blue\ngreen\nred\n").unwrap();
    let (other, models2) = empty_registry();
    let (code, got, stderr) = pull(&models2, &[&url], &[]);
    assert_eq!((code, got["kind"].as_str()), (4, Some("digest")), "{stderr}");
    assert!(got["error"].as_str().unwrap().contains("labels.txt"), "{got}");
    assert!(!other.path().join("models.d/color").exists());
    // Plain http is for loopback hosts (and pull.insecure) only.
    let (code, got, _) = pull(&models2, &["http://models.example/color/"], &[]);
    assert_eq!((code, got["kind"].as_str()), (1, Some("refused")), "{got}");
}

#[test]
fn a_hub_repository_is_pulled_from_the_layout_huggingface_hub_itself_downloads() {
    let hub = tempfile::tempdir().unwrap();
    let repo = hub.path().join("acme/color-onnx");
    let out = inferd(&["pack", "color", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let python = util::repo(".cache/oras-venv/bin/python");
    // Files over 100 bytes answer as LFS files do on the Hub: a redirect to the CDN.
    let server = Server::start(
        &python,
        &[util::repo("scripts/hf_server.py").to_str().unwrap(), hub.path().to_str().unwrap(), "{port}", "100"],
    );
    let endpoint = format!("http://127.0.0.1:{}", server.1);
    // huggingface_hub's own client reads every file from this layout: the layout is the Hub's.
    let cache = tempfile::tempdir().unwrap();
    let script = "import sys; from huggingface_hub import hf_hub_download as d\n\
                  for f in sys.argv[3:]: print(d(repo_id='acme/color-onnx', filename=f, revision='v1', endpoint=sys.argv[1], cache_dir=sys.argv[2]))";
    let files = ["SHA256SUMS", "model.json", "color.onnx", "labels.txt"];
    let out = Command::new(&python)
        .args(["-c", script, &endpoint, cache.path().to_str().unwrap()])
        .args(files)
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "huggingface_hub: {}", String::from_utf8_lossy(&out.stderr));
    let paths: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    for (f, p) in files.iter().zip(&paths) {
        assert_eq!(std::fs::read(p).unwrap(), std::fs::read(repo.join(f)).unwrap(), "{f}");
    }
    // inferd from the same server.
    let (dir, models) = empty_registry();
    let digest = format!("sha256:{}", sha256_of(&repo.join("SHA256SUMS")));
    let (code, got, stderr) =
        pull(&models, &["hf://acme/color-onnx@v1", "--digest", &digest], &[("INFERD_PULL__HF_ENDPOINT", &endpoint)]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got["digest"], digest.as_str());
    for f in &files[1..] {
        assert_eq!(
            std::fs::read(dir.path().join("models.d/color").join(f)).unwrap(),
            std::fs::read(repo.join(f)).unwrap(),
            "{f}"
        );
    }
    let out = inferd(&["check", "--models", models.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    // A repository the Hub does not have.
    let (code, got, _) = pull(&models, &["hf://acme/nothing@v1"], &[("INFERD_PULL__HF_ENDPOINT", &endpoint)]);
    assert_eq!((code, got["kind"].as_str()), (5, Some("not_found")), "{got}");
}

#[test]
fn a_registry_with_a_token_service_is_pulled_with_the_bearer_token_the_credentials_get() {
    // As Docker Hub, GHCR and Harbor: 401 with a Bearer challenge, a token from the realm.
    let open = OciRegistry::start(None);
    let art = color_artifact(&[], |_| {});
    let digest = open.push("private/color:1", art.path(), None);
    let keys = tempfile::tempdir().unwrap();
    let (key, cert) = (keys.path().join("key.pem"), keys.path().join("cert.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=inferd-test-tokens"])
        .args(["-keyout", key.to_str().unwrap(), "-out", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (issuer, service) = ("inferd-test-issuer", "inferd-test-registry");
    let tokens = Server::start(
        Path::new("python3"),
        &[
            util::repo("scripts/token_server.py").to_str().unwrap(),
            "{port}",
            key.to_str().unwrap(),
            cert.to_str().unwrap(),
            issuer,
            service,
            "alice:s3cret",
        ],
    );
    let realm = format!("http://127.0.0.1:{}/token", tokens.1);
    let reg = OciRegistry::start_token_over(&open, &realm, service, issuer, &cert);
    let source = format!("oci://{}/private/color@{digest}", reg.host());
    let (dir, models) = empty_registry();
    // Anonymous: the service's token grants nothing, the registry refuses.
    let (code, got, stderr) = pull(&models, &[&source], &[]);
    assert_eq!((code, got["kind"].as_str()), (1, Some("auth")), "{stderr}");
    let docker = tempfile::tempdir().unwrap();
    let write_auth = |user: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(user);
        let file = json!({"auths": {reg.host(): {"auth": auth}}});
        std::fs::write(docker.path().join("config.json"), file.to_string()).unwrap();
    };
    // Wrong credentials: the token service says so.
    write_auth("alice:wrong");
    let env = [("DOCKER_CONFIG", docker.path().to_str().unwrap())];
    let (code, got, stderr) = pull(&models, &[&source], &env);
    assert_eq!((code, got["kind"].as_str()), (1, Some("auth")), "{stderr}");
    assert!(got["error"].as_str().unwrap().contains("token service"), "{got}");
    // The right ones: a token with pull access, and the blobs fetched with it.
    write_auth("alice:s3cret");
    let (code, got, stderr) = pull(&models, &[&source], &env);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got["digest"], digest.as_str());
    assert!(dir.path().join("models.d/color/color.onnx").is_file());
}
