//! The simulator itself (`kernels/sim`), through its self-test kernels
//! (`kernels/sim/selftest.cuh`).
//!
//! Every expectation is computed here, independently of the simulator: sums
//! and votes in Rust, shuffle sources from the CUDA Programming Guide's
//! description of each shuffle, conversion results written out bit by bit or
//! taken from the `half` crate. The broken kernels must fail, quickly, with a
//! message that says what went wrong.
#![cfg(feature = "sim")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::rng;
use half::{bf16, f16};
use rand::Rng;
use tli_kernels::Error;
use tli_kernels::backend::sim::TliSimLaunch;
use tli_kernels::backend::sim::selftest::{self, AtomicCounters, Misbehaviour};

/// The simulator's "undefined value": all bits set.
const POISON: u32 = 0xffff_ffff;

fn sim_message(r: tli_kernels::Result<()>) -> (String, String) {
    match r {
        Err(Error::Sim { kernel, message }) => (kernel, message),
        Err(e) => panic!("expected a simulator error, got another error: {e}"),
        Ok(()) => panic!("expected a simulator error, the launch succeeded"),
    }
}

#[test]
fn every_thread_sees_its_own_coordinates_in_a_3d_grid() {
    for (grid, block) in [
        ([3, 2, 2], [8, 4, 2]),
        ([5, 1, 1], [48, 1, 1]),
        ([1, 1, 1], [1, 1, 1]),
    ] {
        let cfg = TliSimLaunch {
            grid,
            block,
            dynamic_smem: 0,
            timeout_ms: 0,
        };
        let per_block = (block[0] * block[1] * block[2]) as usize;
        let blocks = (grid[0] * grid[1] * grid[2]) as usize;
        let mut out = vec![POISON; per_block * blocks * 10];
        selftest::index(&cfg, &mut out).unwrap();
        for b in 0..blocks {
            for t in 0..per_block {
                let g = b * per_block + t;
                let (t, b) = (t as u32, b as u32);
                let want = [
                    t % block[0],
                    (t / block[0]) % block[1],
                    t / (block[0] * block[1]),
                    b % grid[0],
                    (b / grid[0]) % grid[1],
                    b / (grid[0] * grid[1]),
                    per_block as u32,
                    blocks as u32,
                    t % 32,
                    32,
                ];
                assert_eq!(
                    &out[g * 10..g * 10 + 10],
                    &want,
                    "grid {grid:?} block {block:?} thread {g}"
                );
            }
        }
    }
}

#[test]
fn block_reduction_through_shared_memory_and_barrier_votes() {
    let mut r = rng(11);
    for threads in [1u32, 7, 32, 33, 250, 256, 1000, 1024] {
        let blocks = 3u32;
        let len = (blocks * threads) as usize - (threads as usize).min(5);
        let input: Vec<i32> = (0..len)
            .map(|_| {
                if r.random_range(0..4) == 0 {
                    0
                } else {
                    r.random_range(-1000..=1000)
                }
            })
            .collect();
        let mut sums = vec![i64::MIN; blocks as usize];
        let mut votes = vec![-1; 3 * blocks as usize];
        selftest::block_sum(
            &TliSimLaunch::linear(blocks, threads),
            &input,
            &mut sums,
            &mut votes,
        )
        .unwrap();
        for b in 0..blocks as usize {
            let lo = b * threads as usize;
            let hi = lo + threads as usize;
            let slice: Vec<i32> = (lo..hi)
                .map(|i| input.get(i).copied().unwrap_or(0))
                .collect();
            let sum: i64 = slice.iter().map(|&v| i64::from(v)).sum();
            let nonzero = slice.iter().filter(|&&v| v != 0).count() as i32;
            assert_eq!(sums[b], sum, "{threads} threads, block {b}: sum");
            assert_eq!(
                votes[3 * b],
                nonzero,
                "{threads} threads, block {b}: __syncthreads_count"
            );
            assert_eq!(
                votes[3 * b + 1],
                i32::from(nonzero == threads as i32),
                "block {b}: __syncthreads_and"
            );
            assert_eq!(
                votes[3 * b + 2],
                i32::from(nonzero > 0),
                "block {b}: __syncthreads_or"
            );
        }
    }
}

/// Which lane a shuffle reads, per the CUDA Programming Guide ("Warp Shuffle
/// Functions"), or `None` for "the caller's own value". Lanes are split into
/// groups of `width`.
fn shfl_idx_source(lane: u32, src: i32, width: u32) -> u32 {
    // "If srcLane is outside the range [0:width-1], the value returned
    // corresponds to the value of var held by the srcLane modulo width
    // (i.e. within the same subsection)."
    (lane / width) * width + src.rem_euclid(width as i32) as u32
}
fn shfl_up_source(lane: u32, delta: u32, width: u32) -> Option<u32> {
    // "The source lane index will not wrap around the value of width, so
    // effectively the lower delta lanes will be unchanged."
    (lane % width >= delta).then(|| lane - delta)
}
fn shfl_down_source(lane: u32, delta: u32, width: u32) -> Option<u32> {
    // "...the upper delta lanes will remain unchanged."
    (lane % width + delta < width).then(|| lane + delta)
}
fn shfl_xor_source(lane: u32, lane_mask: u32, width: u32) -> Option<u32> {
    // "...each group of width consecutive threads are able to access elements
    // from earlier groups of threads, however if they attempt to access
    // elements from later groups of threads their own value of var will be
    // returned."
    let src = lane ^ lane_mask;
    (src / width <= lane / width).then_some(src)
}

