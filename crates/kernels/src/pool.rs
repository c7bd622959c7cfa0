//! The thread pool whittle's kernels run on, built to keep its speed when it does not have the machine to
//! itself (issue 22: with a busy loop holding one of two cores, candle's barrier pool fell to 0.15× of its
//! quiet speed, because every parallel region waited, spinning, for a worker the OS had descheduled).
//!
//! One parallel region (`for_each`) hands out its items from a shared cursor in small chunks, so a fast
//! thread takes over a slow one's share. The caller works too, and a worker **joins** a region only while
//! it is open: once the caller has taken the last chunk it closes the region and waits only for the
//! workers that joined (and so hold a chunk); a worker the OS has not run yet is never waited for: it
//! finds the region closed when it wakes. Waiting spins briefly, then yields the core (so a descheduled
//! worker sharing it can finish its chunk), and idle workers park on a futex after a short spin.
//!
//! When other processes want the cores too, fewer threads finish sooner than all of them time-sliced
//! against each other. Every 10 ms the caller reads how long the workers waited, runnable, for a CPU
//! (`run_delay` in `/proc/<pid>/task/<tid>/schedstat`): when they waited more than a quarter of the time,
//! (a moving average over samples), regions run on the caller alone; after 100 ms the workers are tried
//! again, for one sample, and each failed trial doubles the wait (up to 1.6 s), so a machine that stays
//! busy costs a trial ~1% of the time. `WHITTLE_POOL_ADAPT=0` turns this off.
//!
//! The whole region state is one atomic word `generation << 32 | CLOSED | joined`, so joining (a CAS that
//! checks the generation and the closed bit) and closing cannot race.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::hint::spin_loop;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::int8::Parallel;

const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;
/// Idle spins of a worker before it parks (~20–50 µs: the gap between two ops of a forward pass).
const IDLE_SPINS: u32 = 1 << 14;
/// Spins of the caller waiting for joined workers before it starts yielding the core.
const WAIT_SPINS: u32 = 1 << 10;
/// Chunks per thread a region is cut into (more: better balance when a thread stalls; fewer: less cursor
/// traffic).
const GRABS_PER_THREAD: usize = 8;

fn noop(_: Range<usize>) {}
static NOOP: fn(Range<usize>) = noop;

thread_local! {
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// The work of the current region, written by the caller before it publishes a new generation.
struct Job {
    f: *const (dyn Fn(Range<usize>) + Sync),
    n_items: usize,
    chunk: usize,
}

/// Keeps a hot atomic on its own cache line.
#[repr(align(64))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shared {
    /// Read by idle workers in their spin; written once per region and per join.
    state: Line<AtomicU64>,
    /// Taken by every chunk grab.
    cursor: Line<AtomicUsize>,
    job: UnsafeCell<Job>,
    workers: OnceLock<Box<[Thread]>>,
    /// A worker's panic, re-raised on the caller (a chunk left undone must never pass silently).
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Each worker's schedstat file, as it found it when it started (index = worker − 1).
    stats: Mutex<Vec<Option<std::path::PathBuf>>>,
    /// Workers `1..allowed` may join the current region (the caller is thread 0).
    allowed: AtomicUsize,
}

/// The caller's view of how many threads the machine has room for (see the module doc).
struct Adapt {
    /// Whether to adapt at all (schedstat is readable and `WHITTLE_POOL_ADAPT` is not 0).
    on: bool,
    allowed: usize,
    last: Instant,
    /// Each worker's `run_delay` (ns) at `last`.
    delays: Vec<u64>,
    /// When to try the workers again after falling back to the caller alone.
    retry: Instant,
    /// Moving average of the fraction of time the workers waited (half weight per sample).
    wait: f64,
    /// The current wait before a retry: doubles while retries find the cores still busy.
    backoff: Duration,
    /// Whether the workers are back on trial (a retry that has not yet proved itself).
    trial: bool,
}

/// Sampling period of the adaptation.
const SAMPLE: Duration = Duration::from_millis(10);
/// How long regions stay on the caller alone before the workers are tried again.
const RETRY: Duration = Duration::from_millis(100);
/// Fraction of the time the workers may wait for a CPU before the pool stops using them.
const MAX_WAIT: f64 = 0.25;

/// Nanoseconds a thread has spent runnable but waiting for a CPU (2nd field of its schedstat).
fn run_delay(path: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

/// This thread's schedstat file, by its pid and tid (`/proc/thread-self` → `PID/task/TID`).
fn own_schedstat() -> Option<std::path::PathBuf> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    let path = std::path::Path::new("/proc").join(link).join("schedstat");
    run_delay(&path).map(|_| path)
}

// SAFETY: `job` is written only by the caller holding `Pool::call` while no worker is joined (the region
// state's generation changes after the write, with Release), and read by a worker only after it joined the
// new generation (Acquire); the caller keeps the closure alive until every joined worker has left.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A pool of `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    call: Mutex<Adapt>,
}

