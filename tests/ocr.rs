//! The `ocr` and `document-fields` tasks on the real PP-OCR models (fetched
//! by scripts/setup.sh) against what RapidOCR itself answers for the
//! rendered images in tests/fixtures/ocr (scripts/make_ocr_fixtures.py).

mod util;

use inferd::config::Config;
use inferd::engine::{Engine, LoadOptions, LoadedModel};
use inferd::job::{JobInput, JobOptions, JobResult, TextLine};
use inferd::registry::Registry;
use util::*;

fn load(variant: &str) -> LoadedModel {
    let engine = Engine::new(Config::default(), Registry::load(&repo("models.json")).unwrap());
    engine.load("ocr", &LoadOptions { variant: Some(variant.into()), ..Default::default() }).unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo("tests/fixtures/ocr").join(name)).unwrap()
}

fn ocr(model: &mut LoadedModel, bytes: Vec<u8>) -> Vec<TextLine> {
    match model.infer(JobInput::Image(bytes), &JobOptions::default()).unwrap().result {
        JobResult::Ocr { lines } => lines,
        other => panic!("not an OCR result: {other:?}"),
    }
}

/// Area of a simple polygon (shoelace).
fn area(p: &[[f64; 2]]) -> f64 {
    (0..p.len()).map(|i| p[i][0] * p[(i + 1) % p.len()][1] - p[(i + 1) % p.len()][0] * p[i][1]).sum::<f64>().abs() / 2.0
}

/// `subject` clipped to the convex polygon `clip` (Sutherland–Hodgman).
fn clip(subject: &[[f64; 2]], clip: &[[f64; 2]]) -> Vec<[f64; 2]> {
    let orientation = if area_signed(clip) >= 0.0 { 1.0 } else { -1.0 };
    let inside = |p: [f64; 2], a: [f64; 2], b: [f64; 2]| {
        orientation * ((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])) >= 0.0
    };
    let cross = |p: [f64; 2], q: [f64; 2], a: [f64; 2], b: [f64; 2]| {
        let (r, s) = ([q[0] - p[0], q[1] - p[1]], [b[0] - a[0], b[1] - a[1]]);
        let t = ((a[0] - p[0]) * s[1] - (a[1] - p[1]) * s[0]) / (r[0] * s[1] - r[1] * s[0]);
        [p[0] + t * r[0], p[1] + t * r[1]]
    };
    let mut out = subject.to_vec();
    for i in 0..clip.len() {
        let (a, b) = (clip[i], clip[(i + 1) % clip.len()]);
        let input = std::mem::take(&mut out);
        for j in 0..input.len() {
            let (p, q) = (input[j], input[(j + 1) % input.len()]);
            match (inside(p, a, b), inside(q, a, b)) {
                (true, true) => out.push(q),
                (true, false) => out.push(cross(p, q, a, b)),
                (false, true) => {
                    out.push(cross(p, q, a, b));
                    out.push(q);
                }
                (false, false) => {}
            }
        }
    }
    out
}

fn area_signed(p: &[[f64; 2]]) -> f64 {
    (0..p.len()).map(|i| p[i][0] * p[(i + 1) % p.len()][1] - p[(i + 1) % p.len()][0] * p[i][1]).sum::<f64>() / 2.0
}

/// Intersection over union of two convex quadrilaterals.
fn iou(a: &[[f64; 2]], b: &[[f64; 2]]) -> f64 {
    let inter = area(&clip(a, b));
    inter / (area(a) + area(b) - inter)
}

#[test]
fn polygon_iou_is_right_on_known_shapes() {
    let sq = |x: f64, y: f64, s: f64| vec![[x, y], [x + s, y], [x + s, y + s], [x, y + s]];
    assert!((iou(&sq(0.0, 0.0, 2.0), &sq(0.0, 0.0, 2.0)) - 1.0).abs() < 1e-12);
    assert!((iou(&sq(0.0, 0.0, 2.0), &sq(1.0, 0.0, 2.0)) - 2.0 / 6.0).abs() < 1e-12);
    assert_eq!(iou(&sq(0.0, 0.0, 1.0), &sq(5.0, 5.0, 1.0)), 0.0);
}

