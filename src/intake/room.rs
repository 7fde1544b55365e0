//! Room for the request bodies held at once (`socket.max_bodies_mb`), in
//! KiB, taken as the bytes arrive: a client that announces a body and sends
//! nothing holds nothing.
//!
//! Taking room piece by piece can deadlock where reserving a whole body up
//! front could not: when every body that holds room is waiting for more, no
//! room will ever come back. The [`Ledger`] serves waiting bodies in the
//! order they started, and when it finds that deadlock it takes back the room
//! of the youngest waiting body (which is answered 429) until the oldest can
//! go on. So a burst larger than the room is read oldest first and the
//! excess refused at once, never stuck until its timeout. The ledger is
//! I/O-free with table tests; [`BodyRoom`] puts it behind a lock and wakes
//! the waiters it names.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Where a body stands, as the ledger sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading its bytes (it got all the room it asked for).
    Reading,
    /// Waiting for this many more KiB.
    Waiting(u64),
    /// Read whole; its room comes back when its job ends.
    Done,
    /// Its room was taken back to end a deadlock: it is refused.
    Evicted,
}

#[derive(Debug)]
struct Entry {
    held: u64,
    phase: Phase,
}

/// What asking for room answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    Granted,
    /// Wait until woken, then look at [`Ledger::phase_of`].
    Wait,
    Evicted,
}

/// The room's books: capacity, what each open body holds and wants.
#[derive(Debug)]
pub(crate) struct Ledger {
    capacity: u64,
    used: u64,
    next: u64,
    /// Bodies by the order they started (older first).
    bodies: BTreeMap<u64, Entry>,
}

impl Ledger {
    pub(crate) fn new(capacity_kib: u64) -> Ledger {
        Ledger { capacity: capacity_kib, used: 0, next: 0, bodies: BTreeMap::new() }
    }

    /// A new body, holding nothing; its number orders it among the others.
    pub(crate) fn open(&mut self) -> u64 {
        self.next += 1;
        self.bodies.insert(self.next, Entry { held: 0, phase: Phase::Reading });
        self.next
    }

    /// Body `id` asks for `kib` more: granted at once when free and no older
    /// body waits, else it waits. Returns the answer and the bodies to wake.
    pub(crate) fn ask(&mut self, id: u64, kib: u64) -> (Ask, Vec<u64>) {
        let older_waits = self.bodies.range(..id).any(|(_, e)| matches!(e.phase, Phase::Waiting(_)));
        let Some(entry) = self.bodies.get_mut(&id) else { return (Ask::Evicted, Vec::new()) };
        if entry.phase == Phase::Evicted {
            return (Ask::Evicted, Vec::new());
        }
        if !older_waits && self.used + kib <= self.capacity {
            entry.held += kib;
            entry.phase = Phase::Reading;
            self.used += kib;
            return (Ask::Granted, Vec::new());
        }
        entry.phase = Phase::Waiting(kib);
        let woken = self.settle();
        let answer = match self.phase_of(id) {
            Some(Phase::Reading) => Ask::Granted,
            Some(Phase::Evicted) | None => Ask::Evicted,
            _ => Ask::Wait,
        };
        (answer, woken.into_iter().filter(|w| *w != id).collect())
    }

    /// Body `id` is read whole (it keeps its room until [`Ledger::close`]).
    pub(crate) fn done(&mut self, id: u64) {
        if let Some(e) = self.bodies.get_mut(&id)
            && e.phase != Phase::Evicted
        {
            e.phase = Phase::Done;
        }
    }

    /// Body `id` is gone (answered, refused or its job ended): its room comes
    /// back. Returns the bodies to wake.
    pub(crate) fn close(&mut self, id: u64) -> Vec<u64> {
        if let Some(e) = self.bodies.remove(&id) {
            self.used -= e.held;
        }
        self.settle()
    }

    /// Where body `id` stands.
    fn phase_of(&self, id: u64) -> Option<Phase> {
        self.bodies.get(&id).map(|e| e.phase)
    }

