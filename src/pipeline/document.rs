//! The `document-fields` task, built on the `ocr` task's module (never the
//! other way round): a receipt's fields from its OCR lines, by
//! layout and pattern rules, no model of its own. Lines are grouped into
//! rows (boxes whose vertical centres are within half a line height), read
//! top to bottom, left to right; then:
//! - **store**: among the first three rows that are mostly letters, the one
//!   in the tallest type (rows with digits, like addresses, count 30% smaller);
//! - **date** / **time**: the first `YYYY-MM-DD`, `DD/MM/YYYY` (or `MM/DD` per
//!   `date_order`, decided by a part over 12 when it can be), `14 Mar 2026`
//!   or `Mar 14, 2026`; the first `HH:MM[:SS]`;
//! - **total**: the amount on (or right below) the last row that says total,
//!   amount due, balance or sum (not subtotal);
//! - **subtotal**, **tax**: the same for their words;
//! - **currency**: an ISO code or sign, on the total row first, else anywhere,
//!   else `currency` from models.json;
//! - **items**: rows above the total that end in an amount and have a name,
//!   minus rows with payment words; `2 x Name` gives a quantity.
//!
//! Limits: printed receipts in Latin script, one receipt per image, amounts
//! with two decimals; a field that is not found is `null`, never guessed.

use super::ocr::{OcrPipeline, OcrSpec, OcrTaskSpec};
use super::{Graph, Pipeline, Prepare, Prepared, Section, SpecProblem, TaskSpec};
use crate::backend::InferenceBackend;
use crate::error::InferError;
use crate::job::{DocumentFields, InputKind, Item, JobOptions, JobResult, TextLine, Timings};
use crate::tensor::TensorInfo;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::sync::LazyLock;

/// The models.json section of a `document-fields` model: OCR's settings and the extractor's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentTaskSpec {
    /// Detection, recognition and angle settings; RapidOCR's defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocr: Option<OcrSpec>,
    /// Receipt extraction settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<DocumentSpec>,
}

impl Section for DocumentTaskSpec {
    const TASK: &'static str = "document-fields";
}

impl DocumentTaskSpec {
    /// The OCR that reads the lines.
    fn ocr(&self) -> OcrTaskSpec {
        OcrTaskSpec { ocr: self.ocr.clone() }
    }
}

impl TaskSpec for DocumentTaskSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        super::AN_IMAGE
    }

    fn parts(&self) -> (&'static [&'static str], &'static [&'static str]) {
        self.ocr().parts()
    }

    fn validate(&self) -> Vec<SpecProblem> {
        self.ocr().validate()
    }

    fn check_io(&self, dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        self.ocr().check_io(dir, inputs, outputs)
    }

    fn check_part(&self, role: &str, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        self.ocr().check_part(role, inputs, outputs)
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        let ocr = OcrPipeline::new(self.ocr.clone().unwrap_or_default(), graph.parts, graph.limits)?;
        Ok(Box::new(DocumentPipeline { ocr, spec: self.document.clone().unwrap_or_default() }))
    }
}

/// OCR's lines, then a receipt's fields read from them.
struct DocumentPipeline {
    ocr: OcrPipeline,
    spec: DocumentSpec,
}

impl Pipeline for DocumentPipeline {
    fn preparer(&self) -> Arc<dyn Prepare> {
        self.ocr.preparer()
    }

    fn run(
        &mut self,
        engine: &mut dyn InferenceBackend,
        input: Prepared,
        _options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError> {
        let lines = self.ocr.read(engine, input, timings)?;
        let t = std::time::Instant::now();
        let fields = extract(&lines, &self.spec);
        timings.post_ms += t.elapsed().as_secs_f64() * 1000.0;
        Ok(JobResult::Document { fields, lines })
    }
}

/// How ambiguous numeric dates (`03/11/2026`) are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DateOrder {
    /// Day first (most of the world).
    #[default]
    Dmy,
    /// Month first (US).
    Mdy,
}

/// models.json `document`: the extractor's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DocumentSpec {
    /// How `NN/NN/YYYY` dates are read when neither part is over 12.
    pub date_order: DateOrder,
    /// The currency when the receipt shows none (ISO code, e.g. `EUR`).
    pub currency: Option<String>,
}

/// A row of lines on the same baseline, left to right.
struct Row {
    text: String,
    /// Height of its tallest box, px.
    height: f32,
}

