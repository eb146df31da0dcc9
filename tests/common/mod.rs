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

/// A `[dims]` f32 tensor on the CPU of normal draws (mean 0, standard
/// deviation `std`) from the seeded RNG `seed`.
///
/// candle's own `Tensor::randn` draws from an unseeded generator, so a test
/// built on it checks a different point on every run (clippy.toml refuses
/// it); this is the reproducible replacement.
pub fn randn_tensor(seed: u64, std: f32, dims: &[usize]) -> candle_core::Tensor {
    use rand_distr::{Distribution, Normal};
    let normal = Normal::new(0.0f32, std).expect("a finite, non-negative standard deviation");
    let mut r = rng(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut r)).collect();
    candle_core::Tensor::from_vec(v, dims, &candle_core::Device::Cpu).expect("shape matches")
}

/// Give every LoRA `B` factor of `model` seeded normal values (standard
/// deviation `std`), so that `A` gets a gradient and adapters change the
/// hidden states. Factor `k` draws from seed `seed + k`.
pub fn randomize_lora_b(model: &tli_kernels::model::Llama, seed: u64, std: f32) {
    // trainable_vars lists each module's A, then its B.
    for (k, v) in tli_kernels::model::lora::trainable_vars(model)
        .iter()
        .enumerate()
    {
        if k % 2 == 1 {
            v.set(&randn_tensor(seed + k as u64, std, v.as_tensor().dims()))
                .expect("same shape and dtype");
        }
    }
}

/// The proptest configuration of this suite: `cases` cases from a fixed
/// seed, so every run checks the same inputs (a failure is reproducible, and
/// CI cannot fail at random). `PROPTEST_CASES` and `PROPTEST_RNG_SEED` still
/// override both, to run longer or elsewhere by hand:
/// `PROPTEST_CASES=100000 PROPTEST_RNG_SEED=7 cargo test --test pairs`.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngSeed};
    let from_env = Config::default();
    Config {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            from_env.cases
        } else {
            cases
        },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            from_env.rng_seed
        } else {
            RngSeed::Fixed(0x7e57_5eed)
        },
        ..from_env
    }
}

/// The SmolLM2-135M-Instruct GGUF named by `TLI_SMOLLM2_GGUF`
/// (`export TLI_SMOLLM2_GGUF="$(scripts/fetch-smollm2)"`; `.ci/run` does
/// this) or, when that is unset, found in scripts/fetch-smollm2's default
/// cache; else `None` after printing `<test>: skipped: <reason>`. A variable that names no file is a broken
/// setup, not a reason to skip: that panics, so CI cannot skip silently.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("TLI_SMOLLM2_GGUF") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        // Where scripts/fetch-smollm2 caches it by default.
        _ if default_smollm2().is_some_and(|p| p.is_file()) => default_smollm2()?,
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "{test}: skipped: TLI_SMOLLM2_GGUF is not set and the model is not in \
                 the default cache (scripts/fetch-smollm2 fetches it)"
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

/// The file scripts/fetch-smollm2 writes when `TLI_SMOLLM2_DIR` is unset.
fn default_smollm2() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("tli-kernels/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}