/// Every rendered image, through the whole pipeline, against RapidOCR's
/// answer for the same variant: the same lines in the same order, the same
/// text on every line, boxes with IoU ≥ 0.9.
fn matches_the_reference(variant: &str) {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo(&format!("tests/fixtures/ocr/expected-{variant}.json"))).unwrap(),
    )
    .unwrap();
    let mut model = load(variant);
    let mut problems = Vec::new();
    let mut compared = 0;
    let mut worst_confidence = 0f64;
    for (image, want) in expected["cases"].as_object().unwrap() {
        let got = ocr(&mut model, fixture(image));
        let want = want.as_array().unwrap();
        let texts = |lines: &mut dyn Iterator<Item = String>| lines.collect::<Vec<_>>();
        let got_texts = texts(&mut got.iter().map(|l| l.text.clone()));
        let want_texts = texts(&mut want.iter().map(|l| l["text"].as_str().unwrap().to_string()));
        if got_texts != want_texts {
            problems.push(format!("{image}: text {got_texts:?}, reference {want_texts:?}"));
            continue;
        }
        for (g, w) in got.iter().zip(want) {
            let gq: Vec<[f64; 2]> = g.quad.iter().map(|p| [p[0] as f64, p[1] as f64]).collect();
            let wq: Vec<[f64; 2]> =
                w["box"].as_array().unwrap().iter().map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()]).collect();
            let v = iou(&gq, &wq);
            if v < 0.9 {
                problems.push(format!("{image} {:?}: IoU {v:.3} (box {:?}, reference {:?})", g.text, g.quad, wq));
            }
            let score = w["score"].as_f64().unwrap();
            worst_confidence = worst_confidence.max((g.confidence as f64 - score).abs());
            compared += 1;
        }
    }
    assert!(problems.is_empty(), "{variant} differs from {}:\n{}", expected["reference"], problems.join("\n"));
    assert!(compared >= 40, "only {compared} lines compared");
    assert!(worst_confidence < 0.01, "confidences differ by up to {worst_confidence}");
}

#[test]
fn pp_ocr_v4_reads_like_rapidocr_onnxruntime() {
    matches_the_reference("v4");
}

#[test]
fn pp_ocr_v6_small_reads_like_rapidocr() {
    matches_the_reference("v6-small");
}

#[test]
fn a_receipt_photographed_sideways_reads_as_the_upright_one_in_its_coordinates() {
    // cafe.png stored turned with EXIF orientation 6 (scripts/make_orientation_fixtures.py): the
    // same lines, and their polygons in the upright image's coordinates.
    let mut model = load("v6-small");
    let upright = ocr(&mut model, fixture("cafe.png"));
    let sideways = ocr(&mut model, std::fs::read(repo("tests/fixtures/orientation/cafe-tag-6.png")).unwrap());
    assert!(upright.len() >= 5, "{upright:?}");
    assert_eq!(sideways, upright);
}

#[test]
fn ocr_bad_input_is_refused_or_answered_empty() {
    let mut model = load("v4");
    assert!(ocr(&mut model, fixture("blank.png")).is_empty(), "no text: an empty result, not an error");
    let one_px = std::fs::read(repo("tests/fixtures/one-pixel.png")).unwrap();
    assert!(ocr(&mut model, one_px).is_empty(), "a 1x1 image has no text");
    let huge = std::fs::read(repo("tests/fixtures/huge-12000.png")).unwrap();
    let err = model.infer(JobInput::Image(huge), &JobOptions::default()).unwrap_err();
    assert!(err.message.contains("12000x12000 = 144000000 pixels, over the limit"), "{err}");
    let err = model.infer(JobInput::Text(vec!["hello".into()]), &JobOptions::default()).unwrap_err();
    assert_eq!(err.kind, inferd::error::ErrorKind::BadInput);
    assert!(err.message.contains("ocr takes an image"), "{err}");
    let err = model.infer(JobInput::Image(Vec::new()), &JobOptions::default()).unwrap_err();
    assert!(err.message.contains("empty"), "{err}");
    // After all that, it still reads.
    assert_eq!(ocr(&mut model, fixture("large.png")).len(), 3);
}