fn rows(lines: &[TextLine]) -> Vec<Row> {
    let geometry = |l: &TextLine| {
        let ys = l.quad.iter().map(|p| p[1]);
        let (top, bottom) = (ys.clone().fold(f32::MAX, f32::min), ys.fold(f32::MIN, f32::max));
        let left = l.quad.iter().map(|p| p[0]).fold(f32::MAX, f32::min);
        ((top + bottom) / 2.0, bottom - top, left)
    };
    let mut items: Vec<(f32, f32, f32, &str)> = lines
        .iter()
        .filter(|l| !l.text.trim().is_empty())
        .map(|l| {
            let (centre, height, left) = geometry(l);
            (centre, height, left, l.text.trim())
        })
        .collect();
    items.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut groups: Vec<Vec<(f32, f32, f32, &str)>> = Vec::new();
    for it in items {
        match groups.last_mut() {
            Some(g) if (it.0 - g[0].0).abs() < 0.5 * g[0].1.max(it.1) => g.push(it),
            _ => groups.push(vec![it]),
        }
    }
    groups
        .into_iter()
        .map(|mut g| {
            g.sort_by(|a, b| a.2.total_cmp(&b.2));
            Row {
                text: g.iter().map(|i| i.3).collect::<Vec<_>>().join(" "),
                height: g.iter().map(|i| i.1).fold(0.0, f32::max),
            }
        })
        .collect()
}

static AMOUNT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(-?)(\d{1,3}(?:[.,\s]\d{3})+|\d+)\s?[.,]\s?(\d{2})(?:\D*)$").unwrap());
static ISO_DATE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})").unwrap());
static NUM_DATE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(\d{1,2})[-/.](\d{1,2})[-/.](\d{4}|\d{2})").unwrap());
static TEXT_DATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:(\d{1,2})\s*([a-z]{3})[a-z]*\.?\s*(\d{4}))|(?:([a-z]{3})[a-z]*\.?\s*(\d{1,2}),?\s*(\d{4}))")
        .unwrap()
});
static TIME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|\D)([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?(?:\D|$)").unwrap());
static TOTAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:grand\s*total|total|amount\s*due|balance(?:\s*due)?|to\s*pay|summe|montant|totale)\b")
        .unwrap()
});
static SUBTOTAL: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)sub\s*-?\s*total|zwischensumme").unwrap());
static TAX: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)\b(?:tax|vat|mwst|tva|iva|gst)\b").unwrap());
static NOT_ITEM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:cash|card|change|paid|payment|visa|mastercard|tip|rounding|tendered|due)\b").unwrap()
});
static QUANTITY: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^(\d{1,3})\s*[xX×*]\s*(.+)$").unwrap());

const CURRENCIES: [&str; 14] =
    ["EUR", "USD", "GBP", "CHF", "JPY", "CNY", "CAD", "AUD", "SEK", "NOK", "DKK", "PLN", "CZK", "INR"];

/// The amount a row ends with, and the row's text before it.
fn amount(text: &str) -> Option<(f64, String)> {
    let c = AMOUNT.captures(text)?;
    let whole: String = c[2].chars().filter(char::is_ascii_digit).collect();
    let value: f64 = format!("{whole}.{}", &c[3]).parse().ok()?;
    let value = if &c[1] == "-" { -value } else { value };
    let start = c.get(0).map_or(text.len(), |m| m.start());
    Some((value, text[..start].trim().to_string()))
}

fn currency(text: &str) -> Option<String> {
    let upper = text.to_uppercase();
    for code in CURRENCIES {
        let found = upper.match_indices(code).any(|(i, _)| {
            let before = upper[..i].chars().next_back();
            let after = upper[i + code.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphabetic()) && !after.is_some_and(|c| c.is_ascii_alphabetic())
        });
        if found {
            return Some(code.to_string());
        }
    }
    [('€', "EUR"), ('£', "GBP"), ('$', "USD"), ('¥', "JPY")]
        .iter()
        .find(|(sign, _)| text.contains(*sign))
        .map(|(_, code)| code.to_string())
}

fn valid_date(y: i32, m: u32, d: u32) -> Option<String> {
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    ((1900..=2199).contains(&y) && (1..=days).contains(&d)).then(|| format!("{y:04}-{m:02}-{d:02}"))
}

fn month(name: &str) -> Option<u32> {
    let months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    months.iter().position(|m| name.eq_ignore_ascii_case(m)).map(|i| i as u32 + 1)
}

