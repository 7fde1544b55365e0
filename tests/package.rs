//! What operators install: the systemd units as systemd itself reads them,
//! and the .deb cargo-deb builds (contents, conffiles, maintainer scripts,
//! and a registry that checks out from the extracted package).

mod util;

use std::path::Path;
use std::process::Command;
use util::*;

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let service = std::fs::read_to_string(repo("systemd/inferd.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/inferd serve"), "{service}");
    std::fs::write(dir.path().join("inferd.service"), service.replace("/usr/bin/inferd", env!("CARGO_BIN_EXE_inferd")))
        .unwrap();
    std::fs::copy(repo("systemd/inferd.socket"), dir.path().join("inferd.socket")).unwrap();
    let (ok, stdout, stderr) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("inferd.service"))
        .arg(dir.path().join("inferd.socket")));
    // Unknown keys are only warnings to systemd: any word about our units fails the test.
    let ours: Vec<&str> = stderr.lines().chain(stdout.lines()).filter(|l| l.contains("inferd.s")).collect();
    assert!(ok && ours.is_empty(), "systemd-analyze verify:\n{stdout}{stderr}");
    for key in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=inferd",
        "RuntimeDirectory=inferd",
        "StateDirectory=inferd",
        "ConfigurationDirectory=inferd",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "PrivateTmp=true",
        "NoNewPrivileges=true",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/nvidiactl rw",
        "DeviceAllow=/dev/nvhost-ctrl-gpu rw",
        "#MemoryMax=",
    ] {
        assert!(service.contains(key), "inferd.service lacks {key:?}");
    }
    let socket = std::fs::read_to_string(repo("systemd/inferd.socket")).unwrap();
    assert!(socket.contains("ListenStream=/run/inferd/inferd.sock"), "{socket}");
}

/// `systemd-analyze security` rates what the unit leaves exposed, 0 (locked) to 10;
/// docs/SECURITY.md records the score, and it must not creep up.
#[test]
fn the_unit_exposure_score_stays_low() {
    let (ok, stdout, stderr) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(repo("systemd/inferd.service")));
    let line =
        stdout.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{stdout}{stderr}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(ok || score > 0.0, "{stderr}");
    assert!(score <= 2.0, "exposure {score} (docs/SECURITY.md records 1.7): {line}");
    let docs = std::fs::read_to_string(repo("docs/SECURITY.md")).unwrap();
    assert!(docs.contains(&format!("**{score:.1} OK**")), "docs/SECURITY.md should record {score:.1}");
}

#[test]
fn the_deb_has_the_daemon_units_and_config_and_no_model() {
    let out = tempfile::tempdir().unwrap();
    // The debug binary the tests built, stripped; a release package is built the same way (cross/build.sh).
    let (ok, stdout, stderr) = run(Command::new(env!("CARGO"))
        .args(["deb", "--no-build", "--profile", "dev", "--fast", "--output"])
        .arg(out.path())
        .current_dir(root()));
    assert!(ok, "cargo deb (install it with scripts/setup.sh):\n{stdout}{stderr}");
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"));
    let deb = deb.expect("a .deb was written");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    // Debian's name for the build host's architecture (amd64, arm64).
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    assert_eq!(name, format!("inferd_{}-1_{arch}.deb", env!("CARGO_PKG_VERSION")));

    let (ok, listing, stderr) = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    assert!(ok, "{stderr}");
    for path in [
        "./usr/bin/inferd",
        "./usr/lib/systemd/system/inferd.service",
        "./usr/lib/systemd/system/inferd.socket",
        "./usr/lib/sysusers.d/inferd.conf",
        "./usr/lib/tmpfiles.d/inferd.conf",
        "./etc/inferd/config.toml",
        "./etc/inferd/models.json",
        "./usr/share/doc/inferd/README.md",
        "./usr/share/doc/inferd/fleet-desired.schema.json",
        "./usr/share/doc/inferd/deploy.md",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "{path} missing from the .deb:\n{listing}");
    }
    assert!(listing.lines().any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with("./usr/bin/inferd")), "{listing}");
    // No model: they are packages of their own (or pulled), so a binary fix is a small download.
    assert!(!listing.contains("usr/share/inferd/models") && !listing.contains(".onnx"), "{listing}");
    let size = std::fs::metadata(&deb).unwrap().len();
    assert!(size < 32 << 20, "the daemon package is {} MiB", size >> 20);

    let control = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(control.path()));
    assert!(ok, "{stderr}");
    let read = |f: &str| std::fs::read_to_string(control.path().join(f)).unwrap_or_default();
    assert_eq!(read("conffiles").trim(), "/etc/inferd/config.toml\n/etc/inferd/models.json");
    assert!(read("control").contains("Depends: libc6 (>= 2.28)"), "{}", read("control"));
    let postinst = read("postinst");
    for step in [
        "systemd-sysusers",
        "systemd-tmpfiles --create",
        "deb-systemd-helper enable inferd.service",
        "deb-systemd-helper enable inferd.socket",
        "daemon-reload",
    ] {
        assert!(postinst.contains(step), "postinst lacks {step}:\n{postinst}");
    }
    let postrm = read("postrm");
    assert!(postrm.contains("purge") && postrm.contains("deluser") && postrm.contains("daemon-reload"), "{postrm}");

    let root_dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root_dir.path()));
    assert!(ok, "{stderr}");
    let config = std::fs::read_to_string(root_dir.path().join("etc/inferd/config.toml")).unwrap();
    for line in [
        "models = \"/etc/inferd/models.json\"",
        "models_d = [\"/usr/share/inferd/models.d\"]",
        "dir = \"/var/lib/inferd/models.d\"",
    ] {
        assert!(config.contains(line), "{line} not in the packaged config.toml:\n{config}");
    }
    let parsed = inferd::config::Config::load_from(
        Some(&root_dir.path().join("etc/inferd/config.toml")),
        Path::new("/nonexistent"),
        Vec::new(),
    );
    assert!(parsed.is_ok(), "the packaged config.toml loads: {parsed:?}");
}

