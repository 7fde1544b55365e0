//! The ledger: what every load is charged, from the moment its room is
//! set aside until the sessions it pays for are gone.
//!
//! Each load has an entry of its own, and a [`Charge`] that the worker owns
//! next to the sessions; dropping the charge (after the sessions) is the only
//! way an entry leaves the books. Unloads, evictions and failed loads of the
//! same model by different workers, in any order, on any thread, therefore
//! cannot take another load's charge off the books or leave one behind (they
//! once could: the books were keyed by model name, and a worker that had
//! been evicted and finished its queue later erased the charge of the same
//! model loaded again meanwhile).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where a load stands on the books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for memory on its way back (models being unloaded): its room
    /// is set aside so others do not take it, but nothing is held yet.
    Waiting,
    /// Loading: its room is held.
    Loading,
    Loaded,
    /// Asked to unload (to make room); held until its sessions are gone.
    Evicting,
}

impl Stage {
    /// Whether memory is held in this stage (a waiting load holds none yet).
    pub fn holds(self) -> bool {
        !matches!(self, Stage::Waiting)
    }
}

/// One load on the books.
#[derive(Debug, Clone)]
pub struct Entry {
    pub model: String,
    pub variant: String,
    /// What it is charged (or, waiting, what is set aside for it).
    pub bytes: u64,
    /// Room kept for its work beyond its charge (a decoder's KV cache): no
    /// other load may take it; its own requests are admitted against it.
    pub working: u64,
    /// Its RSS growth while loading.
    pub bytes_at_load: u64,
    pub stage: Stage,
    /// How long its load took (zero until loaded).
    pub load_time: Duration,
    /// When it was loaded (or its room reserved, before that).
    pub since: Instant,
    pub last_used: Instant,
    /// Whether its memory is being measured (from the start of its load to
    /// the end of its first job), and whether nothing else disturbed that:
    /// another load measured at the same time, or memory given back.
    pub(super) measuring: bool,
    pub(super) clean: bool,
}

impl Entry {
    /// What it takes on the books: its charge and the room kept for its work.
    pub fn taken(&self) -> u64 {
        self.bytes.saturating_add(self.working)
    }

    pub(super) fn new(model: &str) -> Entry {
        let now = Instant::now();
        Entry {
            model: model.to_string(),
            variant: String::new(),
            bytes: 0,
            working: 0,
            bytes_at_load: 0,
            stage: Stage::Waiting,
            load_time: Duration::ZERO,
            since: now,
            last_used: now,
            measuring: false,
            clean: false,
        }
    }
}

/// The entries, by load.
#[derive(Default)]
pub(super) struct Book {
    next: u64,
    pub(super) entries: BTreeMap<u64, Entry>,
}

impl Book {
    /// Entry `id`'s load begins: its measurement starts, clean unless
    /// another load is under way; measurements under way are disturbed by it.
    pub(super) fn begin(&mut self, id: u64) {
        let mut loading = false;
        for (_, e) in self.entries.iter_mut().filter(|(other, _)| **other != id) {
            loading |= e.stage == Stage::Loading;
            if e.measuring {
                e.clean = false;
            }
        }
        if let Some(e) = self.entries.get_mut(&id) {
            e.measuring = true;
            e.clean = !loading;
        }
    }

    /// Entry `id`'s measurement ends: whether it was undisturbed.
    pub(super) fn finish(&mut self, id: u64) -> bool {
        self.entries.get_mut(&id).is_some_and(|e| {
            e.measuring = false;
            std::mem::take(&mut e.clean)
        })
    }

    /// Whether entry `id`'s measurement is undisturbed so far.
    pub(super) fn clean(&self, id: u64) -> bool {
        self.entries.get(&id).is_some_and(|e| e.measuring && e.clean)
    }

    fn given_back(&mut self) {
        for e in self.entries.values_mut() {
            e.clean = false;
        }
    }
}

/// The books and the signal that they changed (memory given back, a load done).
#[derive(Default)]
pub(super) struct Ledger {
    book: Mutex<Book>,
    changed: Condvar,
}

impl Ledger {
    pub(super) fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens an entry for a load of `model` and returns its charge.
    pub(super) fn open(self: &Arc<Self>, book: &mut Book, model: &str) -> Charge {
        let id = book.next;
        book.next += 1;
        book.entries.insert(id, Entry::new(model));
        Charge { id, ledger: self.clone() }
    }

    /// Waits at most `timeout` for the books to change.
    pub(super) fn wait<'a>(&self, book: MutexGuard<'a, Book>, timeout: Duration) -> MutexGuard<'a, Book> {
        self.changed.wait_timeout(book, timeout).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0)
    }

    /// Wakes the loads waiting for room.
    pub(super) fn notify(&self) {
        self.changed.notify_all();
    }

    fn release(&self, id: u64) {
        let mut book = self.lock();
        if book.entries.remove(&id).is_some_and(|e| e.stage.holds()) {
            book.given_back();
        }
        drop(book);
        self.notify();
    }
}

/// One load's charge on the books. Whoever holds the sessions holds this,
/// and drops it after them: only then does their memory leave the books.
#[must_use = "dropping a charge takes it off the books"]
pub struct Charge {
    id: u64,
    ledger: Arc<Ledger>,
}

impl Charge {
    /// The entry this charge pays for (see [`super::Manager::ledger`]).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({})", self.id)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.ledger.release(self.id);
    }
}