#[test]
fn shuffles_read_the_documented_lanes() {
    // Full warps, a partial last warp (48 = 32 + 16 lanes), and 103 threads.
    for threads in [64u32, 48, 103] {
        let blocks = 2u32;
        let total = (blocks * threads) as usize;
        let input: Vec<u32> = (0..total as u32).map(|g| g * 3 + 1).collect();
        for width in [32u32, 16, 8, 4, 2, 1] {
            for (src_lane, delta, lane_mask) in
                [(0, 0, 1), (5, 1, 2), (31, 3, 7), (37, 16, 16), (-1, 31, 31)]
            {
                let mut out = vec![0u32; total * 6];
                selftest::shuffle(
                    &TliSimLaunch::linear(blocks, threads),
                    &input,
                    &mut out,
                    src_lane,
                    delta,
                    lane_mask,
                    width as i32,
                )
                .unwrap();
                for b in 0..blocks {
                    for t in 0..threads {
                        let g = (b * threads + t) as usize;
                        let (warp, lane) = (t / 32, t % 32);
                        let lanes_here = (threads - warp * 32).min(32);
                        // A source lane beyond blockDim does not exist: the
                        // device returns an undefined value, the simulator
                        // poison.
                        let read = |src: u32| {
                            if src < lanes_here {
                                input[(b * threads + warp * 32 + src) as usize]
                            } else {
                                POISON
                            }
                        };
                        let own = input[g];
                        let per_lane_src = ((lane * 7).wrapping_add(src_lane as u32) & 31) as i32;
                        let want = [
                            read(shfl_idx_source(lane, src_lane, width)),
                            shfl_up_source(lane, delta as u32, width).map_or(own, read),
                            shfl_down_source(lane, delta as u32, width).map_or(own, read),
                            shfl_xor_source(lane, lane_mask as u32, width).map_or(own, read),
                            read(shfl_idx_source(lane, per_lane_src, width)),
                            if lanes_here == 32 {
                                u32::MAX
                            } else {
                                (1u32 << lanes_here) - 1
                            },
                        ];
                        assert_eq!(
                            &out[g * 6..g * 6 + 6],
                            &want,
                            "{threads} threads, width {width}, src {src_lane} delta {delta} mask {lane_mask}, thread {g}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn shuffles_of_64_bit_and_float_values() {
    let total = 128usize;
    let mut r = rng(12);
    let in64: Vec<u64> = (0..total).map(|_| r.random()).collect();
    let inf: Vec<f32> = (0..total).map(|_| r.random_range(-1e30f32..1e30)).collect();
    let mut out64 = vec![0u64; total];
    let mut outf = vec![0f32; total];
    selftest::shuffle_wide(
        &TliSimLaunch::linear(2, 64),
        &in64,
        &mut out64,
        &inf,
        &mut outf,
    )
    .unwrap();
    for g in 0..total {
        assert_eq!(out64[g], in64[g ^ 1], "u64 xor 1, thread {g}");
        let want = if g % 32 == 31 { inf[g] } else { inf[g + 1] };
        assert_eq!(outf[g].to_bits(), want.to_bits(), "f32 down 1, thread {g}");
    }
}

#[test]
fn votes_and_warp_reductions_over_existing_lanes() {
    let mut r = rng(13);
    for threads in [32u32, 64, 50, 97] {
        let blocks = 3u32;
        let total = (blocks * threads) as usize;
        let mut input: Vec<i32> = (0..total)
            .map(|_| {
                if r.random_range(0..3) == 0 {
                    0
                } else {
                    r.random_range(-100_000..100_000)
                }
            })
            .collect();
        // One warp all non-zero, one all zero, so all() and any() both flip.
        input[..32.min(total)]
            .iter_mut()
            .for_each(|v| *v = 1 + v.abs());
        if threads >= 64 {
            input[32..64].iter_mut().for_each(|v| *v = 0);
        }
        let mut out = vec![0u32; total * 7];
        selftest::vote(&TliSimLaunch::linear(blocks, threads), &input, &mut out).unwrap();
        for b in 0..blocks {
            for t in 0..threads {
                let g = (b * threads + t) as usize;
                let warp = t / 32;
                let first = (b * threads + warp * 32) as usize;
                let lanes = (threads - warp * 32).min(32) as usize;
                let vals = &input[first..first + lanes];
                let ballot = vals
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (k, &v)| acc | (u32::from(v != 0) << k));
                let want = [
                    ballot,
                    u32::from(vals.iter().any(|&v| v != 0)),
                    u32::from(vals.iter().all(|&v| v != 0)),
                    vals.iter().fold(0u32, |a, &v| a.wrapping_add(v as u32)),
                    *vals.iter().min().unwrap() as u32,
                    *vals.iter().max().unwrap() as u32,
                    vals.iter().fold(0u32, |a, &v| a ^ v as u32),
                ];
                assert_eq!(
                    &out[g * 7..g * 7 + 7],
                    &want,
                    "{threads} threads, thread {g}"
                );
            }
        }
    }
}

#[test]
fn syncwarp_orders_shared_memory_within_warps_and_half_warps() {
    let total = 4 * 96;
    let input: Vec<i32> = (0..total as i32).map(|g| g * 7 - 300).collect();
    let mut out = vec![0i32; total * 2];
    selftest::syncwarp(&TliSimLaunch::linear(4, 96), &input, &mut out).unwrap();
    for g in 0..total {
        assert_eq!(
            out[2 * g],
            input[g ^ 1],
            "lane ^ 1 after __syncwarp(), thread {g}"
        );
        assert_eq!(
            out[2 * g + 1],
            input[g ^ 2] + 1000,
            "lane ^ 2 after half-warp __syncwarp, thread {g}"
        );
    }
    assert!(selftest::syncwarp(&TliSimLaunch::linear(1, 48), &input, &mut out).is_err());
}

#[test]
fn atomics_from_many_threads_are_exact() {
    let mut r = rng(14);
    let n = 1700usize;
    let vals: Vec<i32> = (0..n)
        .map(|_| r.random_range(-1_000_000..1_000_000))
        .collect();
    let init = AtomicCounters {
        ints: [0, i32::MIN, i32::MAX, 0, -1],
        uints: [0, 0, u32::MAX, 0, u32::MAX, 0],
        u64s: [0],
        f: [0.0],
    };
    let mut c = init;
    let mut exch_prev = vec![i32::MIN; n];
    // 7 blocks of 256 threads: 92 threads of the last block have no value.
    selftest::atomics(&TliSimLaunch::linear(7, 256), &vals, &mut c, &mut exch_prev).unwrap();

    let sum_i = vals.iter().fold(0i32, |a, &v| a.wrapping_add(v));
    assert_eq!(c.ints[0], sum_i, "atomicAdd(int)");
    assert_eq!(c.ints[1], *vals.iter().max().unwrap(), "atomicMax(int)");
    assert_eq!(c.ints[2], *vals.iter().min().unwrap(), "atomicMin(int)");
    assert_eq!(c.ints[3], n as i32, "atomicCAS increment loop");
    // Every exchange returned the value the previous one stored: the values
    // returned plus the final value are the initial value plus every gid,
    // each exactly once.
    let mut seen: Vec<i32> = exch_prev.clone();
    seen.push(c.ints[4]);
    seen.sort_unstable();
    let mut want: Vec<i32> = (0..n as i32).collect();
    want.push(init.ints[4]);
    want.sort_unstable();
    assert_eq!(seen, want, "atomicExch");

    let us: Vec<u32> = vals.iter().map(|&v| v as u32).collect();
    assert_eq!(
        c.uints[0],
        us.iter().fold(0u32, |a, &v| a.wrapping_add(v)),
        "atomicAdd(unsigned)"
    );
    assert_eq!(c.uints[1], *us.iter().max().unwrap(), "atomicMax(unsigned)");
    assert_eq!(c.uints[2], *us.iter().min().unwrap(), "atomicMin(unsigned)");
    assert_eq!(c.uints[3], u32::MAX, "atomicOr of every 1 << (gid % 32)");
    assert_eq!(
        c.uints[4],
        !((1u32 << 29) - 1),
        "atomicAnd clearing bits gid % 29"
    );
    assert_eq!(c.uints[5], us.iter().fold(0, |a, &v| a ^ v), "atomicXor");
    let sum64: u64 = vals
        .iter()
        .map(|&v| u64::from((v & 0xffff) as u32) << 24)
        .sum();
    assert_eq!(c.u64s[0], sum64, "atomicAdd(unsigned long long)");
    let sumf: i64 = vals.iter().map(|&v| i64::from(v % 1000)).sum();
    assert_eq!(c.f[0], sumf as f32, "atomicAdd(float) of whole numbers");
}

#[test]
fn float_atomic_add_flushes_subnormals_on_global_memory_only() {
    let cfg = TliSimLaunch::linear(1, 32).with_dynamic_smem(16);
    let tiny = 1.0e-40f32;
    assert!(tiny.is_subnormal());
    let mut global = 0.0f32;
    let mut out = [f32::NAN; 2];
    selftest::atomic_subnormal(&cfg, tiny, &mut global, &mut out).unwrap();
    assert_eq!(
        global.to_bits(),
        0,
        "global atomicAdd flushes a subnormal addend to +0"
    );
    assert_eq!(
        out[0].to_bits(),
        tiny.to_bits(),
        "shared atomicAdd keeps the subnormal"
    );
    assert_eq!(out[1].to_bits(), tiny.to_bits());

    // A normal addend is added on both.
    let small = 1.0e-30f32;
    let mut global = 0.0f32;
    selftest::atomic_subnormal(&cfg, small, &mut global, &mut out).unwrap();
    assert_eq!(global, small);
    assert_eq!(out[0], small);
}

#[test]
fn dynamic_shared_memory_is_aligned_and_poisoned_for_every_block() {
    let (blocks, threads, words) = (3u32, 100u32, 128usize);
    let cfg = TliSimLaunch::linear(blocks, threads).with_dynamic_smem(4 * words);
    let total = (blocks * threads) as usize;
    let input: Vec<u32> = (0..total as u32).map(|g| g ^ 0x5a5a).collect();
    let mut out = vec![0u32; total];
    let mut raw = vec![0u32; blocks as usize * words];
    let mut align = vec![POISON; blocks as usize];
    selftest::dynamic_smem(&cfg, &input, &mut out, &mut raw, &mut align, words).unwrap();
    // Blocks 1 and 2 run after block 0 wrote its first 100 words: they must
    // still find poison, not block 0's data.
    assert!(
        raw.iter().all(|&w| w == POISON),
        "uninitialised shared memory is not poison: {raw:?}"
    );
    assert!(
        align.iter().all(|&a| a == 0),
        "dynamic shared memory not 16-byte aligned: {align:?}"
    );
    for b in 0..blocks as usize {
        for t in 0..threads as usize {
            let base = b * threads as usize;
            assert_eq!(
                out[base + t],
                input[base + threads as usize - 1 - t],
                "block {b} thread {t}"
            );
        }
    }
    // Too little dynamic shared memory for the test is refused before launch.
    let small = TliSimLaunch::linear(blocks, threads).with_dynamic_smem(4 * words - 4);
    assert!(selftest::dynamic_smem(&small, &input, &mut out, &mut raw, &mut align, words).is_err());
}

/// Device results for edge cases, written out by hand:
/// (f32 bits, __float2bfloat16_rn bits, __float2half_rn bits).
const TO_16: &[(u32, u16, u16, &str)] = &[
    (0x0000_0000, 0x0000, 0x0000, "+0"),
    (0x8000_0000, 0x8000, 0x8000, "-0"),
    (0x3f80_0000, 0x3f80, 0x3c00, "1"),
    (0xbf80_0000, 0xbf80, 0xbc00, "-1"),
    (
        0x3f80_8000,
        0x3f80,
        0x3c04,
        "1 + 2^-8: bf16 tie, kept part even -> down",
    ),
    (
        0x3f81_8000,
        0x3f82,
        0x3c0c,
        "1 + 3*2^-8: bf16 tie, kept part odd -> up",
    ),
    (0x3f80_8001, 0x3f81, 0x3c04, "just above the bf16 tie -> up"),
    (
        0x3f80_1000,
        0x3f80,
        0x3c00,
        "1 + 2^-11: f16 tie, even -> down",
    ),
    (
        0x3f80_3000,
        0x3f80,
        0x3c02,
        "1 + 3*2^-11: f16 tie, odd -> up",
    ),
    (0x3f80_1001, 0x3f80, 0x3c01, "just above the f16 tie -> up"),
    (0x477f_e000, 0x4780, 0x7bff, "65504, the largest f16"),
    (0x477f_efff, 0x4780, 0x7bff, "just below 65520 -> 65504"),
    (
        0x477f_f000,
        0x4780,
        0x7c00,
        "65520: f16 tie with 2^16 -> inf",
    ),
    (0xc77f_f000, 0xc780, 0xfc00, "-65520 -> -inf"),
    (0x4e6e_6b28, 0x4e6e, 0x7c00, "1e9: f16 overflow"),
    (
        0x7f7f_ffff,
        0x7f80,
        0x7c00,
        "largest f32 -> bf16 rounds up to inf",
    ),
    (
        0x7f7f_7fff,
        0x7f7f,
        0x7c00,
        "just below the bf16 overflow tie",
    ),
    (0x7f80_0000, 0x7f80, 0x7c00, "+inf"),
    (0xff80_0000, 0xff80, 0xfc00, "-inf"),
    (0x3880_0000, 0x3880, 0x0400, "2^-14, smallest normal f16"),
    (0x3380_0000, 0x3380, 0x0001, "2^-24, smallest subnormal f16"),
    (
        0x3300_0000,
        0x3300,
        0x0000,
        "2^-25: f16 tie between 0 and 2^-24 -> 0",
    ),
    (0x3300_0001, 0x3300, 0x0001, "just above 2^-25 -> 2^-24"),
    (
        0x33c0_0000,
        0x33c0,
        0x0002,
        "1.5 * 2^-24: f16 tie, odd -> up",
    ),
    (
        0x3420_0000,
        0x3420,
        0x0002,
        "2.5 * 2^-24: f16 tie, even -> down",
    ),
    (
        0x387f_e000,
        0x3880,
        0x0400,
        "1023.5 * 2^-24: tie -> smallest normal",
    ),
    (
        0x387f_c000,
        0x3880,
        0x03ff,
        "1023 * 2^-24, largest subnormal f16",
    ),
    (0xb380_0000, 0xb380, 0x8001, "-2^-24"),
    (0x0000_0001, 0x0000, 0x0000, "smallest f32 subnormal"),
    (0x0000_8000, 0x0000, 0x0000, "f32 subnormal: bf16 tie -> 0"),
    (
        0x0001_8000,
        0x0002,
        0x0000,
        "f32 subnormal: bf16 tie, odd -> up",
    ),
    (
        0x007f_ffff,
        0x0080,
        0x0000,
        "largest f32 subnormal -> smallest normal bf16",
    ),
    (0x7fc0_0000, 0x7fff, 0x7fff, "quiet NaN -> canonical"),
    (
        0xffc0_0001,
        0x7fff,
        0x7fff,
        "negative NaN with payload -> canonical",
    ),
    (0x7f80_0001, 0x7fff, 0x7fff, "signalling NaN -> canonical"),
    (0x7fff_ffff, 0x7fff, 0x7fff, "all-ones NaN"),
];

/// (16-bit pattern, __bfloat162float bits, __half2float bits).
const FROM_16: &[(u16, u32, u32, &str)] = &[
    (0x0000, 0x0000_0000, 0x0000_0000, "+0"),
    (0x8000, 0x8000_0000, 0x8000_0000, "-0"),
    (0x3c00, 0x3c00_0000, 0x3f80_0000, "f16 1.0"),
    (0x3f80, 0x3f80_0000, 0x3ff0_0000, "bf16 1.0"),
    (0x0001, 0x0001_0000, 0x3380_0000, "smallest subnormals"),
    (0x03ff, 0x03ff_0000, 0x387f_c000, "largest f16 subnormal"),
    (0x0400, 0x0400_0000, 0x3880_0000, "smallest f16 normal"),
    (0x7bff, 0x7bff_0000, 0x477f_e000, "65504"),
    (0x7c00, 0x7c00_0000, 0x7f80_0000, "f16 +inf"),
    (0xfc00, 0xfc00_0000, 0xff80_0000, "f16 -inf"),
    (0x7f80, 0x7f80_0000, 0x7fff_ffff, "bf16 +inf; f16 NaN"),
    (
        0x7e01,
        0x7e01_0000,
        0x7fff_ffff,
        "f16 NaN with payload -> canonical f32 NaN",
    ),
    (
        0xfe00,
        0xfe00_0000,
        0x7fff_ffff,
        "negative f16 NaN -> canonical",
    ),
    (
        0x7fc1,
        0x7fc1_0000,
        0x7fff_ffff,
        "bf16 NaN payload kept (a shift)",
    ),
    (
        0xff81,
        0xff81_0000,
        0x7fff_ffff,
        "bf16 signalling NaN kept as is",
    ),
];

#[test]
fn bf16_f16_conversions_round_like_the_device() {
    let len = TO_16.len().max(FROM_16.len());
    let x: Vec<f32> = (0..len)
        .map(|i| f32::from_bits(TO_16.get(i).map_or(0, |e| e.0)))
        .collect();
    let bits16: Vec<u16> = (0..len)
        .map(|i| FROM_16.get(i).map_or(0, |e| e.0))
        .collect();
    let c = selftest::convert(&TliSimLaunch::linear(2, 32), &x, &bits16).unwrap();
    for (i, &(f, bf, h, what)) in TO_16.iter().enumerate() {
        assert_eq!(
            c.bf16[i], bf,
            "bf16 of {f:#010x} ({what}): got {:#06x}",
            c.bf16[i]
        );
        assert_eq!(
            c.f16[i], h,
            "f16 of {f:#010x} ({what}): got {:#06x}",
            c.f16[i]
        );
        let neg = if f32::from_bits(f).is_nan() {
            0x7fff
        } else {
            bf ^ 0x8000
        };
        assert_eq!(
            c.bf16_pairs[i],
            u32::from(bf) | (u32::from(neg) << 16),
            "bf16 pair of {what}"
        );
    }
    for (i, &(b, from_bf, from_h, what)) in FROM_16.iter().enumerate() {
        assert_eq!(
            c.bf16_to_f32[i].to_bits(),
            from_bf,
            "bf16 {b:#06x} -> f32 ({what})"
        );
        assert_eq!(
            c.f16_to_f32[i].to_bits(),
            from_h,
            "f16 {b:#06x} -> f32 ({what})"
        );
    }
}

#[test]
fn conversions_agree_with_the_half_crate_except_for_nan_payloads() {
    // Every 16-bit pattern widened, and random f32 bit patterns (all
    // exponents, so subnormals, overflow and NaNs included) plus values near
    // the f16 range narrowed.
    let n = 1usize << 16;
    let mut r = rng(15);
    let x: Vec<f32> = (0..n)
        .map(|i| match i % 3 {
            0 => f32::from_bits(r.random()),
            1 => r.random_range(-70000.0f32..70000.0),
            _ => r.random_range(-1.0e-4f32..1.0e-4),
        })
        .collect();
    let bits16: Vec<u16> = (0..n).map(|i| i as u16).collect();
    let c = selftest::convert(&TliSimLaunch::linear(64, 1024), &x, &bits16).unwrap();
    for i in 0..n {
        let v = x[i];
        if v.is_nan() {
            // The device returns the canonical NaN; `half` keeps the payload.
            assert_eq!(c.bf16[i], 0x7fff, "bf16 of NaN {:#010x}", v.to_bits());
            assert_eq!(c.f16[i], 0x7fff, "f16 of NaN {:#010x}", v.to_bits());
        } else {
            assert_eq!(
                c.bf16[i],
                bf16::from_f32(v).to_bits(),
                "bf16 of {v:e} ({:#010x})",
                v.to_bits()
            );
            assert_eq!(
                c.f16[i],
                f16::from_f32(v).to_bits(),
                "f16 of {v:e} ({:#010x})",
                v.to_bits()
            );
        }
        let b = bits16[i];
        let hb = bf16::from_bits(b);
        if hb.is_nan() {
            assert_eq!(
                c.bf16_to_f32[i].to_bits(),
                u32::from(b) << 16,
                "bf16 NaN {b:#06x} widens by a shift"
            );
        } else {
            assert_eq!(
                c.bf16_to_f32[i].to_bits(),
                hb.to_f32().to_bits(),
                "bf16 {b:#06x}"
            );
        }
        let hh = f16::from_bits(b);
        if hh.is_nan() {
            assert_eq!(
                c.f16_to_f32[i].to_bits(),
                0x7fff_ffff,
                "f16 NaN {b:#06x} widens to the canonical NaN"
            );
        } else {
            assert_eq!(
                c.f16_to_f32[i].to_bits(),
                hh.to_f32().to_bits(),
                "f16 {b:#06x}"
            );
        }
    }
}

#[test]
fn fma_is_fused_and_rn_operations_are_not() {
    // (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24: the product rounds to 1 + 2^-11
    // (a tie, to even), so fused and unfused results differ by 2^-24.
    let a0 = 1.0f32 + 2f32.powi(-12);
    let mut a = vec![a0, 1.0, f32::NAN, -0.0];
    let mut b = vec![a0, 2.0, 1.0, 5.0];
    let mut c = vec![-(1.0 + 2f32.powi(-11)), 0.5, 0.0, 0.0];
    let mut w = vec![0u32, 1, 0x8000_0000, 0xffff_ffff];
    let mut r = rng(16);
    for _ in 0..2000 {
        a.push(common::wide_f32(&mut r));
        b.push(common::wide_f32(&mut r));
        c.push(common::wide_f32(&mut r));
        w.push(r.random());
    }
    let n = a.len();
    let (f, u) = selftest::math(
        &TliSimLaunch::linear(n.div_ceil(256) as u32, 256),
        &a,
        &b,
        &c,
        &w,
    )
    .unwrap();
    assert_eq!(f[0], 2f32.powi(-24), "fused");
    assert_eq!(f[1], 0.0, "unfused");
    for i in 0..n {
        let fused = a[i].mul_add(b[i], c[i]);
        let unfused = a[i] * b[i] + c[i];
        let same = |x: f32, y: f32| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
        assert!(
            same(f[4 * i], fused),
            "__fmaf_rn({}, {}, {})",
            a[i],
            b[i],
            c[i]
        );
        assert!(
            same(f[4 * i + 1], unfused),
            "__fmul_rn/__fadd_rn({}, {}, {})",
            a[i],
            b[i],
            c[i]
        );
        // CUDA's min/max on floats are fminf/fmaxf: a NaN yields the other
        // operand, as Rust's f32::min/max do.
        assert!(
            same(f[4 * i + 2], a[i].min(b[i])),
            "min({}, {})",
            a[i],
            b[i]
        );
        assert!(
            same(f[4 * i + 3], a[i].max(b[i])),
            "max({}, {})",
            a[i],
            b[i]
        );
        let x = w[i];
        let ffs = if x == 0 { 0 } else { x.trailing_zeros() + 1 };
        assert_eq!(
            &u[4 * i..4 * i + 4],
            &[x.count_ones(), x.leading_zeros(), ffs, x],
            "bit ops of {x:#x}"
        );
    }
}

#[test]
fn broken_kernels_fail_quickly_with_a_clear_message() {
    let mut out = vec![0u32; 128];
    // Misuse is detected when it happens; only the deadlock needs the
    // timeout. The others get one long enough that no loaded machine
    // reaches it, so their messages (which name the misuse, not a timeout)
    // prove they were caught without it; no wall-clock bound is needed.
    // The deadlock must wait for its timeout (a lower bound that always
    // holds) and is given a generous upper bound only to catch a hang.
    let cases = [
        (Misbehaviour::SkipBarrier, 5, "returned from the kernel"),
        (Misbehaviour::SkipBarrier, 0, "returned from the kernel"),
        (Misbehaviour::OtherBarrier, 7, "same barrier"),
        (Misbehaviour::Deadlock, 32, "timed out"),
        (Misbehaviour::Trap, 40, "__trap()"),
        (
            Misbehaviour::MaskWithoutSelf,
            3,
            "does not name the calling lane",
        ),
        (Misbehaviour::MismatchedShuffle, 9, "same collective"),
    ];
    for (how, who, expect) in cases {
        let timeout_ms = if how == Misbehaviour::Deadlock {
            250
        } else {
            600_000
        };
        let cfg = TliSimLaunch::linear(2, 64).with_timeout_ms(timeout_ms);
        let start = Instant::now();
        let (kernel, message) = sim_message(selftest::broken(&cfg, how, who, &mut out));
        let took = start.elapsed();
        assert_eq!(kernel, "tli_selftest_broken");
        assert!(
            message.contains(expect),
            "{how:?}: message lacks {expect:?}: {message}"
        );
        assert!(
            message.contains("block (0,0,0)"),
            "{how:?}: the first block fails: {message}"
        );
        if how == Misbehaviour::Deadlock {
            assert!(took >= Duration::from_millis(250), "{how:?} took {took:?}");
            assert!(took < Duration::from_secs(120), "{how:?} took {took:?}");
        } else {
            assert!(!message.contains("timed out"), "{how:?}: {message}");
        }
        // The simulator is usable again at once: a correct kernel runs.
        out.fill(0);
        selftest::broken(&cfg, Misbehaviour::None, 0, &mut out).unwrap();
        assert!(
            out.iter().enumerate().all(|(g, &v)| v == g as u32),
            "{how:?}: control run"
        );
    }
}

#[test]
fn a_deadlock_names_every_waiting_thread_and_honours_the_timeout() {
    let cfg = TliSimLaunch::linear(1, 64).with_timeout_ms(400);
    let mut out = vec![0u32; 64];
    let start = Instant::now();
    let (_, message) = sim_message(selftest::broken(&cfg, Misbehaviour::Deadlock, 2, &mut out));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "gave up after {took:?}, before the 400 ms timeout"
    );
    // Generous: only a hang fails it, not a loaded machine.
    assert!(took < Duration::from_secs(120), "took {took:?}");
    assert!(message.contains("400 ms"), "{message}");
    assert!(
        message.contains("1 at __syncwarp mask 0x0000000c"),
        "{message}"
    );
    assert!(message.contains("63 at __syncthreads"), "{message}");
    assert!(message.contains("thread (2,0,0)"), "{message}");
}

#[test]
fn invalid_launch_configurations_are_errors_not_crashes() {
    // Long enough for every grid below, so only the configuration is wrong.
    let mut out = vec![0u32; 65536 * 10];
    let bad = [
        (TliSimLaunch::linear(1, 0), "at least 1"),
        (TliSimLaunch::linear(0, 32), "at least 1"),
        (TliSimLaunch::linear(1, 1025), "1024"),
        (
            TliSimLaunch {
                grid: [1, 1, 1],
                block: [32, 32, 2],
                dynamic_smem: 0,
                timeout_ms: 0,
            },
            "2048 threads",
        ),
        (
            TliSimLaunch {
                grid: [1, 1, 1],
                block: [1, 1, 65],
                dynamic_smem: 0,
                timeout_ms: 0,
            },
            "limits",
        ),
        (
            TliSimLaunch::linear(1, 32).with_dynamic_smem(227 * 1024 + 1),
            "227 KiB",
        ),
        (
            TliSimLaunch {
                grid: [1, 65536, 1],
                block: [1, 1, 1],
                dynamic_smem: 0,
                timeout_ms: 0,
            },
            "65535",
        ),
    ];
    for (cfg, expect) in bad {
        let (kernel, message) = sim_message(selftest::index(&cfg, &mut out));
        assert_eq!(kernel, "tli_selftest_index");
        assert!(
            message.contains("invalid launch") && message.contains(expect),
            "{cfg:?}: {message}"
        );
    }
    // The largest legal block and shared memory size work.
    let cfg = TliSimLaunch::linear(1, 1024).with_dynamic_smem(227 * 1024);
    selftest::index(&cfg, &mut out).unwrap();
    // Buffers too short for the grid are refused before anything runs.
    let mut short = vec![0u32; 1024 * 10];
    let err = selftest::index(&TliSimLaunch::linear(2, 1024), &mut short).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn concurrent_launches_from_many_threads() {
    let handles: Vec<_> = (0..6u64)
        .map(|k| {
            std::thread::spawn(move || {
                let mut r = rng(100 + k);
                for round in 0..4 {
                    let threads = [64u32, 100, 256, 33][(k as usize + round) % 4];
                    let blocks = 2 + (k as u32 % 3);
                    let input: Vec<i32> = (0..blocks * threads)
                        .map(|_| r.random_range(-50..50))
                        .collect();
                    let mut sums = vec![0i64; blocks as usize];
                    let mut votes = vec![0i32; 3 * blocks as usize];
                    selftest::block_sum(
                        &TliSimLaunch::linear(blocks, threads),
                        &input,
                        &mut sums,
                        &mut votes,
                    )
                    .unwrap();
                    for (b, chunk) in input.chunks(threads as usize).enumerate() {
                        let want: i64 = chunk.iter().map(|&v| i64::from(v)).sum();
                        assert_eq!(sums[b], want, "thread {k} round {round} block {b}");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A random NF4 tensor view's backing data.
struct Nf4Data {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    n: usize,
    blocksize: usize,
}

fn nf4_data(seed: u64, n: usize, blocksize: usize) -> Nf4Data {
    let mut r = rng(seed);
    Nf4Data {
        // One spare byte in front, so a misaligned view can be taken.
        packed: (0..n.div_ceil(2) + 16).map(|_| r.random()).collect(),
        absmax: (0..n.div_ceil(blocksize))
            .map(|_| common::wide_f32(&mut r).abs())
            .collect(),
        n,
        blocksize,
    }
}

/// A sub-slice of `v` of length `len` whose start is (or is not) 16-byte
/// aligned.
fn with_alignment<T>(v: &mut [T], len: usize, aligned: bool) -> &mut [T] {
    let start = (0..16)
        .find(|&k| (v[k..].as_ptr() as usize).is_multiple_of(16) == aligned)
        .expect("some offset has the wanted alignment");
    &mut v[start..start + len]
}

#[test]
fn nf4_dequant_is_right_for_any_grid_and_any_buffer_alignment() {
    use tli_kernels::nf4::{Nf4View, ScalesView, dequant};
    for (seed, n, bs) in [
        (1u64, 1usize, 32usize),
        (2, 1000, 64),
        (3, 70_001, 128),
        (4, 300_000, 4096),
    ] {
        let mut d = nf4_data(seed, n, bs);
        for packed_aligned in [true, false] {
            let plen = n.div_ceil(2);
            let packed: &[u8] = with_alignment(&mut d.packed, plen, packed_aligned);
            let view = Nf4View {
                packed,
                scales: ScalesView::Plain(&d.absmax),
                blocksize: d.blocksize,
                numel: d.n,
            };
            let want: Vec<bf16> = dequant::dequantize(&view).unwrap();
            for blocks in [1u32, 3, 16] {
                for out_aligned in [true, false] {
                    let mut buf = vec![bf16::from_bits(0x7fa5); n + 16];
                    let out = with_alignment(&mut buf, n, out_aligned);
                    selftest::nf4_dequant_with_grid(&view, out, blocks).unwrap();
                    let label = format!(
                        "n={n} grid={blocks} packed aligned={packed_aligned} out aligned={out_aligned}"
                    );
                    assert!(
                        out.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{label}: differs from the CPU"
                    );
                }
            }
            // The default launcher stages misaligned buffers the same way.
            let mut buf = vec![0f32; n + 16];
            let out = with_alignment(&mut buf, n, false);
            tli_kernels::ops::nf4_dequant::dequantize_into(tli_kernels::Device::Sim, &view, out)
                .unwrap();
            let want32: Vec<f32> = dequant::dequantize(&view).unwrap();
            assert!(
                out.iter()
                    .zip(&want32)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "f32 n={n}"
            );
        }
    }
    let d = nf4_data(9, 100, 64);
    let view = Nf4View {
        packed: &d.packed[..50],
        scales: ScalesView::Plain(&d.absmax),
        blocksize: 64,
        numel: 100,
    };
    let mut out = vec![0f32; 100];
    assert!(matches!(
        selftest::nf4_dequant_with_grid(&view, &mut out, 0),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn kernel_errors_name_the_kernel_and_do_not_leak_between_launches() {
    // Errors from many threads at once: every thread of 4 blocks would trap,
    // but only the first error is reported and no later block runs.
    let mut out = vec![0u32; 4 * 256];
    let cfg = TliSimLaunch::linear(4, 256).with_timeout_ms(1000);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for who in [0u32, 255, 128] {
        let (kernel, message) =
            sim_message(selftest::broken(&cfg, Misbehaviour::Trap, who, &mut out));
        *counts.entry(kernel).or_default() += 1;
        assert!(message.starts_with("block (0,0,0) thread ("), "{message}");
        assert!(
            message.contains(&format!("thread ({who},0,0)")),
            "{message}"
        );
        // Blocks after the failing one never ran: their outputs are untouched.
        out[256..].iter_mut().for_each(|v| *v = 7);
        let _ = selftest::broken(&cfg, Misbehaviour::Trap, who, &mut out);
        assert!(
            out[256..].iter().all(|&v| v == 7),
            "a block after the failure ran"
        );
    }
    assert_eq!(counts.get("tli_selftest_broken"), Some(&3));
}

/// The tensor-core fragment contract: `tli_selftest_mma` builds each lane's
/// fragments element by element from the PTX ISA formulas, so if the
/// simulator's gather/scatter disagreed with the documented layout (a
/// transposed operand, swapped registers or halves) D would come out
/// permuted. Small integers keep every product and sum exact in f32, so the
/// check is equality, in any summation order; the matrices are not
/// symmetric and every element differs from its transposed position.
#[test]
fn mma_m16n8k16_follows_the_ptx_fragment_layout() {
    let mut r = rng(77);
    for f16_type in [false, true] {
        let bits = |v: f32| -> u16 {
            if f16_type {
                f16::from_f32(v).to_bits()
            } else {
                bf16::from_f32(v).to_bits()
            }
        };
        let av: Vec<f32> = (0..256).map(|_| r.random_range(-8i32..=8) as f32).collect();
        let bv: Vec<f32> = (0..128).map(|_| r.random_range(-8i32..=8) as f32).collect();
        let c: [f32; 128] = std::array::from_fn(|i| (i as f32) - 64.0);
        let a: [u16; 256] = std::array::from_fn(|i| bits(av[i]));
        let b: [u16; 128] = std::array::from_fn(|i| bits(bv[i]));
        let mut want = [0.0f32; 128];
        for i in 0..16 {
            for j in 0..8 {
                let s: f64 = (0..16)
                    .map(|k| f64::from(av[i * 16 + k]) * f64::from(bv[k * 8 + j]))
                    .sum();
                want[i * 8 + j] = (s + f64::from(c[i * 8 + j])) as f32;
            }
        }
        // Two warps, each computing the whole product.
        let mut d = vec![f32::NAN; 256];
        selftest::mma(&TliSimLaunch::linear(1, 64), f16_type, &a, &b, &c, &mut d).unwrap();
        for w in 0..2 {
            assert_eq!(
                &d[w * 128..w * 128 + 128],
                &want[..],
                "f16 = {f16_type}, warp {w}"
            );
        }
    }
    // A partial warp cannot execute mma.sync.
    let mut d = vec![0.0f32; 128];
    let e = selftest::mma(
        &TliSimLaunch::linear(1, 20).with_timeout_ms(2000),
        false,
        &[0; 256],
        &[0; 128],
        &[0.0; 128],
        &mut d,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mma.sync") && e.contains("0x000fffff"), "{e}");
}
