//! `tli nf4 quantize`, `tli nf4 dequantize` and `tli info`, run as the built
//! binary on temporary files.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use half::{bf16, f16};
use rand_distr::{Distribution, Normal};
use safetensors::Dtype;
use tli_kernels::io::MappedFile;
use tli_kernels::nf4::checkpoint::{TensorBuf, nf4_keys, read_nf4};
use tli_kernels::nf4::quantize::{QuantizeOptions, quantize};
use tli_kernels::nf4::{Nf4Tensor, Scales};
use tli_kernels::{DType, Element};

fn tli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(args)
        .output()
        .expect("run the tli binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Assert a run failed with a non-zero exit code and an error message that
/// contains every needle.
fn assert_fails(o: &Output, needles: &[&str]) {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(o);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// One input tensor: its values as f32 (exactly representable in its
/// dtype) and its stored form.
struct Input {
    values: Vec<f32>,
    buf: TensorBuf,
}

fn float_tensor(seed: u64, dtype: DType, shape: &[usize]) -> Input {
    let n: usize = shape.iter().product();
    let mut rng = common::rng(seed);
    let dist = Normal::new(0.0f32, 0.05).unwrap();
    let raw: Vec<f32> = (0..n).map(|_| dist.sample(&mut rng)).collect();
    let (values, data): (Vec<f32>, Vec<u8>) = match dtype {
        DType::F32 => (
            raw.clone(),
            raw.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DType::BF16 => {
            let h: Vec<bf16> = raw.iter().map(|&v| bf16::from_f32(v)).collect();
            (
                h.iter().map(|v| v.to_f32()).collect(),
                h.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            )
        }
        DType::F16 => {
            let h: Vec<f16> = raw.iter().map(|&v| f16::from_f32(v)).collect();
            (
                h.iter().map(|v| v.to_f32()).collect(),
                h.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            )
        }
    };
    Input {
        values,
        buf: TensorBuf {
            dtype: dtype.safetensors(),
            shape: shape.to_vec(),
            data,
        },
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight"; // bf16, odd n
const DOWN: &str = "model.layers.0.mlp.down_proj.weight"; // f32
const GATE: &str = "model.layers.0.mlp.gate_proj.weight"; // f16
const NORM: &str = "model.norm.weight"; // 1-D: never quantized by default
const EMBED: &str = "model.embed_tokens.weight"; // 2-D, not a projection
const IDS: &str = "position_ids"; // integer
const HEAD: &str = "lm_head.weight"; // 2-D f32, not a projection

/// A small Llama-like checkpoint with `__metadata__`.
fn fixture() -> (BTreeMap<&'static str, Input>, HashMap<String, String>) {
    let mut m = BTreeMap::new();
    m.insert(Q, float_tensor(1, DType::BF16, &[7, 45]));
    m.insert(DOWN, float_tensor(2, DType::F32, &[64, 96]));
    m.insert(GATE, float_tensor(3, DType::F16, &[16, 40]));
    m.insert(NORM, float_tensor(4, DType::F32, &[64]));
    m.insert(EMBED, float_tensor(5, DType::BF16, &[10, 8]));
    m.insert(HEAD, float_tensor(6, DType::F32, &[10, 8]));
    m.insert(
        IDS,
        Input {
            values: vec![],
            buf: TensorBuf {
                dtype: Dtype::I64,
                shape: vec![5],
                data: (0..5i64).flat_map(|v| v.to_le_bytes()).collect(),
            },
        },
    );
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    (m, meta)
}

fn write_fixture(
    dir: &Path,
) -> (
    PathBuf,
    BTreeMap<&'static str, Input>,
    HashMap<String, String>,
) {
    let (m, meta) = fixture();
    let bytes =
        safetensors::serialize(m.iter().map(|(k, v)| (*k, &v.buf)), Some(meta.clone())).unwrap();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    (path, m, meta)
}

fn dtype_of(buf: &TensorBuf) -> DType {
    DType::from_safetensors(buf.dtype).unwrap()
}

/// What `nf4::quantize` gives for an input tensor.
fn reference_quant(input: &Input, opts: QuantizeOptions) -> Nf4Tensor {
    quantize(&input.values, &input.buf.shape, dtype_of(&input.buf), opts).unwrap()
}

fn le_bytes<T: Element>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Little-endian bytes of `nf4::dequant` of `t` in `dtype`.
fn reference_dequant(t: &Nf4Tensor, dtype: DType) -> Vec<u8> {
    use tli_kernels::nf4::dequant::dequantize;
    match dtype {
        DType::F32 => le_bytes(&dequantize::<f32>(&t.view()).unwrap()),
        DType::BF16 => le_bytes(&dequantize::<bf16>(&t.view()).unwrap()),
        DType::F16 => le_bytes(&dequantize::<f16>(&t.view()).unwrap()),
    }
}

fn sorted_names(f: &MappedFile) -> Vec<String> {
    let mut v: Vec<String> = f
        .safetensors()
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Check `file` holds `copied` tensors byte-identical to the fixture.
fn assert_copied(f: &MappedFile, m: &BTreeMap<&str, Input>, copied: &[&str]) {
    let st = f.safetensors().unwrap();
    for name in copied {
        let v = st.tensor(name).unwrap();
        let b = &m[name].buf;
        assert_eq!(v.dtype(), b.dtype, "{name}");
        assert_eq!(v.shape(), b.shape.as_slice(), "{name}");
        assert!(v.data() == b.data.as_slice(), "{name}: bytes changed");
    }
}

/// Quantize `input` with `args`, check the output holds exactly the
/// quantized form of `quantized` and copies of the rest, then dequantize it
/// and check the values against `nf4::dequant(nf4::quantize(..))`.
fn quantize_then_dequantize(args: &[&str], opts: QuantizeOptions, quantized: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (input, m, meta) = write_fixture(dir.path());
    let q = dir.path().join("q.safetensors");
    let mut cmd = vec!["nf4", "quantize", p(&input), p(&q)];
    cmd.extend_from_slice(args);
    let o = tli(&cmd);
    assert_ok(&o, "quantize");
    assert!(
        stdout(&o).contains(&format!("quantized {} tensor(s)", quantized.len())),
        "{}",
        stdout(&o)
    );

    let f = MappedFile::open(&q).unwrap();
    assert_eq!(
        f.safetensors_metadata().unwrap(),
        Some(meta.clone()),
        "__metadata__ kept"
    );
    let copied: Vec<&str> = m
        .keys()
        .copied()
        .filter(|k| !quantized.contains(k))
        .collect();
    let mut want_keys: Vec<String> = copied.iter().map(|s| s.to_string()).collect();
    for name in quantized {
        want_keys.extend(nf4_keys(name, opts.double_quant));
    }
    want_keys.sort();
    assert_eq!(sorted_names(&f), want_keys, "key set");
    assert_copied(&f, &m, &copied);
    let st = f.safetensors().unwrap();
    let mut refs = BTreeMap::new();
    for name in quantized {
        let want = reference_quant(&m[name], opts);
        let got = read_nf4(&st, name, &q).unwrap();
        assert_eq!(got, want, "{name}: stored NF4 differs from nf4::quantize");
        assert_eq!(matches!(got.scales, Scales::Double(_)), opts.double_quant);
        refs.insert(*name, want);
    }

    // Dequantize in the quant-state dtype (the original one), on the CPU.
    let out = dir.path().join("out.safetensors");
    let o = tli(&["nf4", "dequantize", p(&q), p(&out)]);
    assert_ok(&o, "dequantize");
    let f = MappedFile::open(&out).unwrap();
    assert_eq!(f.safetensors_metadata().unwrap(), Some(meta.clone()));
    let mut all: Vec<String> = m.keys().map(|s| s.to_string()).collect();
    all.sort();
    assert_eq!(
        sorted_names(&f),
        all,
        "dequantized file has the original names"
    );
    assert_copied(&f, &m, &copied);
    let st = f.safetensors().unwrap();
    for (name, t) in &refs {
        let v = st.tensor(name).unwrap();
        let dtype = dtype_of(&m[name].buf);
        assert_eq!(v.dtype(), dtype.safetensors(), "{name}: original dtype");
        assert_eq!(
            v.shape(),
            m[name].buf.shape.as_slice(),
            "{name}: original shape"
        );
        assert!(
            v.data() == reference_dequant(t, dtype).as_slice(),
            "{name}: values differ"
        );
    }

    // Forced f32 output on the simulator: the same values again.
    if cfg!(feature = "sim") {
        let out32 = dir.path().join("out32.safetensors");
        let o = tli(&[
            "nf4",
            "dequantize",
            p(&q),
            p(&out32),
            "--dtype",
            "f32",
            "--device",
            "sim",
        ]);
        assert_ok(&o, "dequantize --dtype f32 --device sim");
        let f = MappedFile::open(&out32).unwrap();
        let st = f.safetensors().unwrap();
        for (name, t) in &refs {
            let v = st.tensor(name).unwrap();
            assert_eq!(v.dtype(), Dtype::F32, "{name}");
            assert!(
                v.data() == reference_dequant(t, DType::F32).as_slice(),
                "{name}: sim f32 differs"
            );
        }
        assert_copied(&f, &m, &copied);
    }
}

#[test]
fn quantize_default_selection_then_dequantize_is_bit_exact() {
    quantize_then_dequantize(&[], QuantizeOptions::default(), &[DOWN, GATE, Q]);
}

#[test]
fn quantize_with_blocksize_then_dequantize_is_bit_exact() {
    let opts = QuantizeOptions {
        blocksize: 128,
        double_quant: false,
    };
    quantize_then_dequantize(&["--blocksize", "128"], opts, &[DOWN, GATE, Q]);
}

#[test]
fn quantize_include_regex_selects_by_name() {
    // Matches anywhere in the name; picks a non-projection 2-D tensor and a
    // 1-D one, and leaves the other projections alone.
    quantize_then_dequantize(
        &["--include", "embed_tokens|q_proj|^model\\.norm"],
        QuantizeOptions::default(),
        &[EMBED, Q, NORM],
    );
}

/// Needs the double quantizer (`nf4::double_quant`).
#[test]
fn quantize_double_quant_then_dequantize_is_bit_exact() {
    let opts = QuantizeOptions {
        blocksize: 64,
        double_quant: true,
    };
    quantize_then_dequantize(&["--double-quant"], opts, &[DOWN, GATE, Q]);
}

#[test]
fn requantizing_a_quantized_file_copies_the_4bit_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _, _) = write_fixture(dir.path());
    let q = dir.path().join("q.safetensors");
    assert_ok(&tli(&["nf4", "quantize", p(&input), p(&q)]), "quantize");
    let q2 = dir.path().join("q2.safetensors");
    let o = tli(&["nf4", "quantize", p(&q), p(&q2), "--include", "."]);
    // Everything else matched by "." includes the integer position_ids.
    assert_fails(&o, &["position_ids", "I64", "only F32, BF16 and F16"]);
    let o = tli(&["nf4", "quantize", p(&q), p(&q2), "--include", "weight"]);
    assert_ok(&o, "re-quantize");
    // The three projections were already 4-bit: copied as they are.
    let a = MappedFile::open(&q).unwrap();
    let b = MappedFile::open(&q2).unwrap();
    let (sa, sb) = (a.safetensors().unwrap(), b.safetensors().unwrap());
    for name in nf4_keys(Q, false) {
        assert!(
            sa.tensor(&name).unwrap().data() == sb.tensor(&name).unwrap().data(),
            "{name}"
        );
    }
    assert!(
        stdout(&o).contains("quantized 3 tensor(s)"),
        "{}",
        stdout(&o)
    ); // embed, head, norm
}

#[test]
fn include_matching_a_non_float_tensor_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _, _) = write_fixture(dir.path());
    let out = dir.path().join("out.safetensors");
    let o = tli(&[
        "nf4",
        "quantize",
        p(&input),
        p(&out),
        "--include",
        "position_ids|q_proj",
    ]);
    assert_fails(
        &o,
        &[
            "position_ids",
            "I64",
            "[5]",
            "only F32, BF16 and F16",
            "position_ids|q_proj",
            "model.safetensors",
        ],
    );
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
}

#[test]
fn invalid_blocksize_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _, _) = write_fixture(dir.path());
    let out = dir.path().join("out.safetensors");
    let o = tli(&["nf4", "quantize", p(&input), p(&out), "--blocksize", "48"]);
    assert_fails(
        &o,
        &[
            "block size 48 is not supported",
            "blocksize 48",
            "model.safetensors",
        ],
    );
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
}