/// The same answer, in the same JSON shape, in process, over the socket
/// (curl-style raw image body and a JSON body) and from `inferd infer`.
#[test]
fn ocr_answers_the_same_over_the_socket_and_the_cli() {
    let mut model = load("v6-small");
    let local = ocr(&mut model, fixture("receipt.png"));
    let lines_of =
        |v: &serde_json::Value| serde_json::from_value::<Vec<TextLine>>(v["result"]["lines"].clone()).unwrap();
    let daemon = Daemon::start(|_| {});
    let c = daemon.client();
    let r = c.post("/v1/models/ocr/infer", "image/png", &fixture("receipt.png")).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((v["model"].as_str(), v["variant"].as_str()), (Some("ocr"), Some("v6-small")));
    assert_eq!(lines_of(&v), local);
    assert_eq!(v["result"]["lines"][0]["text"], "FRESH MARKET");
    assert_eq!(v["result"]["lines"][0]["box"].as_array().unwrap().len(), 4);

    use base64::Engine as _;
    let body =
        serde_json::json!({"image_base64": base64::engine::general_purpose::STANDARD.encode(fixture("blank.png"))});
    let r = c.post("/v1/models/ocr/infer", "application/json", body.to_string().as_bytes()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((r.status, v["result"]["lines"].clone()), (200, serde_json::json!([])), "no text: 200 and no lines");
    let r = c.post("/v1/models/ocr/infer", "text/plain", b"read me").unwrap();
    assert_eq!(r.status, 400, "text to an image task");
    let r = c.post("/v1/models/receipt/infer", "image/png", &fixture("cafe.png")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (v["result"]["fields"]["total"].clone(), v["result"]["fields"]["date"].clone()),
        (serde_json::json!(7.4), serde_json::json!("2026-11-03")),
        "{v}"
    );
    assert_eq!(v["result"]["lines"].as_array().unwrap().len(), 9);

    let socket = daemon.socket.to_str().unwrap().to_string();
    let file = repo("tests/fixtures/ocr/receipt.png");
    let out = inferd(&["infer", "--socket", &socket, "--model", "ocr", "--json", file.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(lines_of(&v), local);
    let out = inferd(&["infer", "--socket", &socket, "--model", "ocr", file.to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("\"TOTAL\"") && stdout.contains("\"15.83\""), "{stdout}");
}

/// models.json mistakes in an OCR model are named at their JSON path.
#[test]
fn check_names_a_wrong_or_missing_ocr_part() {
    let mut wrong_sha = shipped_model("ocr");
    wrong_sha["variants"][1]["parts"]["rec"]["sha256"] = serde_json::json!("0".repeat(64));
    let mut no_rec = shipped_model("ocr");
    no_rec["variants"][0]["parts"].as_object_mut().unwrap().remove("rec");
    no_rec["variants"][0]["parts"]["det"] = no_rec["variants"][0]["parts"]["cls"].clone();
    let mut swapped = shipped_model("ocr");
    swapped["variants"][0]["parts"]["cls"]["file"] = serde_json::json!("models/color/color.onnx");
    swapped["variants"][0]["parts"]["cls"]["sha256"] = serde_json::json!(sha256_of(&repo("models/color/color.onnx")));
    for (model, path, message) in [
        (wrong_sha, "models[0].variants[1].parts.rec.sha256", "sha256 mismatch"),
        (no_rec.clone(), "models[0].variants[0].parts", "needs a 'rec' part"),
        (no_rec, "models[0].variants[0].parts.det", "no 'det' part (parts: rec, cls)"),
        (swapped, "models[0].variants[0].parts.cls", "must output [batch, 2]"),
    ] {
        let registry = TempRegistry::new(&serde_json::json!({"models": [model]}));
        let out = inferd(&["check", "--models", &registry.path_str()]);
        let (stdout, stderr) = text(&out);
        let all = format!("{stdout}{stderr}");
        assert!(!out.status.success(), "{all}");
        assert!(all.lines().any(|l| l.contains(path) && l.contains(message)), "want {path}: {message} in\n{all}");
    }
}

fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// The two rendered receipts, read by both variants, give the fields they
/// were drawn with (names compared without spaces: v4 reads few of them).
#[test]
fn document_fields_reads_the_rendered_receipts() {
    let engine = Engine::new(Config::default(), Registry::load(&repo("models.json")).unwrap());
    for variant in ["v4", "v6-small"] {
        let options = LoadOptions { variant: Some(variant.into()), ..Default::default() };
        let mut model = engine.load("receipt", &options).unwrap();
        let mut read = |name: &str| match model.infer(JobInput::Image(fixture(name)), &JobOptions::default()) {
            Ok(out) => match out.result {
                JobResult::Document { fields, lines } => (fields, lines),
                other => panic!("not a document: {other:?}"),
            },
            Err(e) => panic!("{name}: {e}"),
        };
        let (f, lines) = read("receipt.png");
        assert_eq!(lines.len(), 16, "{variant}: the OCR lines come along");
        assert_eq!(squash(f.store.as_deref().unwrap_or("")), "FRESHMARKET", "{variant}");
        assert_eq!((f.date.as_deref(), f.time.as_deref()), (Some("2026-03-14"), Some("10:42")), "{variant}");
        assert_eq!((f.total, f.currency.as_deref()), (Some(15.83), Some("EUR")), "{variant}");
        let items: Vec<(String, f64)> = f.items.iter().map(|i| (squash(&i.name), i.price)).collect();
        let want = [("Milk1L", 1.29), ("Sourdoughbread", 3.10), ("Apples1kg", 2.45), ("Coffeebeans", 8.99)];
        assert_eq!(items, want.map(|(n, p)| (n.to_string(), p)), "{variant}");
        let sum: f64 = f.items.iter().map(|i| i.price).sum();
        assert!((sum - 15.83).abs() < 1e-9, "{variant}: the items add up to the total");

        let (f, _) = read("cafe.png");
        assert_eq!(squash(f.store.as_deref().unwrap_or("")), "CafeLumiere", "{variant}");
        assert_eq!((f.date.as_deref(), f.time.as_deref()), (Some("2026-11-03"), Some("08:15")), "{variant}: day first");
        assert_eq!((f.total, f.currency.as_deref()), (Some(7.4), Some("EUR")), "{variant}");
        assert_eq!(
            (f.items[0].quantity, squash(&f.items[0].name), f.items[0].price),
            (Some(2), "Espresso".into(), 5.0)
        );
        assert_eq!(f.items.len(), 2, "{variant}");

        let (f, lines) = read("blank.png");
        assert!(lines.is_empty() && f == Default::default(), "{variant}: no text, no fields, no error");
    }
}
