//! Helpers shared by the integration tests: seeded inputs, the devices to
//! test on, and bit-level comparison.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tli_kernels::{Device, Element};

/// A reproducible RNG for test `seed`.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// The devices every test runs on here: `cpu`, and `sim` when compiled in.
/// (`cuda` has its own tests that skip with a reason when no GPU exists.)
pub fn host_devices() -> Vec<Device> {
    let mut v = vec![Device::Cpu];
    if cfg!(feature = "sim") {
        v.push(Device::Sim);
    }
    v
}

/// Equal bits, or both NaN. NaN payloads legitimately differ between the
/// device's conversions (canonical NaN) and the `half` crate (payload kept),
/// so a NaN is only required to stay a NaN.
pub fn same_bits<T: Element>(a: T, b: T) -> bool {
    (a.to_f32().is_nan() && b.to_f32().is_nan()) || a.to_bits_u32() == b.to_bits_u32()
}

/// Assert two outputs are identical element for element, reporting the first
/// few differences with their index.
pub fn assert_bits_eq<T: Element>(label: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| !same_bits(got[i], want[i]))
        .collect();
    if !bad.is_empty() {
        let show: Vec<String> = bad
            .iter()
            .take(5)
            .map(|&i| {
                format!(
                    "[{i}] got {:?} ({:#x}) want {:?} ({:#x})",
                    got[i],
                    got[i].to_bits_u32(),
                    want[i],
                    want[i].to_bits_u32()
                )
            })
            .collect();
        panic!(
            "{label}: {} of {} elements differ: {}",
            bad.len(),
            got.len(),
            show.join("; ")
        );
    }
}

/// A float spanning many magnitudes: sign × 2^[-30, 30) × [1, 2).
pub fn wide_f32(rng: &mut impl Rng) -> f32 {
    let m: f32 = rng.random_range(1.0..2.0);
    let e: i32 = rng.random_range(-30..30);
    let s = if rng.random::<bool>() { -1.0 } else { 1.0 };
    s * m * 2f32.powi(e)
}

/// A poison value for output buffers: a NaN with a payload no kernel
/// produces, so an element the kernel never wrote is caught.
pub fn poison<T: Element>() -> T {
    // 0x7fa5_a5a5 as f32 is a NaN; its bf16/f16 conversions are NaNs too.
    T::from_f32(f32::from_bits(0x7fa5_a5a5))
}

/// The SmolLM2-135M-Instruct GGUF named by `TLI_SMOLLM2_GGUF`
/// (`export TLI_SMOLLM2_GGUF="$(scripts/fetch-smollm2)"`; `.ci/run` does
/// this), or `None` after printing `<test>: skipped: <reason>` when the
/// variable is unset or empty. A variable that names no file is a broken
/// setup, not a reason to skip: that panics, so CI cannot skip silently.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("TLI_SMOLLM2_GGUF") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "{test}: skipped: TLI_SMOLLM2_GGUF is not set \
                 (export TLI_SMOLLM2_GGUF=\"$(scripts/fetch-smollm2)\" to run it)"
            );
            return None;
        }
    };
    assert!(
        path.is_file(),
        "{test}: TLI_SMOLLM2_GGUF={} is not a file; rerun scripts/fetch-smollm2 \
         or unset the variable to skip",
        path.display()
    );
    Some(path)
}
