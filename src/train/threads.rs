//! How many intra-op threads the CPU training steps use, chosen by
//! measuring steps rather than assumed.
//!
//! libtorch splits each operation across its OpenMP threads and joins them
//! at a barrier. At small input sizes (64 px: MobileNetV2's feature maps are
//! 32² down to 2²) an operation is a few microseconds of work, and a profile
//! of full fine-tuning on the 2-core development machine (`perf record -e
//! cpu-clock -g` on `cargo bench --bench training -- 64`) put 70 % of the
//! process's samples in libgomp's barrier wait, against 15 % in the
//! convolution and element-wise kernels: the training thread finishes its
//! share and waits for a second thread the kernel has not scheduled yet,
//! which is most of the time on a machine other processes also load. One
//! thread then trains several times faster than two; at large sizes, or on
//! an idle machine, two are faster. The load changes while a run lasts, so
//! the trainer times steps at the configured count and at one, keeps the
//! faster, and checks the other again now and then.

use std::time::Duration;

/// Steps between two probes of the other thread count, at first and at
/// most (the interval doubles each time a probe confirms the choice).
const FIRST_INTERVAL: u32 = 8;
const MAX_INTERVAL: u32 = 64;
/// A probe switches only when the other count was this much faster.
const MARGIN: f64 = 0.9;

/// Picks the intra-op thread count of the calling (training) thread between
/// the configured one and one, from the time per image of recent steps.
pub(super) struct ThreadTuner {
    /// The candidate counts: the configured one, then 1.
    counts: [i32; 2],
    /// Index into `counts` of the count in use.
    chosen: usize,
    /// Recent seconds per image at each count (a moving average).
    per_image: [Option<f64>; 2],
    /// The step about to run is a probe of the other count.
    probing: bool,
    /// Steps to run at the chosen count before the next probe.
    until_probe: u32,
    interval: u32,
    /// The first step is not timed (one-off set-up of kernels and memory).
    warmed_up: bool,
}

impl ThreadTuner {
    /// A tuner over the calling thread's current count; `None` when there
    /// is nothing to choose (one thread, or a GPU doing the work).
    pub(super) fn new(device: tch::Device) -> Option<Self> {
        let configured = tch::get_num_threads();
        if device != tch::Device::Cpu || configured <= 1 {
            return None;
        }
        Some(Self::between(configured))
    }

    /// A tuner choosing between `configured` threads and one.
    fn between(configured: i32) -> Self {
        Self {
            counts: [configured, 1],
            chosen: 0,
            per_image: [None, None],
            probing: false,
            until_probe: 1,
            interval: FIRST_INTERVAL,
            warmed_up: false,
        }
    }

    /// The count the next step runs at (set on the calling thread).
    fn current(&self) -> usize {
        if self.probing {
            1 - self.chosen
        } else {
            self.chosen
        }
    }

    /// Sets the calling thread's count for the next step.
    pub(super) fn before_step(&self) {
        let n = self.counts[self.current()];
        if tch::get_num_threads() != n {
            tch::set_num_threads(n);
        }
    }

    /// Records how long the step just run took for `images` images, and
    /// decides the count of the next one.
    pub(super) fn after_step(&mut self, took: Duration, images: i64) {
        if !self.warmed_up {
            self.warmed_up = true;
            return;
        }
        let current = self.current();
        let sample = took.as_secs_f64() / images.max(1) as f64;
        self.per_image[current] = Some(match self.per_image[current] {
            // A probe's single step replaces the old figure; the chosen
            // count's steps are averaged.
            Some(old) if !self.probing => 0.75 * old + 0.25 * sample,
            _ => sample,
        });
        if self.probing {
            self.probing = false;
            let other = 1 - self.chosen;
            let faster = match (self.per_image[other], self.per_image[self.chosen]) {
                (Some(o), Some(c)) => o < MARGIN * c,
                _ => false,
            };
            if faster {
                self.chosen = other;
                self.interval = FIRST_INTERVAL;
                tracing::debug!(
                    threads = self.counts[other],
                    "training steps switch thread count"
                );
            } else {
                self.interval = (self.interval * 2).min(MAX_INTERVAL);
            }
            self.until_probe = self.interval;
            return;
        }
        self.until_probe = self.until_probe.saturating_sub(1);
        if self.until_probe == 0 {
            self.probing = true;
        }
    }

    /// The count the training steps use now.
    #[cfg(test)]
    fn threads(&self) -> i32 {
        self.counts[self.chosen]
    }
}

/// Restores the configured count when the run ends (validation between
/// epochs runs at the chosen count, under the same conditions as the steps).
impl Drop for ThreadTuner {
    fn drop(&mut self) {
        tch::set_num_threads(self.counts[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuner() -> ThreadTuner {
        ThreadTuner::between(2)
    }

    /// Runs steps whose time per image depends on the count in use.
    fn run(t: &mut ThreadTuner, steps: usize, ms_at: impl Fn(i32) -> u64) -> Vec<i32> {
        (0..steps)
            .map(|_| {
                let n = t.counts[t.current()];
                t.after_step(Duration::from_millis(ms_at(n)), 1);
                n
            })
            .collect()
    }

    #[test]
    fn keeps_the_faster_count_and_probes_the_other_ever_more_rarely() {
        let mut t = tuner();
        let used = run(&mut t, 200, |n| if n == 1 { 10 } else { 40 });
        assert_eq!(t.threads(), 1);
        let at_two = used.iter().filter(|&&n| n == 2).count();
        assert!(at_two <= 8, "{at_two} of 200 steps at the slower count");
        // The machine calms down: two threads become faster, and win back.
        let used = run(&mut t, 200, |n| if n == 1 { 10 } else { 4 });
        assert_eq!(t.threads(), 2);
        let at_one = used[100..].iter().filter(|&&n| n == 1).count();
        assert!(
            at_one <= 4,
            "{at_one} of the last 100 steps at the slower count"
        );
    }

    #[test]
    fn a_small_difference_does_not_switch() {
        let mut t = tuner();
        run(&mut t, 100, |n| if n == 1 { 19 } else { 20 });
        assert_eq!(t.threads(), 2);
    }
}
