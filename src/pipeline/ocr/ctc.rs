//! CTC greedy decoding for text recognisers (PP-OCR): the best class per
//! time step, repeats collapsed, blanks dropped. PP-OCR's classes are
//! `blank`, the model's dictionary (its ONNX metadata `character`, one entry
//! per line), then a space.

/// The class list of a PP-OCR recogniser from its `character` metadata.
pub fn paddle_classes(character: &str) -> Vec<String> {
    let mut classes = vec![String::new()]; // 0: blank
    classes.extend(character.lines().map(str::to_string));
    classes.push(" ".into());
    classes
}

/// Decodes `probs` (`[steps, classes]`, row-major) with class 0 as blank:
/// the text and its confidence (mean probability of the kept characters;
/// 0 for empty text).
pub fn greedy(probs: &[f32], classes: &[String]) -> Result<(String, f32), String> {
    let n = classes.len();
    if n == 0 || !probs.len().is_multiple_of(n) {
        return Err(format!("{} probabilities do not split into rows of {n} classes", probs.len()));
    }
    let mut text = String::new();
    let (mut sum, mut kept) = (0f32, 0usize);
    let mut previous = usize::MAX;
    for row in probs.chunks_exact(n) {
        let (best, p) = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bp), (i, &p)| if p > bp { (i, p) } else { (bi, bp) });
        if best != 0 && best != previous {
            text.push_str(&classes[best]);
            sum += p;
            kept += 1;
        }
        previous = best;
    }
    Ok((text, if kept == 0 { 0.0 } else { sum / kept as f32 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_hot(seq: &[usize], n: usize) -> Vec<f32> {
        seq.iter().flat_map(|&i| (0..n).map(move |c| if c == i { 0.9 } else { 0.1 / (n - 1) as f32 })).collect()
    }

    #[test]
    fn repeats_collapse_blanks_separate_and_space_is_last() {
        let classes = paddle_classes("a\nb\nc");
        assert_eq!(classes.len(), 5);
        // a a _ a b b _ <space> c  →  "aab c"
        let (text, conf) = greedy(&one_hot(&[1, 1, 0, 1, 2, 2, 0, 4, 3], 5), &classes).unwrap();
        assert_eq!(text, "aab c");
        assert!((conf - 0.9).abs() < 1e-6);
        assert_eq!(greedy(&one_hot(&[0, 0, 0], 5), &classes).unwrap(), (String::new(), 0.0));
        assert!(greedy(&[0.5; 7], &classes).is_err());
    }
}
