//! Roofline floors: the least time an op can take on a device, given the
//! bytes it must move and the flops it must do. Benches print these beside
//! measured times so the gap is visible wherever they run.

use std::time::{Duration, Instant};

use rayon::prelude::*;

/// A device's peak rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Display name.
    pub name: &'static str,
    /// Memory bandwidth, bytes per second.
    pub bytes_per_s: f64,
    /// Dense bf16 tensor throughput, flop per second (0 if not meaningful).
    pub bf16_flop_per_s: f64,
}

/// NVIDIA H100 SXM: 3.35 TB/s HBM3, about 990 dense bf16 TFLOP/s.
pub const H100_SXM: Peak = Peak {
    name: "H100 SXM",
    bytes_per_s: 3.35e12,
    bf16_flop_per_s: 990e12,
};

impl Peak {
    /// The floor for moving `bytes` and doing `flops`: the larger of the
    /// two times.
    pub fn floor(&self, bytes: f64, flops: f64) -> Duration {
        let t_mem = bytes / self.bytes_per_s;
        let t_math = if self.bf16_flop_per_s > 0.0 {
            flops / self.bf16_flop_per_s
        } else {
            0.0
        };
        Duration::from_secs_f64(t_mem.max(t_math))
    }
}

/// Measure this machine's memory copy bandwidth, counting bytes read plus
/// bytes written, with all rayon threads copying disjoint parts of a buffer
/// much larger than the caches. Returns the best of `reps` runs in bytes/s.
pub fn measure_copy_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 8;
    let src: Vec<u64> = (0..n as u64).collect();
    let mut dst = vec![0u64; n];
    let chunk = (n / rayon::current_num_threads().max(1) / 4).max(4096);
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed());
        std::hint::black_box(&dst);
    }
    (2 * n * 8) as f64 / best.as_secs_f64()
}

/// Measure this machine's f32 matrix-multiply rate (flop/s) with the `gemm`
/// crate on all threads: the best of `reps` products of two `n`×`n`
/// matrices. This is the practical compute ceiling of the CPU paths, which
/// multiply in f32 on the same crate (a vendor peak would overstate it).
pub fn measure_cpu_gemm_flops(n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.25).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.5).collect();
    let mut c = vec![0.0f32; n * n];
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        // SAFETY: a, b and c are n·n row-major f32 buffers (row stride n,
        // column stride 1); every index the product touches is below n·n,
        // and c is exclusively borrowed for the call.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        best = best.min(t.elapsed());
        std::hint::black_box(&c);
    }
    2.0 * (n as f64).powi(3) / best.as_secs_f64()
}

/// A duration as benches print it: µs below a millisecond, ms below a
/// second, s above (`"12.8 us"`, `"1.57 ms"`, `"4.90 s"`).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.1} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}