/// Model packages (scripts/package-models.sh): each holds one model's
/// models.d folder and nothing the daemon's package has; installed beside the
/// daemon's files, their models join the registry and check out.
#[test]
fn model_packages_join_the_daemons_registry_and_touch_nothing_of_it() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = run(Command::new(root().join("scripts/package-models.sh"))
        .args(["--out", out.path().to_str().unwrap(), "color", "mlp"])
        .env("INFERD", env!("CARGO_BIN_EXE_inferd"))
        .current_dir(root()));
    assert!(ok, "{stdout}{stderr}");
    let version = env!("CARGO_PKG_VERSION");
    // What an installed box has: the daemon's config and empty registry, then the model packages' files.
    let fs = tempfile::tempdir().unwrap();
    let etc = fs.path().join("etc/inferd");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(root().join("systemd/models.json"), etc.join("models.json")).unwrap();
    for name in ["color", "mlp"] {
        let deb = out.path().join(format!("inferd-model-{name}_{version}-1_all.deb"));
        let (ok, control, stderr) = run(Command::new("dpkg-deb").arg("-f").arg(&deb));
        assert!(ok, "{stderr}");
        assert!(control.contains(&format!("Package: inferd-model-{name}")), "{control}");
        assert!(control.contains("Architecture: all") && control.contains("Depends: inferd (>="), "{control}");
        let (ok, listing, _) = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
        assert!(ok);
        let files: Vec<&str> =
            listing.lines().filter(|l| l.starts_with('-')).filter_map(|l| l.split_whitespace().last()).collect();
        assert!(files.iter().all(|f| f.starts_with(&format!("./usr/share/inferd/models.d/{name}/"))), "{listing}");
        assert!(files.contains(&format!("./usr/share/inferd/models.d/{name}/model.json").as_str()), "{listing}");
        let (ok, _, stderr) = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(fs.path()));
        assert!(ok, "{stderr}");
    }
    let registry = etc.join("models.json");
    let dropins = fs.path().join("usr/share/inferd/models.d");
    let env = [("INFERD_MODELS_D", dropins.to_str().unwrap())];
    let out = inferd_env(&["check", "--models", registry.to_str().unwrap()], &env);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let out = inferd_env(&["models", "--json", "--models", registry.to_str().unwrap()], &env);
    let models: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let names: Vec<&str> =
        models["models"].as_array().map(|a| a.iter().filter_map(|m| m["name"].as_str()).collect()).unwrap_or_default();
    assert_eq!(names, ["color", "mlp"], "{}", text(&out).1);
    let out = inferd_env(
        &["infer", "--local", "-m", "color", "--models", registry.to_str().unwrap(), "examples/red.jpg"],
        &env,
    );
    assert!(text(&out).0.contains("red"), "{:?}", text(&out));
    // The same model pulled as well (the pull folder is read too): refused by name, naming both places.
    let pulled = fs.path().join("var/lib/inferd/models.d");
    std::fs::create_dir_all(pulled.join("color")).unwrap();
    for f in std::fs::read_dir(dropins.join("color")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, pulled.join("color").join(f.file_name().unwrap())).unwrap();
    }
    let env = [("INFERD_MODELS_D", dropins.to_str().unwrap()), ("INFERD_PULL__DIR", pulled.to_str().unwrap())];
    let out = inferd_env(&["check", "--models", registry.to_str().unwrap()], &env);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("duplicate model name 'color'"), "{stdout}{stderr}");
}

/// The Apple Silicon build type-checks, CoreML code paths included (no macOS
/// linker here, so `cargo check`; TLS is left out: ring needs the macOS SDK).
#[test]
fn the_macos_build_with_coreml_type_checks() {
    let (ok, stdout, stderr) = run(Command::new(env!("CARGO"))
        .args(["check", "--locked", "--target", "aarch64-apple-darwin", "--no-default-features"])
        .env("CARGO_TARGET_DIR", root().join("target/macos-check"))
        .env("CC_aarch64_apple_darwin", "clang")
        .current_dir(root()));
    assert!(
        ok,
        "cargo check --target aarch64-apple-darwin (scripts/setup.sh adds the target and clang):\n{stdout}{stderr}"
    );
    // CoreML is gated to Apple targets: the attribute stands right before the CoreML
    // arm (compared with whitespace collapsed, so formatting does not matter).
    let ort = std::fs::read_to_string(repo("src/backend/ort.rs")).unwrap();
    let flat = ort.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("#[cfg(target_os = \"macos\")] (Provider::Coreml"), "CoreML is gated to Apple targets");
}
