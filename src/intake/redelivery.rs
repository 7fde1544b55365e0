//! Recognising MQTT redeliveries, so a job is neither computed twice nor lost.
//!
//! A message is a redelivery of another when it *is* the same message:
//! - a job with an envelope `id` is keyed by its content — model, reply route,
//!   correlation data and the payload's sha256 (which holds the id). Two jobs
//!   that share an id but differ in anything else are two jobs; a client-chosen
//!   id alone never makes a message a redelivery.
//! - a job without an id is keyed by the session's packet id *and* its content,
//!   and only a message the broker marks DUP (a redelivery in the MQTT sense)
//!   is matched against answered ones.
//! - QoS 0 jobs without an id are never matched: the broker never redelivers them.
//!
//! Answers are kept for the last `window` jobs (and at most `max_bytes` of
//! payload), in memory and, when a file is given, appended to it so the window
//! survives a restart of the daemon: a job answered just before a kill and
//! redelivered after it gets its stored answer again instead of a second run.
//! Pure bookkeeping: no I/O except the answer file.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;

/// What identifies a delivery of a job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// A job with an id: its content.
    Content(String),
    /// A QoS 1 job without an id: the packet id and its content.
    Packet(u16, String),
    /// Never a redelivery (QoS 0 without an id).
    Unique,
}

impl Key {
    /// The key of a job for `model`, answered on `route` with `correlation`.
    pub(crate) fn of(
        has_id: bool,
        qos0: bool,
        pkid: u16,
        model: &str,
        route: &str,
        correlation: &[u8],
        payload: &[u8],
    ) -> Key {
        if !has_id && qos0 {
            return Key::Unique;
        }
        let mut h = Sha256::new();
        for part in [model.as_bytes(), route.as_bytes(), correlation] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(payload);
        let digest = hex::encode(h.finalize());
        if has_id { Key::Content(digest) } else { Key::Packet(pkid, digest) }
    }

    fn text(&self) -> Option<String> {
        match self {
            Key::Content(d) => Some(format!("c:{d}")),
            Key::Packet(p, d) => Some(format!("p:{p}:{d}")),
            Key::Unique => None,
        }
    }

    fn parse(text: &str) -> Option<Key> {
        if let Some(d) = text.strip_prefix("c:") {
            return Some(Key::Content(d.to_string()));
        }
        let (p, d) = text.strip_prefix("p:")?.split_once(':')?;
        Some(Key::Packet(p.parse().ok()?, d.to_string()))
    }
}

/// A published answer, kept to be published again on a redelivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
    pub payload: String,
}

impl Answer {
    fn bytes(&self) -> usize {
        self.payload.len() + self.topic.len() + self.correlation.as_ref().map_or(0, Vec::len) + 64
    }
}

/// What to do with a message.
#[derive(Debug, PartialEq)]
pub(crate) enum Seen {
    /// A new job: run it.
    New,
    /// The same job is running: its acknowledgement goes out when it finishes.
    Running,
    /// Answered already: publish this again (once, for this delivery) and acknowledge.
    Answered(Answer),
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    #[serde(flatten)]
    answer: Answer,
}

/// Jobs running and recently answered, keyed by [`Key`]; `A` is what acknowledges a message.
pub(crate) struct Redelivery<A> {
    window: usize,
    max_bytes: usize,
    running: HashMap<Key, Vec<A>>,
    answered: HashMap<Key, Answer>,
    order: VecDeque<Key>,
    bytes: usize,
    file: Option<PathBuf>,
    lines_in_file: usize,
}

impl<A> Redelivery<A> {
    /// A window of `window` answers (at most `max_bytes` of them), kept in `file` when given.
    /// What the file already holds is read back (a missing or damaged file starts empty).
    pub(crate) fn new(window: usize, max_bytes: usize, file: Option<PathBuf>) -> Redelivery<A> {
        let mut r = Redelivery {
            window,
            max_bytes,
            running: HashMap::new(),
            answered: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            file: None,
            lines_in_file: 0,
        };
        if let Some(path) = &file {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for line in text.lines() {
                r.lines_in_file += 1;
                if let Ok(l) = serde_json::from_str::<Line>(line)
                    && let Some(key) = Key::parse(&l.key)
                {
                    r.remember(key, l.answer);
                }
            }
            if r.lines_in_file > 0 {
                tracing::info!(path = %path.display(), answers = r.order.len(), "MQTT redelivery window read back");
            }
        }
        r.file = file;
        r
    }