/// The first date in `text`, as `YYYY-MM-DD`.
fn date(text: &str, order: DateOrder) -> Option<String> {
    if let Some(c) = ISO_DATE.captures(text)
        && let Some(d) = valid_date(c[1].parse().ok()?, c[2].parse().ok()?, c[3].parse().ok()?)
    {
        return Some(d);
    }
    if let Some(c) = NUM_DATE.captures(text) {
        let (a, b): (u32, u32) = (c[1].parse().ok()?, c[2].parse().ok()?);
        let year: i32 = c[3].parse().ok()?;
        let year = if c[3].len() == 2 { 2000 + year } else { year };
        let (d, m) = match order {
            _ if a > 12 => (a, b),
            _ if b > 12 => (b, a),
            DateOrder::Dmy => (a, b),
            DateOrder::Mdy => (b, a),
        };
        if let Some(s) = valid_date(year, m, d) {
            return Some(s);
        }
    }
    let c = TEXT_DATE.captures(text)?;
    if let (Some(d), Some(m), Some(y)) = (c.get(1), c.get(2), c.get(3)) {
        return valid_date(y.as_str().parse().ok()?, month(m.as_str())?, d.as_str().parse().ok()?);
    }
    let (m, d, y) = (c.get(4)?, c.get(5)?, c.get(6)?);
    valid_date(y.as_str().parse().ok()?, month(m.as_str())?, d.as_str().parse().ok()?)
}

/// The first time in `text` once dates are taken out (OCR may glue a time to its date).
fn time(text: &str) -> Option<String> {
    let text = ISO_DATE.replace_all(text, " ");
    let text = NUM_DATE.replace_all(&text, " ");
    let c = TIME.captures(&text)?;
    let (h, m): (u32, u32) = (c[1].parse().ok()?, c[2].parse().ok()?);
    Some(match c.get(3) {
        Some(s) => format!("{h:02}:{m:02}:{}", s.as_str()),
        None => format!("{h:02}:{m:02}"),
    })
}

/// The amount of the last row matching `words` (or of the row below it when it has none).
fn labelled_amount(rows: &[Row], words: &Regex, not: Option<&Regex>) -> Option<(usize, f64)> {
    let hits: Vec<usize> = (0..rows.len())
        .filter(|&i| words.is_match(&rows[i].text) && not.is_none_or(|n| !n.is_match(&rows[i].text)))
        .collect();
    hits.iter().rev().find_map(|&i| {
        amount(&rows[i].text)
            .map(|(v, _)| (i, v))
            .or_else(|| rows.get(i + 1).and_then(|r| amount(&r.text)).map(|(v, _)| (i, v)))
    })
}