    /// Whether body `id` may go on (`Some(true)`), is refused (`Some(false)`) or still waits.
    pub(crate) fn outcome(&self, id: u64) -> Option<bool> {
        match self.phase_of(id) {
            Some(Phase::Reading | Phase::Done) => Some(true),
            Some(Phase::Evicted) | None => Some(false),
            Some(Phase::Waiting(_)) => None,
        }
    }

    /// KiB held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// The oldest waiting body and what it waits for.
    fn oldest_waiting(&self) -> Option<(u64, u64)> {
        self.bodies.iter().find_map(|(id, e)| match e.phase {
            Phase::Waiting(k) => Some((*id, k)),
            _ => None,
        })
    }

    /// Serves the waiting bodies oldest first while room allows; when every
    /// body that holds room is waiting (nothing will come back), takes back
    /// the room of the youngest waiting holder younger than the oldest
    /// waiter. Returns the bodies granted or evicted.
    fn settle(&mut self) -> Vec<u64> {
        let mut woken = Vec::new();
        while let Some((oldest, need)) = self.oldest_waiting() {
            if self.used + need <= self.capacity {
                let e = self.bodies.get_mut(&oldest).expect("found above");
                e.held += need;
                e.phase = Phase::Reading;
                self.used += need;
                woken.push(oldest);
                continue;
            }
            let progressing =
                self.bodies.values().any(|e| e.held > 0 && matches!(e.phase, Phase::Reading | Phase::Done));
            if progressing {
                break; // room will come back
            }
            let victim = self
                .bodies
                .range(oldest + 1..)
                .rev()
                .find(|(_, e)| e.held > 0 && matches!(e.phase, Phase::Waiting(_)))
                .map(|(id, _)| *id);
            let Some(victim) = victim else { break };
            let e = self.bodies.get_mut(&victim).expect("found above");
            self.used -= e.held;
            e.held = 0;
            e.phase = Phase::Evicted;
            woken.push(victim);
        }
        woken
    }
}

/// The ledger shared by every request, with a wake-up per waiting body.
pub struct BodyRoom {
    ledger: Mutex<Ledger>,
    wakers: Mutex<BTreeMap<u64, Arc<tokio::sync::Notify>>>,
}

impl BodyRoom {
    /// Room for `capacity_kib` KiB of bodies.
    pub fn new(capacity_kib: u64) -> Arc<BodyRoom> {
        Arc::new(BodyRoom { ledger: Mutex::new(Ledger::new(capacity_kib)), wakers: Mutex::new(BTreeMap::new()) })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self, ids: Vec<u64>) {
        let wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(w) = wakers.get(&id) {
                w.notify_one();
            }
        }
    }

    /// A new body's share of the room (holding none yet).
    pub(crate) fn open(self: &Arc<Self>) -> BodyShare {
        let id = self.ledger().open();
        let notify = Arc::new(tokio::sync::Notify::new());
        self.wakers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, notify.clone());
        BodyShare { room: self.clone(), id, notify }
    }

    /// KiB held now, over every body.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.ledger().used()
    }
}

/// One body's room; given back when dropped (the caller keeps it until its job ends).
pub struct BodyShare {
    room: Arc<BodyRoom>,
    id: u64,
    notify: Arc<tokio::sync::Notify>,
}

/// Why no room came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoRoom {
    /// Taken back for an older body (a deadlock of waiting bodies).
    Evicted,
    /// None came within the time given.
    TimedOut,
}

impl BodyShare {
    /// `kib` more KiB, waiting at most until `deadline`.
    pub(crate) async fn take(&self, kib: u64, deadline: std::time::Instant) -> Result<(), NoRoom> {
        let (answer, woken) = self.room.ledger().ask(self.id, kib);
        self.room.wake(woken);
        match answer {
            Ask::Granted => return Ok(()),
            Ask::Evicted => return Err(NoRoom::Evicted),
            Ask::Wait => {}
        }
        loop {
            let notified = self.notify.notified();
            match self.room.ledger().outcome(self.id) {
                Some(true) => return Ok(()),
                Some(false) => return Err(NoRoom::Evicted),
                None => {}
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                return match self.room.ledger().outcome(self.id) {
                    Some(true) => Ok(()),
                    Some(false) => Err(NoRoom::Evicted),
                    None => Err(NoRoom::TimedOut),
                };
            }
        }
    }