    /// Answers kept now.
    #[cfg(test)]
    pub(crate) fn answered_len(&self) -> usize {
        self.order.len()
    }

    /// Classifies a delivery; `dup` is the MQTT DUP flag.
    pub(crate) fn check(&mut self, key: &Key, dup: bool, ack: A) -> Seen {
        if *key == Key::Unique {
            return Seen::New;
        }
        let may_be_answered = matches!(key, Key::Content(_)) || dup;
        if may_be_answered && let Some(answer) = self.answered.get(key) {
            return Seen::Answered(answer.clone());
        }
        if let Some(waiting) = self.running.get_mut(key) {
            waiting.push(ack);
            return Seen::Running;
        }
        self.running.insert(key.clone(), vec![ack]);
        Seen::New
    }

    /// The job finished and `answer` was published (None: it could not be):
    /// remember it and return the acknowledgements to send (none when not published,
    /// so the broker delivers the job again).
    pub(crate) fn finish(&mut self, key: &Key, answer: Option<Answer>) -> Vec<A> {
        let Some(answer) = answer else {
            self.running.remove(key);
            return Vec::new();
        };
        let mut acks = self.running.remove(key).unwrap_or_default();
        if matches!(key, Key::Packet(..)) {
            acks.truncate(1); // redeliveries share the packet id: one PUBACK answers them all
        }
        if *key != Key::Unique && self.window > 0 {
            self.append(key, &answer);
            self.remember(key.clone(), answer);
        }
        acks
    }

    fn remember(&mut self, key: Key, answer: Answer) {
        if answer.bytes() > self.max_bytes {
            return;
        }
        self.bytes += answer.bytes();
        if let Some(old) = self.answered.insert(key.clone(), answer) {
            self.bytes -= old.bytes();
            self.order.retain(|k| *k != key);
        }
        self.order.push_back(key);
        while self.order.len() > self.window || self.bytes > self.max_bytes {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(a) = self.answered.remove(&old) {
                self.bytes -= a.bytes();
            }
        }
    }