/// Extracts a receipt's fields from its OCR `lines`.
pub fn extract(lines: &[TextLine], spec: &DocumentSpec) -> DocumentFields {
    let rows = rows(lines);
    let mut fields = DocumentFields::default();
    let letters = |t: &str| t.chars().filter(|c| c.is_alphabetic()).count();
    // Store names are printed big, near the top, and rarely carry digits (addresses do).
    let weight = |r: &Row| r.height * if r.text.chars().any(|c| c.is_ascii_digit()) { 0.7 } else { 1.0 };
    fields.store = rows
        .iter()
        .take(3)
        .filter(|r| letters(&r.text) >= 3 && letters(&r.text) * 10 >= r.text.chars().count() * 6)
        .filter(|r| amount(&r.text).is_none() && date(&r.text, spec.date_order).is_none())
        .fold(None::<&Row>, |best, r| match best {
            Some(b) if weight(b) >= weight(r) => Some(b),
            _ => Some(r),
        })
        .map(|r| r.text.clone());
    let date_row = rows.iter().position(|r| date(&r.text, spec.date_order).is_some());
    fields.date = date_row.and_then(|i| date(&rows[i].text, spec.date_order));
    fields.time = date_row.and_then(|i| time(&rows[i].text)).or_else(|| rows.iter().find_map(|r| time(&r.text)));
    let total = labelled_amount(&rows, &TOTAL, Some(&SUBTOTAL));
    fields.total = total.map(|(_, v)| v);
    fields.subtotal = labelled_amount(&rows, &SUBTOTAL, None).map(|(_, v)| v);
    fields.tax = labelled_amount(&rows, &TAX, None).map(|(_, v)| v);
    fields.currency = total
        .and_then(|(i, _)| currency(&rows[i].text))
        .or_else(|| rows.iter().find_map(|r| currency(&r.text)))
        .or_else(|| spec.currency.clone());
    let end = total.map_or(rows.len(), |(i, _)| i);
    let start = date_row.map_or(0, |i| i + 1).min(end);
    for row in &rows[start..end] {
        if SUBTOTAL.is_match(&row.text) || TAX.is_match(&row.text) || NOT_ITEM.is_match(&row.text) {
            continue;
        }
        let Some((price, name)) = amount(&row.text) else { continue };
        let name = name.trim_end_matches(|c: char| c.is_whitespace() || "€$£¥:".contains(c)).to_string();
        if letters(&name) < 2 {
            continue;
        }
        let (quantity, name) = match QUANTITY.captures(&name) {
            Some(c) => (c[1].parse().ok(), c[2].trim().to_string()),
            None => (None, name),
        };
        fields.items.push(Item { name, quantity, price });
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line of `text` at (`x`, `y`) with height `h`.
    fn line(text: &str, x: f32, y: f32, h: f32) -> TextLine {
        let w = 12.0 * text.len() as f32;
        TextLine { text: text.into(), confidence: 0.99, quad: [[x, y], [x + w, y], [x + w, y + h], [x, y + h]] }
    }

    #[test]
    fn a_till_receipt_gives_every_field() {
        let lines = vec![
            line("FRESH MARKET", 130.0, 30.0, 34.0),
            line("12 Harbour Street, Bristol", 95.0, 80.0, 24.0),
            line("Date: 2026-03-14 10:42", 40.0, 130.0, 24.0),
            line("Milk 1L", 40.0, 220.0, 24.0),
            line("1.29", 380.0, 221.0, 24.0),
            line("2 x Sourdough bread", 40.0, 260.0, 24.0),
            line("6.20", 380.0, 258.0, 24.0),
            line("Subtotal 7.49", 40.0, 300.0, 24.0),
            line("VAT 20% 1.25", 40.0, 340.0, 24.0),
            line("TOTAL", 40.0, 400.0, 32.0),
            line("€ 8.74", 350.0, 402.0, 32.0),
            line("Paid by card 8.74", 40.0, 450.0, 24.0),
        ];
        let f = extract(&lines, &DocumentSpec::default());
        assert_eq!(f.store.as_deref(), Some("FRESH MARKET"));
        assert_eq!((f.date.as_deref(), f.time.as_deref()), (Some("2026-03-14"), Some("10:42")));
        assert_eq!((f.total, f.subtotal, f.tax), (Some(8.74), Some(7.49), Some(1.25)));
        assert_eq!(f.currency.as_deref(), Some("EUR"));
        assert_eq!(
            f.items,
            vec![
                Item { name: "Milk 1L".into(), quantity: None, price: 1.29 },
                Item { name: "Sourdough bread".into(), quantity: Some(2), price: 6.2 },
            ]
        );
    }

    #[test]
    fn dates_in_other_forms_are_read_to_iso() {
        let o = DateOrder::Dmy;
        assert_eq!(date("03/11/2026 08:15", o).as_deref(), Some("2026-11-03"));
        assert_eq!(date("03/11/2026 08:15", DateOrder::Mdy).as_deref(), Some("2026-03-11"));
        assert_eq!(date("11/23/2026", o).as_deref(), Some("2026-11-23"), "a part over 12 decides");
        assert_eq!(date("03/11/202608:15", o).as_deref(), Some("2026-11-03"), "OCR dropped the space");
        assert_eq!(date("Date:2026-03-1410:42", o).as_deref(), Some("2026-03-14"));
        assert_eq!(date("14 Mar 2026", o).as_deref(), Some("2026-03-14"));
        assert_eq!(date("March 14, 2026", o).as_deref(), Some("2026-03-14"));
        assert_eq!(date("31.02.2026", o), None, "no 31 February");
        assert_eq!(date("Receipt no. 004817", o), None);
        assert_eq!(time("03/11/202608:15").as_deref(), Some("08:15"));
        assert_eq!(time("at 23:59:07").as_deref(), Some("23:59:07"));
        assert_eq!(time("Tel 0117 496 0000"), None);
    }

    #[test]
    fn amounts_take_thousands_separators_and_commas() {
        assert_eq!(amount("TOTAL 1,234.50"), Some((1234.5, "TOTAL".into())));
        assert_eq!(amount("Summe 1.234,50 EUR"), Some((1234.5, "Summe".into())));
        assert_eq!(amount("Discount -2.00"), Some((-2.0, "Discount".into())));
        assert_eq!(amount("Receipt no. 004817"), None);
        assert_eq!(currency("Total EUR"), Some("EUR".into()));
        assert_eq!(currency("EUROPA"), None, "a code inside a word is not one");
        assert_eq!(currency("$ 3.50"), Some("USD".into()));
    }

    #[test]
    fn nothing_found_is_null_not_a_guess() {
        let f = extract(&[line("hello world", 10.0, 10.0, 20.0)], &DocumentSpec::default());
        assert_eq!((f.date, f.total, f.currency, f.items.len()), (None, None, None, 0));
        let f = extract(&[], &DocumentSpec { currency: Some("CHF".into()), ..Default::default() });
        assert_eq!((f.store, f.currency.as_deref()), (None, Some("CHF")));
    }
}