#[test]
fn invalid_regex_and_dtype_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _, _) = write_fixture(dir.path());
    let out = dir.path().join("out.safetensors");
    let o = tli(&[
        "nf4",
        "quantize",
        p(&input),
        p(&out),
        "--include",
        "(unclosed",
    ]);
    assert_fails(&o, &["invalid regex \"(unclosed\""]);
    let o = tli(&["nf4", "dequantize", p(&input), p(&out), "--dtype", "f64"]);
    assert_fails(&o, &["f64", "f32", "bf16", "f16"]);
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
}

#[test]
fn bad_input_files_fail_with_the_file_named_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    let out = dir.path().join("out.safetensors");
    for verb in ["quantize", "dequantize"] {
        let o = tli(&["nf4", verb, p(&garbage), p(&out)]);
        assert_fails(&o, &["garbage.safetensors", "not a valid safetensors file"]);
        let o = tli(&[
            "nf4",
            verb,
            p(&dir.path().join("absent.safetensors")),
            p(&out),
        ]);
        assert_fails(&o, &["absent.safetensors"]);
    }
    assert_eq!(listing(dir.path()), ["garbage.safetensors"]);

    // A truncated checkpoint.
    let (input, _, _) = write_fixture(dir.path());
    let q = dir.path().join("q.safetensors");
    assert_ok(&tli(&["nf4", "quantize", p(&input), p(&q)]), "quantize");
    let bytes = std::fs::read(&q).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let o = tli(&["nf4", "dequantize", p(&cut), p(&out)]);
    assert_fails(&o, &["cut.safetensors", "not a valid safetensors file"]);
    assert!(!out.exists());
}

