//! Text out: the generated tokens' text as the client sees it. The whole
//! answer is decoded again at each token (a byte-level token may complete a
//! character another began), cut at the first stop string, and streamed as
//! far as it is settled: a tail that may still become a stop string, and a
//! character still being spelled byte by byte, wait for the next token.

use tokio::sync::mpsc::UnboundedSender;

/// One sequence's answer text, its stop strings and its stream.
pub(super) struct TextOut {
    stop: Vec<String>,
    /// The answer so far, cut at a stop string once one appears.
    text: String,
    /// Bytes of `text` already streamed.
    streamed: usize,
    stream: Option<UnboundedSender<String>>,
}

impl TextOut {
    /// Empty stop strings are dropped (they would end every answer at once).
    pub(super) fn new(mut stop: Vec<String>, stream: Option<UnboundedSender<String>>) -> TextOut {
        stop.retain(|s| !s.is_empty());
        TextOut { stop, text: String::new(), streamed: 0, stream }
    }

    /// Takes the answer's text as decoded now; streams what is settled. True
    /// when a stop string appeared (the text is cut before it; the answer ends).
    pub(super) fn update(&mut self, decoded: String) -> bool {
        self.text = decoded;
        if cut_at_stop(&mut self.text, &self.stop) {
            return true;
        }
        let hold = stop_prefix_tail(&self.text, &self.stop);
        let mut settled = self.text.len() - hold;
        while !self.text.is_char_boundary(settled) {
            settled -= 1;
        }
        let complete = self.text[..settled].trim_end_matches('\u{FFFD}').len();
        self.send(complete);
        false
    }

    /// Ends the answer: `decoded` (when given) replaces the text, cut at a
    /// stop string; `closing` is appended (a JSON value closed short of its
    /// budget); the rest is streamed and the stream closed.
    pub(super) fn finish(&mut self, decoded: Option<String>, closing: Option<String>) {
        if let Some(text) = decoded {
            self.text = text;
            cut_at_stop(&mut self.text, &self.stop);
        }
        if let Some(closing) = closing {
            self.text.push_str(&closing);
        }
        self.send(self.text.len());
        self.stream = None;
    }

    /// True while nothing of the answer is known (a stop string, or nothing decoded yet).
    pub(super) fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// True when the client streaming this answer went away.
    pub(super) fn is_abandoned(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_closed())
    }

    /// The answer's text.
    pub(super) fn take(&mut self) -> String {
        std::mem::take(&mut self.text)
    }

    fn send(&mut self, upto: usize) {
        if upto > self.streamed {
            if let Some(s) = &self.stream {
                let _ = s.send(self.text[self.streamed..upto].to_string());
            }
            self.streamed = upto;
        }
    }
}

/// Bytes at the end of `text` that begin one of `stop` (and so may still
/// become it): the longest such tail, 0 when none does.
fn stop_prefix_tail(text: &str, stop: &[String]) -> usize {
    stop.iter()
        .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n) && text.ends_with(&s[..n])))
        .max()
        .unwrap_or(0)
}

/// Cuts `text` before the first of `stop` in it; says whether one was found.
fn cut_at_stop(text: &mut String, stop: &[String]) -> bool {
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => {
            text.truncate(at);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tail_that_may_become_a_stop_string_is_held_back() {
        let stop = vec!["<|im_start|>".to_string(), "\nUser:".to_string()];
        assert_eq!(stop_prefix_tail("Paris.", &stop), 0);
        assert_eq!(stop_prefix_tail("Paris.<|im", &stop), 4);
        assert_eq!(stop_prefix_tail("Paris.\nUse", &stop), 4);
        assert_eq!(stop_prefix_tail("a <", &stop), 1);
        assert_eq!(stop_prefix_tail("", &stop), 0);
    }

    fn streamed(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn settled_text_streams_and_a_stop_string_ends_the_answer_before_it() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut out = TextOut::new(vec!["\nUser:".into(), String::new()], Some(tx));
        assert!(!out.update("Hello".into()));
        assert!(!out.update("Hello.\nUs".into())); // "\nUs" may become the stop string: held
        assert_eq!(streamed(&mut rx), ["Hello", "."]);
        assert!(!out.update("Hello.\nUsually".into())); // it did not: released
        assert_eq!(streamed(&mut rx), ["\nUsually"]);
        assert!(out.update("Hello.\nUsually.\nUser: next".into()));
        out.finish(None, None);
        assert_eq!(streamed(&mut rx), ["."]);
        assert_eq!(out.take(), "Hello.\nUsually.");
        assert!(rx.try_recv().is_err(), "the stream closes with the answer");
    }

    #[test]
    fn a_character_still_being_spelled_waits_for_its_last_byte() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut out = TextOut::new(Vec::new(), Some(tx));
        out.update("caf\u{FFFD}".into()); // the first byte of 'é' alone decodes as U+FFFD
        assert_eq!(streamed(&mut rx), ["caf"]);
        out.update("café".into());
        out.finish(None, Some("\"}".into()));
        assert_eq!(streamed(&mut rx), ["é", "\"}"]);
        assert_eq!(out.take(), "café\"}");
    }

    #[test]
    fn finishing_with_the_whole_text_cuts_at_a_stop_and_a_gone_client_is_seen() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut out = TextOut::new(vec!["END".into()], Some(tx));
        assert!(out.is_empty() && !out.is_abandoned());
        drop(rx);
        assert!(out.is_abandoned());
        out.finish(Some("one END two".into()), None);
        assert_eq!(out.take(), "one ");
        assert!(!out.is_abandoned(), "a finished answer has no stream");
    }
}
