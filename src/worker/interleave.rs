//! Interleaving the jobs of a many-call task (text generation): the worker
//! starts each as a sequence from the task's stepper and advances them all a
//! step per round, knowing nothing else about the task.

use super::{Cells, Job, Work, mark_running, panic_text, set_busy};
use crate::engine::LoadedModel;
use crate::error::InferError;
use crate::job::JobOutput;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// A job of a many-call task in progress (a generation) and the client it answers.
struct Active {
    reply: oneshot::Sender<Result<JobOutput, InferError>>,
    seq: Box<dyn crate::pipeline::Sequence>,
    /// What it can grow to (its KV cache).
    memory_bytes: u64,
    timings: crate::job::Timings,
    error: Option<InferError>,
    /// Runs alone (the quarantine's suspect): no other sequence joins while it runs.
    suspect: bool,
    /// Marked running for the quarantine until it ends.
    _mark: crate::quarantine::Mark,
}

/// Runs the sequences of a many-call task (text generation) for `first` and
/// every job that joins it, up to the task's `parallel`: each round advances
/// every sequence by one step, so a long answer never holds up a short one and
/// each keeps its own state. Jobs admitted while others run start at the next
/// round; other work (a swap, a load) waits in `next` until every sequence has ended.
pub(super) fn interleave(
    cells: &Cells<'_>,
    m: &mut LoadedModel,
    first: Job,
    queue: &mut mpsc::Receiver<Work>,
    next: &mut std::collections::VecDeque<Work>,
) {
    let parallel = m.parallel().unwrap_or(1);
    let mut active: Vec<Active> = Vec::new();
    let admit = |job: Job, active: &mut Vec<Active>, m: &mut LoadedModel| {
        let mark = mark_running(cells.ctx, &job.options);
        let suspect = job.suspect;
        let admitted = m.start(job.input).and_then(|(seq, prep)| {
            // A sequence grows with every step: refuse now what memory cannot hold at the end.
            let need = seq.memory_bytes();
            let held: u64 = active.iter().map(|a| a.memory_bytes).sum();
            match cells.ctx.manager.room_for_work(cells.model) {
                Ok(room) if need.saturating_add(held) > room => {
                    let (need_mib, room_mib) = (crate::memory::mib(need), crate::memory::mib(room));
                    let why = format!(
                        "this request's KV cache needs up to {need_mib} MiB and {room_mib} MiB are free; ask for fewer max_tokens"
                    );
                    Err(if held > 0 {
                        InferError::overloaded(format!("{why}, or retry when the {} running request(s) end", active.len()))
                    } else {
                        InferError::unavailable(why)
                    })
                }
                _ => Ok((seq, need, prep)),
            }
        });
        match admitted {
            Ok((seq, memory_bytes, prep)) => {
                let timings = crate::job::Timings {
                    queue_ms: job.enqueued.elapsed().as_secs_f64() * 1000.0,
                    pre_ms: job.pre_ms + prep.pre_ms,
                    ..Default::default()
                };
                active.push(Active { reply: job.reply, seq, memory_bytes, timings, error: None, suspect, _mark: mark })
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    };
    admit(first, &mut active, m);
    loop {
        // A suspect runs alone: none joins it, and it waits for the others to end.
        while active.len() < parallel && next.is_empty() && !active.iter().any(|a| a.suspect) {
            match queue.try_recv() {
                Ok(Work::Job(j)) if j.reply.is_closed() => {}
                Ok(Work::Job(j)) if j.suspect && !active.is_empty() => next.push_back(Work::Job(j)),
                Ok(Work::Job(j)) => admit(*j, &mut active, m),
                Ok(other) => next.push_back(other),
                Err(_) => break,
            }
        }
        if active.is_empty() {
            break;
        }
        set_busy(cells.busy, 0, Some(Instant::now()));
        // One step of every sequence whose client is still there, together.
        let mut live: Vec<&mut Active> =
            active.iter_mut().filter(|a| !a.reply.is_closed() && !a.seq.is_abandoned()).collect();
        let t = Instant::now();
        let stepped = {
            let mut seqs: Vec<&mut (dyn crate::pipeline::Sequence + 'static)> =
                live.iter_mut().map(|a| a.seq.as_mut()).collect();
            let n = seqs.len();
            catch_unwind(AssertUnwindSafe(|| m.step(&mut seqs))).unwrap_or_else(|panic| {
                let e = InferError::internal(format!("the engine panicked: {}", panic_text(&panic)));
                (0..n).map(|_| Err(e.clone())).collect()
            })
        };
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        for (a, r) in live.iter_mut().zip(stepped) {
            a.timings.infer_ms += ms;
            a.error = r.err();
        }
        set_busy(cells.busy, 0, None);
        cells.ctx.manager.touch(cells.model);
        let (ended, running): (Vec<Active>, Vec<Active>) = active
            .into_iter()
            .partition(|a| a.seq.is_done() || a.error.is_some() || a.reply.is_closed() || a.seq.is_abandoned());
        active = running;
        // A large cache (a long prompt) goes back to the system when its sequence ends, not only to the heap.
        let freed: u64 = ended.iter().map(|a| a.memory_bytes).sum();
        for a in ended {
            let answer = match a.error {
                Some(e) => Err(e),
                None if a.seq.is_done() => Ok(m.answer(a.timings, a.seq.finish())),
                None => continue, // abandoned: nobody to answer
            };
            let _ = a.reply.send(answer);
        }
        if freed >= TRIM_AFTER_BYTES {
            let _ = catch_unwind(AssertUnwindSafe(|| m.release()));
            crate::memory::trim_heap();
        }
    }
}

/// Memory of ended sequences from which the heap is trimmed (64 MiB).
const TRIM_AFTER_BYTES: u64 = 64 << 20;