    /// The body is read whole.
    pub(crate) fn done(&self) {
        self.room.ledger().done(self.id);
    }
}

impl Drop for BodyShare {
    fn drop(&mut self) {
        self.room.wakers.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        let woken = self.room.ledger().close(self.id);
        self.room.wake(woken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_granted_as_asked_and_given_back_on_close() {
        let mut l = Ledger::new(100);
        let a = l.open();
        assert_eq!(l.ask(a, 60), (Ask::Granted, vec![]));
        let b = l.open();
        assert_eq!(l.ask(b, 30), (Ask::Granted, vec![]));
        // Full: c waits, and is served when a's room comes back.
        let c = l.open();
        assert_eq!(l.ask(c, 20).0, Ask::Wait);
        l.done(a);
        assert_eq!(l.close(a), vec![c]);
        assert_eq!((l.outcome(c), l.used()), (Some(true), 50));
    }

    #[test]
    fn a_body_that_sends_nothing_holds_nothing() {
        let mut l = Ledger::new(100);
        let idle: Vec<u64> = (0..1000).map(|_| l.open()).collect();
        let upload = l.open();
        assert_eq!(l.ask(upload, 100), (Ask::Granted, vec![]));
        assert_eq!(idle.len(), 1000);
    }

    #[test]
    fn waiting_bodies_are_served_oldest_first() {
        let mut l = Ledger::new(100);
        let a = l.open();
        l.ask(a, 100);
        l.done(a);
        let (b, c) = (l.open(), l.open());
        assert_eq!(l.ask(b, 50).0, Ask::Wait);
        // c would fit after a, but b came first: c waits behind it.
        assert_eq!(l.ask(c, 10).0, Ask::Wait);
        assert_eq!(l.close(a), vec![b, c]);
    }

    #[test]
    fn a_deadlock_of_waiting_bodies_evicts_the_youngest_until_the_oldest_goes_on() {
        let mut l = Ledger::new(100);
        let ids: Vec<u64> = (0..4).map(|_| l.open()).collect();
        for &id in &ids {
            assert_eq!(l.ask(id, 25).0, Ask::Granted);
        }
        // Each wants 25 more: the first three wait while the others still read.
        for &id in &ids[..3] {
            assert_eq!(l.ask(id, 25).0, Ask::Wait);
        }
        // The last one waiting makes it a deadlock: it is the youngest, evicted;
        // its 25 go to the oldest.
        let (answer, woken) = l.ask(ids[3], 25);
        assert_eq!((answer, woken), (Ask::Evicted, vec![ids[0]]));
        assert_eq!(l.outcome(ids[0]), Some(true));
        assert_eq!((l.outcome(ids[1]), l.outcome(ids[2])), (None, None), "the others wait: the oldest reads");
        // The oldest is read and its job ends: the next in line goes on.
        l.done(ids[0]);
        assert_eq!(l.close(ids[0]), vec![ids[1], ids[2]]);
        assert_eq!(l.used(), 100);
    }

    #[test]
    fn bodies_read_whole_are_not_a_deadlock() {
        let mut l = Ledger::new(100);
        let (a, b) = (l.open(), l.open());
        l.ask(a, 60);
        l.done(a); // its job runs; its room comes back when it ends
        l.ask(b, 40);
        assert_eq!(l.ask(b, 10).0, Ask::Wait, "b waits for a's job, nobody is evicted");
        assert_eq!(l.close(a), vec![b]);
    }

    #[tokio::test]
    async fn a_waiting_body_wakes_when_room_comes_back_or_times_out() {
        let room = BodyRoom::new(100);
        let first = room.open();
        first.take(100, std::time::Instant::now()).await.unwrap();
        first.done();
        let second = room.open();
        let soon = std::time::Instant::now() + std::time::Duration::from_millis(50);
        assert_eq!(second.take(10, soon).await, Err(NoRoom::TimedOut));
        let later = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let waiting = tokio::spawn(async move { second.take(10, later).await.map(|()| second) });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(first);
        let second = waiting.await.unwrap().unwrap();
        assert_eq!(room.used(), 10);
        drop(second);
        assert_eq!(room.used(), 0);
    }
}