impl Pool {
    /// A pool that runs regions on `threads` threads (the caller and `threads - 1` workers).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Line(AtomicU64::new(0)),
            cursor: Line(AtomicUsize::new(0)),
            job: UnsafeCell::new(Job { f: &NOOP, n_items: 0, chunk: 1 }),
            workers: OnceLock::new(),
            panic: Mutex::new(None),
            stats: Mutex::new(vec![None; threads - 1]),
            allowed: AtomicUsize::new(threads),
        });
        let handles: Vec<Thread> = (1..threads)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("whittle-{i}"))
                    .spawn(move || worker(&s, i))
                    .expect("spawning a kernel worker thread")
                    .thread()
                    .clone()
            })
            .collect();
        let _ = shared.workers.set(handles.into_boxed_slice());
        // Wait (briefly) for the workers to publish their schedstat paths.
        let t0 = Instant::now();
        let stats = loop {
            let st = shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if st.iter().all(Option::is_some) || t0.elapsed() > Duration::from_millis(200) {
                break st;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let on = threads > 1
            && std::env::var("WHITTLE_POOL_ADAPT").map_or(true, |v| v != "0")
            && stats.iter().all(Option::is_some);
        let now = Instant::now();
        let adapt = Adapt {
            on,
            allowed: threads,
            last: now,
            delays: Vec::new(),
            retry: now,
            wait: 0.0,
            backoff: RETRY,
            trial: false,
        };
        Pool { shared, threads, call: Mutex::new(adapt) }
    }

    /// Threads a region runs on when the machine has room (the caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Threads the last region was allowed (fewer than [`Pool::threads`] while other processes hold cores).
    pub fn threads_in_use(&self) -> usize {
        self.shared.allowed.load(Ordering::Relaxed)
    }

    /// Runs `f` over `0..n_items` split into ranges, on the caller and the workers that join.
    pub fn run(&self, n_items: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        if n_items == 0 {
            return;
        }
        // One thread, a nested call from inside a region, or another thread's region running: run here.
        if self.threads == 1 || n_items == 1 || IN_POOL.with(|c| c.get()) {
            return f(0..n_items);
        }
        let Ok(mut adapt) = self.call.try_lock() else {
            return f(0..n_items);
        };
        let s = &*self.shared;
        let threads = self.threads_now(&mut adapt);
        s.allowed.store(threads, Ordering::Relaxed);
        if threads == 1 {
            return f(0..n_items);
        }
        let chunk = n_items.div_ceil(threads * GRABS_PER_THREAD).max(1);
        // No worker is joined here (the last region waited for them), so the job and cursor are ours.
        // SAFETY: see `Shared`; the pointer is only used while this call keeps `f` alive.
        unsafe {
            let f: *const (dyn Fn(Range<usize>) + Sync) = f;
            *s.job.get() = Job {
                f: std::mem::transmute::<*const (dyn Fn(Range<usize>) + Sync + '_), *const (dyn Fn(Range<usize>) + Sync)>(
                    f,
                ),
                n_items,
                chunk,
            };
        }
        s.cursor.store(0, Ordering::Relaxed);
        let gen = (s.state.load(Ordering::Relaxed) >> 32).wrapping_add(1) & 0xffff_ffff;
        s.state.store(gen << 32, Ordering::Release);
        for w in s.workers.get().into_iter().flatten().take(threads - 1) {
            w.unpark();
        }
        IN_POOL.with(|c| c.set(true));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_chunks(s, f, n_items, chunk)));
        IN_POOL.with(|c| c.set(false));
        // Close the region: from now on no worker joins it.
        let mut st = s.state.fetch_or(CLOSED, Ordering::AcqRel) | CLOSED;
        let mut spins = 0u32;
        while st & JOINED != 0 {
            if spins < WAIT_SPINS {
                spins += 1;
                spin_loop();
            } else {
                std::thread::yield_now();
            }
            st = s.state.load(Ordering::Acquire);
        }
        let worker_panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(p) = caught {
            std::panic::resume_unwind(p);
        }
        if let Some(p) = worker_panic {
            std::panic::resume_unwind(p);
        }
    }
}

impl Pool {
    /// Threads the next region may use: all of them, or the caller alone while the workers wait for CPUs
    /// (module doc).
    fn threads_now(&self, a: &mut Adapt) -> usize {
        if !a.on || a.last.elapsed() < SAMPLE {
            return a.allowed;
        }
        let now = Instant::now();
        let dt = now.duration_since(a.last).as_nanos() as f64;
        a.last = now;
        let stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let delays: Vec<u64> = stats.iter().map(|p| p.as_deref().and_then(run_delay).unwrap_or(0)).collect();
        drop(stats);
        if a.allowed > 1 && a.delays.len() == delays.len() {
            let waited: u64 = delays.iter().zip(&a.delays).map(|(d, b)| d.saturating_sub(*b)).sum();
            a.wait = 0.5 * a.wait + 0.5 * waited as f64 / (dt * (a.allowed - 1) as f64);
            if a.wait > MAX_WAIT {
                // A failed trial waits twice as long before the next (up to 1.6 s).
                a.backoff = if a.trial { (a.backoff * 2).min(RETRY * 16) } else { RETRY };
                a.allowed = 1;
                a.retry = now + a.backoff;
                a.trial = false;
            } else if a.trial && a.wait < MAX_WAIT / 4.0 {
                a.trial = false;
            }
        } else if a.allowed == 1 && now >= a.retry {
            // On trial the average starts at the threshold: one busy sample ends the trial.
            a.allowed = self.threads;
            a.wait = MAX_WAIT;
            a.trial = true;
        }
        a.delays = delays;
        a.allowed
    }
}

