//! Where the benches' threads run and what CPU they use: two tokio runtimes, the server's
//! (`gw-server`) and the load generator's (`gw-load`), pinned to different CPUs when there are
//! two or more, and their CPU time read from `/proc/self/task` by thread name.

use std::path::Path;
use std::time::Duration;

use tokio::runtime::Runtime;

/// Thread names of the two runtimes (at most 15 bytes: Linux truncates `comm`).
pub const SERVER_THREADS: &str = "gw-server";
pub const LOAD_THREADS: &str = "gw-load";

/// The server and load-generator runtimes: with `pin` (and two CPUs or more) one worker each,
/// on CPU 0 and CPU 1; otherwise every CPU's worth of workers each, unpinned.
pub struct Runtimes {
    pub server: Runtime,
    pub load: Runtime,
    /// Workers of the server runtime.
    pub workers: usize,
    /// Whether they are pinned.
    pub pinned: bool,
}

impl Runtimes {
    pub fn new(pin: bool) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let pinned = pin && cpus >= 2;
        if pin && !pinned {
            eprintln!("pinning needs two CPUs; running unpinned");
        }
        if pinned {
            Self {
                server: runtime(SERVER_THREADS, 1, Some(0)),
                load: runtime(LOAD_THREADS, 1, Some(1)),
                workers: 1,
                pinned,
            }
        } else {
            Self {
                server: runtime(SERVER_THREADS, cpus, None),
                load: runtime(LOAD_THREADS, cpus, None),
                workers: cpus,
                pinned,
            }
        }
    }

    /// One line for the header of a report.
    pub fn describe(&self) -> String {
        if self.pinned {
            "pinned per thread: server runtime on CPU 0, load generator on CPU 1, one worker each \
             (--no-pin to share every CPU)"
                .to_owned()
        } else {
            format!(
                "not pinned: each runtime has {} workers on every CPU",
                self.workers
            )
        }
    }
}

/// A multi-threaded runtime whose threads are named `name`, on `cpu` if given.
pub fn runtime(name: &'static str, workers: usize, cpu: Option<usize>) -> Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(workers)
        .thread_name(name)
        // Blocking threads that exit take their CPU time out of /proc/self/task.
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all();
    if let Some(cpu) = cpu {
        builder.on_thread_start(move || pin_current_thread(cpu));
    }
    builder.build().expect("a tokio runtime")
}

/// Pins the calling thread to `cpu` (taskset pins whole processes; the server and the load
/// generator share this one).
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE, and
    // sched_setaffinity(0, ..) only changes the calling thread.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if !pinned {
        eprintln!("could not pin a thread to CPU {cpu}");
    }
}

/// Cores busy over an interval (1.0 = one core): the server's threads, the load generator's, and
/// everything else on the machine (other processes compete for the same cores).
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub server: f64,
    pub load: f64,
    pub others: f64,
}

/// CPU seconds used so far, split as [`Cpu`].
#[derive(Clone, Copy)]
pub struct CpuTimes(Cpu);

impl CpuTimes {
    pub fn now() -> Self {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let read = |path: &Path| std::fs::read_to_string(path).ok();
        let (mut server, mut load) = (0.0, 0.0);
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let path = task.path();
                // `None` when the thread ended meanwhile.
                let (Some(comm), Some(seconds)) = (
                    read(&path.join("comm")),
                    read(&path.join("stat")).and_then(|stat| stat_seconds(&stat, ticks)),
                ) else {
                    continue;
                };
                match comm.trim() {
                    SERVER_THREADS => server += seconds,
                    LOAD_THREADS => load += seconds,
                    _ => {}
                }
            }
        }
        let process = read(Path::new("/proc/self/stat"))
            .and_then(|stat| stat_seconds(&stat, ticks))
            .unwrap_or(f64::NAN);
        // The first line of /proc/stat: cpu user nice system idle iowait irq softirq steal ...
        let machine = read(Path::new("/proc/stat"))
            .and_then(|stat| {
                let fields: Vec<f64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .take(8)
                    .filter_map(|field| field.parse().ok())
                    .collect();
                let idle = fields.get(3)? + fields.get(4)?;
                Some((fields.iter().sum::<f64>() - idle) / ticks)
            })
            .unwrap_or(f64::NAN);
        Self(Cpu {
            server,
            load,
            others: machine - process,
        })
    }

    /// Cores busy per second of `elapsed` since `earlier`.
    pub fn busy_since(self, earlier: Self, elapsed: f64) -> Cpu {
        Cpu {
            server: (self.0.server - earlier.0.server) / elapsed,
            load: (self.0.load - earlier.0.load) / elapsed,
            others: ((self.0.others - earlier.0.others) / elapsed).max(0.0),
        }
    }
}

/// utime + stime from a `/proc/.../stat` line, in seconds.
fn stat_seconds(stat: &str, ticks: f64) -> Option<f64> {
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / ticks)
}