#[test]
fn failed_run_keeps_an_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _, _) = write_fixture(dir.path());
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, b"keep me").unwrap();
    let o = tli(&["nf4", "quantize", p(&input), p(&out), "--blocksize", "4097"]);
    assert_fails(&o, &["4097"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    assert_eq!(
        listing(dir.path()),
        ["model.safetensors", "out.safetensors"]
    );
}

#[test]
fn dequantize_on_cuda_without_a_device_fails_cleanly() {
    if tli_kernels::Device::Cuda.check_available().is_ok() {
        eprintln!("skipped: a CUDA device is available here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, _, _) = write_fixture(dir.path());
    let q = dir.path().join("q.safetensors");
    assert_ok(&tli(&["nf4", "quantize", p(&input), p(&q)]), "quantize");
    let out = dir.path().join("out.safetensors");
    let o = tli(&["nf4", "dequantize", p(&q), p(&out), "--device", "cuda"]);
    assert_fails(&o, &["no CUDA device available", "device cuda"]);
    assert!(!out.exists());
}

#[test]
fn info_prints_version_features_kernels_and_cuda_status() {
    let o = tli(&["info"]);
    assert_ok(&o, "info");
    let s = stdout(&o);
    assert!(
        s.contains(&format!("tli {}", env!("CARGO_PKG_VERSION"))),
        "{s}"
    );
    let yn = |b: bool| if b { "yes" } else { "no" };
    assert!(
        s.contains(&format!(
            "features: sim={} cuda={}",
            yn(cfg!(feature = "sim")),
            yn(cfg!(tli_cuda))
        )),
        "{s}"
    );
    for k in tli_kernels::kernels::KERNEL_SOURCES {
        assert!(s.contains(&format!("kernels/{k}.cu")), "{s}");
    }
    assert!(s.contains("embedded CUDA images: "), "{s}");
    for arch in tli_kernels::kernels::CUDA_ARCHS {
        assert!(s.contains(&format!("sm_{arch}")), "{s}");
    }
    match tli_kernels::Device::Cuda.check_available() {
        Ok(()) => assert!(s.contains("device cuda: available"), "{s}"),
        Err(e) => assert!(
            s.contains(&format!("device cuda: not available: {e}")),
            "{s}"
        ),
    }
}

/// `tli nf4 dequantize` on tensors bitsandbytes quantized itself
/// (`tests/data/bnb/`, see its README) writes exactly the bits bitsandbytes'
/// own `dequantize_4bit` produced, in the quant state's dtype and shape, for
/// every case: plain and double-quantized scales, blocks crossing rows, an
/// odd element count, f32/bf16/f16.
#[test]
fn dequantize_reproduces_bitsandbytes_bit_for_bit() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bnb/nf4_cpu.safetensors"
    );
    let cases = ["plain64", "tail64", "bf16_128", "dq64", "f16_dq256"];
    let want_file = MappedFile::open(fixture).unwrap();
    let want = want_file.safetensors().unwrap();
    for device in ["cpu", "sim"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("deq.safetensors");
        let o = tli(&["nf4", "dequantize", fixture, p(&out), "--device", device]);
        assert_ok(&o, "nf4 dequantize of the bitsandbytes fixture");
        let got_file = MappedFile::open(&out).unwrap();
        let got = got_file.safetensors().unwrap();
        for case in cases {
            let g = got.tensor(&format!("{case}.weight")).unwrap();
            let w = want.tensor(&format!("{case}.dequantized")).unwrap();
            assert_eq!(g.dtype(), w.dtype(), "{case} on {device}: dtype");
            assert_eq!(g.shape(), w.shape(), "{case} on {device}: shape");
            let (gd, wd) = (g.data(), w.data());
            assert_eq!(gd.len(), wd.len(), "{case} on {device}: bytes");
            let elem = w.dtype().bitsize() / 8;
            let first_diff = gd
                .chunks(elem)
                .zip(wd.chunks(elem))
                .position(|(a, b)| a != b);
            assert_eq!(
                first_diff, None,
                "{case} on {device}: first differing element"
            );
        }
    }
}