impl Parallel for Pool {
    fn for_each(&self, n_items: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        self.run(n_items, f)
    }
}

fn run_chunks(s: &Shared, f: &(dyn Fn(Range<usize>) + Sync), n_items: usize, chunk: usize) {
    loop {
        let start = s.cursor.fetch_add(chunk, Ordering::Relaxed);
        if start >= n_items {
            return;
        }
        f(start..n_items.min(start + chunk));
    }
}

fn worker(s: &Shared, index: usize) {
    IN_POOL.with(|c| c.set(true));
    s.stats.lock().unwrap_or_else(|e| e.into_inner())[index - 1] = own_schedstat();
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin a little, then park until the caller unparks us.
        let mut spins = 0u32;
        let st = loop {
            let st = s.state.load(Ordering::Acquire);
            if st >> 32 != seen {
                break st;
            }
            if spins < IDLE_SPINS {
                spins += 1;
                spin_loop();
            } else {
                std::thread::park();
            }
        };
        seen = st >> 32;
        // Join the region unless it is already closed (or a newer one started) or has no room for us.
        // `allowed` is stored before the generation this worker saw (Acquire above); a newer region's value
        // only costs it a region.
        if index >= s.allowed.load(Ordering::Relaxed) {
            continue;
        }
        let mut cur = st;
        let joined = loop {
            if cur >> 32 != seen || cur & CLOSED != 0 {
                break false;
            }
            match s.state.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break true,
                Err(now) => cur = now,
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: joined, so the caller keeps the job and its closure alive until we leave.
        let (f, n_items, chunk) = unsafe {
            let j = &*s.job.get();
            (&*j.f, j.n_items, j.chunk)
        };
        // A panicking kernel must not leave the caller waiting forever: the caller re-raises it.
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_chunks(s, f, n_items, chunk))) {
            s.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
        }
        s.state.fetch_sub(1, Ordering::AcqRel);
    }
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();

/// The process's kernel pool, sized on first use by `threads()` (the caller passes the engine's thread
/// count, e.g. `RAYON_NUM_THREADS`).
pub fn global(threads: impl FnOnce() -> usize) -> &'static Pool {
    GLOBAL.get_or_init(|| Pool::new(threads()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_item_runs_once() {
        for threads in [1, 2, 3, 5] {
            let pool = Pool::new(threads);
            for n in [0usize, 1, 2, 7, 64, 1000, 4097] {
                for _ in 0..20 {
                    let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                    pool.run(n, &|r| r.for_each(|i| _ = hits[i].fetch_add(1, Ordering::Relaxed)));
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads {threads} n {n}");
                }
            }
        }
    }

    #[test]
    fn nested_and_concurrent_regions_run_inline() {
        let pool = Arc::new(Pool::new(3));
        let total = AtomicUsize::new(0);
        pool.run(8, &|r| {
            for _ in r {
                pool.run(4, &|r2| _ = total.fetch_add(r2.len(), Ordering::Relaxed));
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 32);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let p = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..200 {
                        p.run(100, &|r| _ = sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed));
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 200 * 4950);
        }
    }

    #[test]
    fn busy_cores_make_regions_use_fewer_threads() {
        let pool = Pool::new(2);
        if !pool.call.lock().unwrap().on {
            eprintln!("skipped: this process may not use every online CPU, so the pool does not adapt");
            return;
        }
        // Keep every CPU busy with spinning threads of this process (they are not the pool's).
        let cpus = std::thread::available_parallelism().unwrap().get();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..cpus)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        spin_loop()
                    }
                })
            })
            .collect();
        let t0 = std::time::Instant::now();
        let n = AtomicUsize::new(0);
        while pool.threads_in_use() > 1 && t0.elapsed() < std::time::Duration::from_secs(5) {
            pool.run(64, &|r| _ = n.fetch_add(r.len(), Ordering::Relaxed));
        }
        stop.store(true, Ordering::Relaxed);
        spinners.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(pool.threads_in_use(), 1, "with every core busy the pool should fall back to the caller alone");
        assert_eq!(n.load(Ordering::Relaxed) % 64, 0);
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_keeps_working() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, &|r| {
                if r.contains(&0) {
                    panic!("boom")
                }
            })
        }));
        assert!(r.is_err(), "the panic (on whichever thread ran item 0) reaches the caller");
        let n = AtomicUsize::new(0);
        pool.run(64, &|r| _ = n.fetch_add(r.len(), Ordering::Relaxed));
        assert_eq!(n.load(Ordering::Relaxed), 64);
    }
}