    /// Appends one answer to the file (before its job is acknowledged), and
    /// rewrites the file from memory when it holds twice the window.
    fn append(&mut self, key: &Key, answer: &Answer) {
        let (Some(path), Some(key)) = (self.file.clone(), key.text()) else { return };
        let line = match serde_json::to_string(&Line { key, answer: answer.clone() }) {
            Ok(l) => l,
            Err(_) => return,
        };
        if self.lines_in_file >= self.window.saturating_mul(2).max(64) {
            self.rewrite(&path);
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        match written {
            Ok(()) => self.lines_in_file += 1,
            Err(e) => tracing::warn!(path = %path.display(), "cannot keep an MQTT answer for redeliveries: {e}"),
        }
    }

    fn rewrite(&mut self, path: &std::path::Path) {
        let mut text = String::new();
        for key in &self.order {
            if let (Some(k), Some(answer)) = (key.text(), self.answered.get(key))
                && let Ok(line) = serde_json::to_string(&Line { key: k, answer: answer.clone() })
            {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let tmp = path.with_extension("tmp");
        match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            Ok(()) => self.lines_in_file = self.order.len(),
            Err(e) => tracing::warn!(path = %path.display(), "cannot compact the MQTT answer file: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: bool, pkid: u16, model: &str, route: &str, payload: &str) -> Key {
        Key::of(id, false, pkid, model, route, b"", payload.as_bytes())
    }

    fn answer(text: &str) -> Option<Answer> {
        Some(Answer { topic: "r".into(), correlation: None, user_properties: vec![], payload: text.into() })
    }

    #[test]
    fn a_shared_id_is_a_new_job_unless_everything_else_matches() {
        let mut r: Redelivery<u16> = Redelivery::new(16, 1 << 20, None);
        let a = key(true, 1, "color", "cams/1", r#"{"id":"7","image_base64":"AAA"}"#);
        // Same id, other image: a new job, also while the first runs.
        let b = key(true, 2, "color", "cams/1", r#"{"id":"7","image_base64":"BBB"}"#);
        // Same id and image, other model or other reply route: new jobs.
        let c = key(true, 3, "ocr", "cams/1", r#"{"id":"7","image_base64":"AAA"}"#);
        let d = key(true, 4, "color", "cams/2", r#"{"id":"7","image_base64":"AAA"}"#);
        assert_eq!(r.check(&a, false, 1), Seen::New);
        for (k, ack) in [(&b, 2), (&c, 3), (&d, 4)] {
            assert_eq!(r.check(k, false, ack), Seen::New);
        }
        // The same message again while it runs waits for it, and both are acknowledged.
        assert_eq!(r.check(&a, true, 5), Seen::Running);
        assert_eq!(r.finish(&a, answer("A")), vec![1, 5]);
        assert_eq!(r.finish(&b, answer("B")), vec![2]);
        // Answered: the same message gets the same answer; a reused id with new content does not.
        assert_eq!(r.check(&a, false, 6), Seen::Answered(answer("A").unwrap()));
        let e = key(true, 7, "color", "cams/1", r#"{"id":"7","image_base64":"CCC"}"#);
        assert_eq!(r.check(&e, false, 7), Seen::New);
    }

    #[test]
    fn jobs_without_an_id_match_only_a_dup_of_the_same_packet() {
        let mut r: Redelivery<u16> = Redelivery::new(16, 1 << 20, None);
        let k = key(false, 9, "color", "res", "jpeg");
        assert_eq!(r.check(&k, false, 9), Seen::New);
        assert_eq!(r.check(&k, true, 9), Seen::Running);
        assert_eq!(r.finish(&k, answer("X")), vec![9], "one PUBACK per packet id");
        assert_eq!(r.check(&k, false, 9), Seen::New, "a reused packet id without DUP is a new job");
        assert_eq!(r.finish(&k, answer("Y")), vec![9]);
        assert_eq!(r.check(&k, true, 9), Seen::Answered(answer("Y").unwrap()));
        assert_eq!(r.check(&key(false, 10, "color", "res", "jpeg"), true, 10), Seen::New, "other packet");
        let qos0 = Key::of(false, true, 0, "color", "res", b"", b"jpeg");
        assert_eq!(r.check(&qos0, false, 0), Seen::New);
        assert_eq!(r.check(&qos0, false, 0), Seen::New, "QoS 0 without an id is never a redelivery");
    }

    #[test]
    fn an_unpublished_answer_acknowledges_nothing() {
        let mut r: Redelivery<u16> = Redelivery::new(16, 1 << 20, None);
        let k = key(true, 1, "m", "r", "p");
        assert_eq!(r.check(&k, false, 1), Seen::New);
        assert!(r.finish(&k, None).is_empty());
        assert_eq!(r.check(&k, true, 2), Seen::New, "it runs again");
    }

    #[test]
    fn the_window_is_bounded_by_count_and_bytes_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("answers");
        let mut r: Redelivery<u16> = Redelivery::new(3, 1 << 20, Some(file.clone()));
        let keys: Vec<Key> = (0..5).map(|i| key(true, i, "m", "r", &format!("job {i}"))).collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(r.check(k, false, i as u16), Seen::New);
            r.finish(k, answer(&format!("answer {i}")));
        }
        assert_eq!(r.answered_len(), 3);
        assert_eq!(r.check(&keys[0], false, 0), Seen::New, "evicted");
        let mut again: Redelivery<u16> = Redelivery::new(3, 1 << 20, Some(file.clone()));
        assert_eq!(again.answered_len(), 3);
        assert_eq!(again.check(&keys[4], true, 4), Seen::Answered(answer("answer 4").unwrap()));
        assert_eq!(again.check(&keys[1], true, 1), Seen::New, "only the last 3 came back");
        // Many more answers: the file is compacted and stays readable.
        for i in 0..300u16 {
            let k = key(false, i, "m", "r", "x");
            again.check(&k, false, i);
            again.finish(&k, answer("y"));
        }
        let lines = std::fs::read_to_string(&file).unwrap().lines().count();
        assert!(lines <= 65, "{lines} lines kept");
        let tight: Redelivery<u16> = Redelivery::new(1000, 300, Some(file));
        assert!(tight.answered_len() <= 4, "the byte bound holds on reading back too");
    }
}
