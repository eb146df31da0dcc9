//! The bitsandbytes safetensors form: exact key set, dtypes, shapes and
//! quant-state JSON; write → read round trips; every malformed-input error;
//! file-level reading and atomic writing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use safetensors::{Dtype, SafeTensors};
use tli_kernels::io::{MappedFile, OutTensor, write_safetensors};
use tli_kernels::nf4::checkpoint::{
    TensorBuf, dequantize_file, find_4bit_tensors, find_nf4_tensors, nf4_entries, nf4_keys,
    quant_state_json, read_nf4,
};
use tli_kernels::nf4::quantize::{QuantizeOptions, quantize};
use tli_kernels::nf4::{DoubleQuant, NF4_CODE, Nf4Tensor, Scales};
use tli_kernels::{DType, Device, Element, Error};

const BASE: &str = "model.layers.3.self_attn.o_proj.weight";
const LABEL: &str = "ckpt/model.safetensors";

type Entries = BTreeMap<String, TensorBuf>;

fn normal_data(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = common::rng(seed);
    let dist = Normal::new(0.0f32, 0.02).unwrap();
    (0..n).map(|_| dist.sample(&mut rng)).collect()
}

/// A plain NF4 tensor from the real quantizer.
fn plain(seed: u64, shape: &[usize], dtype: DType, blocksize: usize) -> Nf4Tensor {
    let n = shape.iter().product();
    let opts = QuantizeOptions {
        blocksize,
        double_quant: false,
    };
    quantize(&normal_data(seed, n), shape, dtype, opts).unwrap()
}

/// A double-quantized tensor assembled from random parts: the format is
/// tested independently of the double quantizer.
fn double(seed: u64, shape: &[usize], dtype: DType, blocksize: usize, offset: f32) -> Nf4Tensor {
    let mut t = plain(seed, shape, dtype, blocksize);
    let nb = t.numel().div_ceil(blocksize);
    let mut rng = common::rng(seed ^ 0xd0b1e);
    let mut code2: Vec<f32> = (0..256).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    code2.sort_by(f32::total_cmp);
    t.scales = Scales::Double(DoubleQuant {
        qabsmax: (0..nb).map(|_| rng.random()).collect(),
        absmax2: (0..nb.div_ceil(256))
            .map(|_| rng.random_range(0.001f32..0.1))
            .collect(),
        code2,
        offset,
        nested_blocksize: 256,
    });
    t
}

fn entries(base: &str, t: &Nf4Tensor) -> Entries {
    nf4_entries(base, t).unwrap().into_iter().collect()
}

fn serialize(e: &Entries) -> Vec<u8> {
    safetensors::serialize(e.iter().map(|(k, v)| (k.clone(), v)), None).unwrap()
}

fn read_back(e: &Entries, base: &str) -> Result<Nf4Tensor, Error> {
    let bytes = serialize(e);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    read_nf4(&st, base, Path::new(LABEL))
}

fn json_of(e: &Entries, base: &str) -> serde_json::Value {
    let buf = &e[&format!("{base}.quant_state.bitsandbytes__nf4")];
    serde_json::from_slice(&buf.data).unwrap()
}

fn set_json(e: &mut Entries, base: &str, json: &str) {
    let key = format!("{base}.quant_state.bitsandbytes__nf4");
    e.insert(
        key,
        TensorBuf {
            dtype: Dtype::U8,
            shape: vec![json.len()],
            data: json.as_bytes().to_vec(),
        },
    );
}

fn f32_buf(values: &[f32]) -> TensorBuf {
    TensorBuf {
        dtype: Dtype::F32,
        shape: vec![values.len()],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Assert `read_nf4` fails with a format error on the label file whose
/// message names the tensor and contains every one of `needles`.
fn expect_err(e: &Entries, base: &str, needles: &[&str]) {
    let err = read_back(e, base).expect_err("malformed tensor was accepted");
    let msg = err.to_string();
    match &err {
        Error::Format { path, reason } => {
            assert_eq!(path, Path::new(LABEL), "{msg}");
            assert!(
                reason.contains(&format!("tensor `{base}`")),
                "message does not name the tensor: {msg}"
            );
        }
        other => panic!("expected Error::Format, got {other:?}"),
    }
    assert!(
        msg.starts_with(LABEL),
        "message does not start with the file: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn plain_round_trip_every_dtype_odd_sizes_and_blocksizes() {
    let shapes: [&[usize]; 6] = [&[1], &[3, 5], &[7, 33], &[64, 64], &[129], &[2, 3, 11]];
    for (i, dtype) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .enumerate()
    {
        for (j, shape) in shapes.iter().enumerate() {
            for blocksize in [32, 64, 4096] {
                let t = plain((i * 100 + j) as u64, shape, dtype, blocksize);
                let e = entries(BASE, &t);
                let got = read_back(&e, BASE).unwrap();
                assert_eq!(got, t, "{dtype} {shape:?} blocksize {blocksize}");
            }
        }
    }
}

#[test]
fn plain_key_set_dtypes_shapes_and_contents() {
    let shape = [7, 45]; // n = 315: odd, and not a multiple of the block
    let t = plain(1, &shape, DType::BF16, 64);
    let list = nf4_entries(BASE, &t).unwrap();
    let keys: Vec<&str> = list.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            BASE.to_string(),
            format!("{BASE}.absmax"),
            format!("{BASE}.quant_map"),
            format!("{BASE}.quant_state.bitsandbytes__nf4"),
        ]
    );
    assert_eq!(keys, nf4_keys(BASE, false));
    let e: Entries = list.into_iter().collect();

    let packed = &e[BASE];
    assert_eq!(
        (packed.dtype, packed.shape.as_slice()),
        (Dtype::U8, &[158usize, 1][..])
    );
    assert_eq!(packed.data, t.packed);

    let absmax = &e[&format!("{BASE}.absmax")];
    assert_eq!(
        (absmax.dtype, absmax.shape.as_slice()),
        (Dtype::F32, &[5usize][..])
    );
    let Scales::Plain(a) = &t.scales else {
        unreachable!()
    };
    assert_eq!(
        absmax.data,
        a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()
    );

    let qmap = &e[&format!("{BASE}.quant_map")];
    assert_eq!(
        (qmap.dtype, qmap.shape.as_slice()),
        (Dtype::F32, &[16usize][..])
    );
    assert_eq!(
        qmap.data,
        NF4_CODE
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>()
    );

    let qs = &e[&format!("{BASE}.quant_state.bitsandbytes__nf4")];
    assert_eq!(qs.dtype, Dtype::U8);
    assert_eq!(qs.shape, [qs.data.len()]);
    // Byte for byte what Python's json.dumps writes for bitsandbytes'
    // QuantState.as_dict(packed=True) of this tensor.
    assert_eq!(
        std::str::from_utf8(&qs.data).unwrap(),
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [7, 45]}"#
    );
}

#[test]
fn double_quant_key_set_dtypes_shapes_and_json() {
    let shape = [30, 600]; // 18000 elements, 282 blocks of 64, 2 nested blocks
    let t = double(2, &shape, DType::F16, 64, f32::from_bits(0x3c4985f0));
    let list = nf4_entries(BASE, &t).unwrap();
    let keys: Vec<String> = list.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        keys,
        [
            BASE.to_string(),
            format!("{BASE}.absmax"),
            format!("{BASE}.quant_map"),
            format!("{BASE}.nested_absmax"),
            format!("{BASE}.nested_quant_map"),
            format!("{BASE}.quant_state.bitsandbytes__nf4"),
        ]
    );
    assert_eq!(keys, nf4_keys(BASE, true));
    let e: Entries = list.into_iter().collect();
    let Scales::Double(d) = &t.scales else {
        unreachable!()
    };
    let check = |suffix: &str, dtype: Dtype, shape: &[usize]| {
        let b = &e[&format!("{BASE}{suffix}")];
        assert_eq!((b.dtype, b.shape.as_slice()), (dtype, shape), "{suffix}");
    };
    check("", Dtype::U8, &[9000, 1]);
    check(".absmax", Dtype::U8, &[282]);
    check(".quant_map", Dtype::F32, &[16]);
    check(".nested_absmax", Dtype::F32, &[2]);
    check(".nested_quant_map", Dtype::F32, &[256]);
    assert_eq!(e[&format!("{BASE}.absmax")].data, d.qabsmax);
    assert_eq!(
        e[&format!("{BASE}.nested_absmax")].data,
        f32_buf(&d.absmax2).data
    );
    assert_eq!(
        e[&format!("{BASE}.nested_quant_map")].data,
        f32_buf(&d.code2).data
    );
    assert_eq!(
        std::str::from_utf8(&e[&format!("{BASE}.quant_state.bitsandbytes__nf4")].data).unwrap(),
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [30, 600], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.012299999594688416}"#
    );
    let j = json_of(&e, BASE);
    assert!(j["blocksize"].is_u64() && j["nested_blocksize"].is_u64());
    assert!(j["shape"].is_array() && j["nested_offset"].is_f64());
    assert_eq!(read_back(&e, BASE).unwrap(), t);
}

#[test]
fn double_quant_round_trip_every_dtype_and_awkward_offsets() {
    // Offsets whose Python repr needs scientific notation, many digits, or
    // sits at the fixed/scientific boundary: each must come back bit-exact.
    let offsets = [
        0.0123f32,
        1e-5,
        3e-7,
        1e-4,
        123456.78,
        1e20,
        0.0,
        2.5,
        65504.0,
        5e-39,
        -0.75,
        f32::from_bits(1126154602), // 159.755523681640625: an exact decimal tie
        f32::from_bits(864026624),  // 2^-24: lopsided rounding interval
        f32::MIN_POSITIVE,
        f32::MAX,
    ];
    for (i, dtype) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .enumerate()
    {
        for (j, &offset) in offsets.iter().enumerate() {
            let shape: &[usize] = if j % 2 == 0 { &[33, 1001] } else { &[1] };
            let t = double(
                (i * 31 + j) as u64,
                shape,
                dtype,
                if j % 3 == 0 { 32 } else { 128 },
                offset,
            );
            let got = read_back(&entries(BASE, &t), BASE).unwrap();
            assert_eq!(got, t, "{dtype} offset {offset:e}");
            let (Scales::Double(a), Scales::Double(b)) = (&got.scales, &t.scales) else {
                unreachable!()
            };
            assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "offset {offset:e}");
        }
    }
}

#[test]
fn quant_state_json_plain_matches_python_json_dumps() {
    let t = plain(3, &[7], DType::F32, 4096);
    assert_eq!(
        quant_state_json(&t).unwrap(),
        r#"{"quant_type": "nf4", "blocksize": 4096, "dtype": "float32", "shape": [7]}"#
    );
}

#[test]
fn non_finite_offset_is_refused_on_write() {
    let t = double(4, &[64], DType::F32, 64, f32::INFINITY);
    let err = nf4_entries(BASE, &t).unwrap_err().to_string();
    assert!(err.contains("inf"), "{err}");
}

#[test]
fn inconsistent_tensor_is_refused_on_write() {
    let mut t = plain(5, &[10, 10], DType::F32, 64);
    t.packed.pop();
    let err = nf4_entries(BASE, &t).unwrap_err().to_string();
    assert!(
        err.contains("49 bytes") && err.contains("50 bytes"),
        "{err}"
    );
}

#[test]
fn finds_nf4_and_other_4bit_tensors() {
    let mut e = entries("a.q_proj.weight", &plain(6, &[4, 64], DType::BF16, 64));
    e.extend(entries(
        "b.k_proj.weight",
        &double(7, &[4, 64], DType::BF16, 64, 0.01),
    ));
    e.insert(
        "c.weight.quant_state.bitsandbytes__fp4".into(),
        f32_buf(&[0.0]),
    );
    e.insert("norm.weight".into(), f32_buf(&[1.0, 2.0]));
    let bytes = serialize(&e);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        find_nf4_tensors(&st),
        ["a.q_proj.weight", "b.k_proj.weight"]
    );
    assert_eq!(
        find_4bit_tensors(&st),
        [
            ("a.q_proj.weight".to_string(), "nf4".to_string()),
            ("b.k_proj.weight".to_string(), "nf4".to_string()),
            ("c.weight".to_string(), "fp4".to_string()),
        ]
    );
}

// ------------------------------------------------------- malformed: tensors

/// A valid plain tensor: shape [5, 40] = 200 elements, blocksize 64 → 4
/// blocks, 100 packed bytes.
fn valid_plain() -> Entries {
    entries(BASE, &plain(10, &[5, 40], DType::BF16, 64))
}

/// A valid double-quantized tensor: [30, 600] = 18000 elements → 282 blocks
/// → 2 nested blocks.
fn valid_double() -> Entries {
    entries(BASE, &double(11, &[30, 600], DType::BF16, 64, 0.02))
}

#[test]
fn valid_fixtures_read() {
    read_back(&valid_plain(), BASE).unwrap();
    read_back(&valid_double(), BASE).unwrap();
}

#[test]
fn missing_keys() {
    for suffix in ["", ".absmax", ".quant_map"] {
        let mut e = valid_plain();
        e.remove(&format!("{BASE}{suffix}"));
        expect_err(&e, BASE, &[&format!("missing key `{BASE}{suffix}`")]);
    }
    let mut e = valid_plain();
    e.remove(&format!("{BASE}.quant_state.bitsandbytes__nf4"));
    expect_err(
        &e,
        BASE,
        &[
            &format!("missing key `{BASE}.quant_state.bitsandbytes__nf4`"),
            "not a bitsandbytes NF4 tensor",
        ],
    );
}

#[test]
fn wrong_lengths() {
    let mut e = valid_plain();
    e.insert(format!("{BASE}.absmax"), f32_buf(&[1.0, 2.0, 3.0]));
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.absmax` has 3 elements"),
            "expected 4",
            "n = 200",
            "[5, 40]",
            "blocksize 64",
        ],
    );

    let mut e = valid_plain();
    e.get_mut(BASE).unwrap().data.push(0);
    e.get_mut(BASE).unwrap().shape = vec![101, 1];
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}` has 101 elements (shape [101, 1])"),
            "expected 100",
        ],
    );

    let mut e = valid_plain();
    e.insert(format!("{BASE}.quant_map"), f32_buf(&NF4_CODE[..15]));
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.quant_map` has 15 elements"),
            "expected 16",
        ],
    );

    // The shape in the quant state disagrees with the stored data.
    let mut e = valid_plain();
    set_json(
        &mut e,
        BASE,
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [5, 41]}"#,
    );
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}` has 100 elements"),
            "expected 103",
            "[5, 41]",
        ],
    );
}

#[test]
fn packed_weight_of_any_shape_with_the_right_count_is_accepted() {
    // bitsandbytes flattens the packed weight; only its length matters.
    let mut e = valid_plain();
    e.get_mut(BASE).unwrap().shape = vec![100];
    read_back(&e, BASE).unwrap();
}

#[test]
fn wrong_dtypes() {
    let mut e = valid_plain();
    let a = e.get_mut(&format!("{BASE}.absmax")).unwrap();
    a.dtype = Dtype::F16;
    a.shape = vec![8];
    expect_err(
        &e,
        BASE,
        &[&format!(
            "`{BASE}.absmax` has dtype F16 (shape [8]), expected F32"
        )],
    );

    let mut e = valid_plain();
    let p = e.get_mut(BASE).unwrap();
    p.dtype = Dtype::I8;
    expect_err(
        &e,
        BASE,
        &[&format!("`{BASE}` has dtype I8"), "expected U8"],
    );

    let mut e = valid_plain();
    let q = e.get_mut(&format!("{BASE}.quant_map")).unwrap();
    q.dtype = Dtype::I32;
    expect_err(
        &e,
        BASE,
        &[&format!("`{BASE}.quant_map` has dtype I32"), "expected F32"],
    );

    let mut e = valid_plain();
    e.get_mut(&format!("{BASE}.quant_state.bitsandbytes__nf4"))
        .unwrap()
        .dtype = Dtype::I8;
    expect_err(&e, BASE, &["has dtype I8, expected U8 (UTF-8 JSON bytes)"]);

    // u8 absmax means double quant: without the nested parts it is an error.
    let mut e = valid_plain();
    e.insert(
        format!("{BASE}.absmax"),
        TensorBuf {
            dtype: Dtype::U8,
            shape: vec![4],
            data: vec![1, 2, 3, 4],
        },
    );
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.absmax` is U8"),
            "no nested_blocksize/nested_dtype/nested_offset",
        ],
    );
}

#[test]
fn quant_map_that_is_not_the_nf4_table() {
    let mut table = NF4_CODE;
    table[3] = -0.4;
    let mut e = valid_plain();
    e.insert(format!("{BASE}.quant_map"), f32_buf(&table));
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.quant_map` is not the NF4 table"),
            "entry 3 is -0.4",
            "expected -0.3949175",
        ],
    );
}

#[test]
fn fp4_is_refused_clearly() {
    // FP4 under its own key.
    let mut e = valid_plain();
    let qs = e
        .remove(&format!("{BASE}.quant_state.bitsandbytes__nf4"))
        .unwrap();
    e.insert(format!("{BASE}.quant_state.bitsandbytes__fp4"), qs);
    expect_err(&e, BASE, &["bitsandbytes \"fp4\"", "only nf4 is supported"]);

    // FP4 claimed inside the NF4 key's JSON.
    let mut e = valid_plain();
    set_json(
        &mut e,
        BASE,
        r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [5, 40]}"#,
    );
    expect_err(
        &e,
        BASE,
        &["quant_type is \"fp4\"", "only \"nf4\" is supported"],
    );
}

// ---------------------------------------------------------- malformed: JSON

#[test]
fn bad_json() {
    let mut e = valid_plain();
    set_json(&mut e, BASE, r#"{"quant_type": "nf4", "blocksize": 64, "#);
    expect_err(&e, BASE, &["is not valid JSON", "blocksize"]);

    let mut e = valid_plain();
    let qs = e
        .get_mut(&format!("{BASE}.quant_state.bitsandbytes__nf4"))
        .unwrap();
    qs.data = vec![0xff, 0xfe, b'{'];
    qs.shape = vec![3];
    expect_err(&e, BASE, &["is not UTF-8 text"]);

    let mut e = valid_plain();
    set_json(&mut e, BASE, "[1, 2]");
    expect_err(&e, BASE, &["is not a JSON object", "[1, 2]"]);
}

#[test]
fn missing_json_fields() {
    let full = [
        ("quant_type", "\"nf4\""),
        ("blocksize", "64"),
        ("dtype", "\"bfloat16\""),
        ("shape", "[5, 40]"),
    ];
    for skip in 0..full.len() {
        let body: Vec<String> = full
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, (k, v))| format!("\"{k}\": {v}"))
            .collect();
        let mut e = valid_plain();
        set_json(&mut e, BASE, &format!("{{{}}}", body.join(", ")));
        expect_err(
            &e,
            BASE,
            &[&format!("quant-state JSON has no `{}` field", full[skip].0)],
        );
    }
}

#[test]
fn wrong_json_field_types_and_values() {
    let cases: [(&str, &[&str]); 8] = [
        (
            r#"{"quant_type": "nf4", "blocksize": "64", "dtype": "bfloat16", "shape": [5, 40]}"#,
            &["blocksize is \"64\", expected a non-negative integer"],
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64.5, "dtype": "bfloat16", "shape": [5, 40]}"#,
            &["blocksize is 64.5"],
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 48, "dtype": "bfloat16", "shape": [5, 40]}"#,
            &["blocksize 48 is not one of 32, 64"],
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float64", "shape": [5, 40]}"#,
            &["dtype \"float64\" is not supported"],
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": null}"#,
            &["shape is null, expected a list of integers"],
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [5, -40]}"#,
            &["shape [5,-40] is not a list of non-negative integers"],
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [0, 40]}"#,
            &["shape [0, 40] has no elements"],
        ),
        (
            r#"{"quant_type": 4, "blocksize": 64, "dtype": "bfloat16", "shape": [5, 40]}"#,
            &["quant_type is 4, expected a string"],
        ),
    ];
    for (json, needles) in cases {
        let mut e = valid_plain();
        set_json(&mut e, BASE, json);
        expect_err(&e, BASE, needles);
    }
}

#[test]
fn torch_dtype_spellings_are_read() {
    for (name, dtype) in [
        ("bfloat16", DType::BF16),
        ("float16", DType::F16),
        ("float32", DType::F32),
    ] {
        let mut e = valid_plain();
        set_json(
            &mut e,
            BASE,
            &format!(
                r#"{{"quant_type": "nf4", "blocksize": 64, "dtype": "{name}", "shape": [5, 40], "extra": 1}}"#
            ),
        );
        assert_eq!(read_back(&e, BASE).unwrap().dtype, dtype, "{name}");
    }
}

// ------------------------------------------------------ malformed: double

const DQ_JSON: &str =
    r#""quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [30, 600]"#;

#[test]
fn double_quant_missing_parts() {
    for suffix in [".nested_absmax", ".nested_quant_map"] {
        let mut e = valid_double();
        e.remove(&format!("{BASE}{suffix}"));
        expect_err(
            &e,
            BASE,
            &[
                &format!("key `{BASE}{suffix}` is missing"),
                "double-quantized",
            ],
        );
    }
    for (field, rest) in [
        (
            "nested_blocksize",
            r#""nested_dtype": "float32", "nested_offset": 0.5"#,
        ),
        (
            "nested_dtype",
            r#""nested_blocksize": 256, "nested_offset": 0.5"#,
        ),
        (
            "nested_offset",
            r#""nested_blocksize": 256, "nested_dtype": "float32""#,
        ),
    ] {
        let mut e = valid_double();
        set_json(&mut e, BASE, &format!("{{{DQ_JSON}, {rest}}}"));
        expect_err(
            &e,
            BASE,
            &[&format!("quant-state JSON has no `{field}` field")],
        );
    }
    // No nested JSON fields at all, but nested tensors present.
    let mut e = valid_double();
    set_json(&mut e, BASE, &format!("{{{DQ_JSON}}}"));
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.absmax` is U8"),
            &format!("`{BASE}.nested_absmax` exists"),
            "no nested_blocksize",
        ],
    );
}

#[test]
fn double_quant_wrong_values() {
    let mut e = valid_double();
    e.insert(format!("{BASE}.nested_absmax"), f32_buf(&[1.0, 2.0, 3.0]));
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.nested_absmax` has 3 elements"),
            "expected 2",
            "282 blocks / nested blocksize 256",
        ],
    );

    let mut e = valid_double();
    e.insert(format!("{BASE}.nested_quant_map"), f32_buf(&[0.0; 255]));
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.nested_quant_map` has 255 elements"),
            "expected 256",
        ],
    );

    let mut e = valid_double();
    let a = e.get_mut(&format!("{BASE}.absmax")).unwrap();
    a.data.pop();
    a.shape = vec![281];
    expect_err(
        &e,
        BASE,
        &[&format!("`{BASE}.absmax` has 281 elements"), "expected 282"],
    );

    let mut e = valid_double();
    e.insert(format!("{BASE}.absmax"), f32_buf(&[0.5; 282]));
    expect_err(
        &e,
        BASE,
        &[
            &format!("`{BASE}.absmax` has dtype F32, expected U8"),
            "double-quantized",
        ],
    );

    let mut e = valid_double();
    set_json(
        &mut e,
        BASE,
        &format!(
            r#"{{{DQ_JSON}, "nested_blocksize": 256, "nested_dtype": "float16", "nested_offset": 0.5}}"#
        ),
    );
    expect_err(
        &e,
        BASE,
        &["nested_dtype is \"float16\", expected \"float32\""],
    );

    let mut e = valid_double();
    set_json(
        &mut e,
        BASE,
        &format!(
            r#"{{{DQ_JSON}, "nested_blocksize": 200, "nested_dtype": "float32", "nested_offset": 0.5}}"#
        ),
    );
    expect_err(&e, BASE, &["nested_blocksize 200 is not a power of two"]);

    let mut e = valid_double();
    set_json(
        &mut e,
        BASE,
        &format!(
            r#"{{{DQ_JSON}, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "0.5"}}"#
        ),
    );
    expect_err(&e, BASE, &["nested_offset is \"0.5\", expected a number"]);
}

// ------------------------------------------------------------------- files

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// File names in `dir`, sorted (to see that no output or temp file was
/// left behind).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_format_err_names_file(err: &Error, file: &Path, needle: &str) {
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Format { .. }),
        "expected Error::Format, got {err:?}"
    );
    assert!(
        msg.contains(&file.display().to_string()),
        "message does not name the file: {msg}"
    );
    assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
}

#[test]
fn truncated_and_non_safetensors_files_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = serialize(&valid_plain());

    for cut in [1, 8, good.len() / 2, good.len() - 5] {
        let p = write_file(dir.path(), "cut.safetensors", &good[..good.len() - cut]);
        let err = MappedFile::open(&p).unwrap().safetensors().unwrap_err();
        assert_format_err_names_file(&err, &p, "not a valid safetensors file");
    }
    let p = write_file(
        dir.path(),
        "text.safetensors",
        b"this is not a safetensors file at all",
    );
    let err = MappedFile::open(&p).unwrap().safetensors().unwrap_err();
    assert_format_err_names_file(&err, &p, "not a valid safetensors file");

    let p = write_file(dir.path(), "empty.safetensors", b"");
    let err = MappedFile::open(&p).unwrap().safetensors().unwrap_err();
    assert_format_err_names_file(&err, &p, "0 bytes");

    let err = MappedFile::open(dir.path()).unwrap_err();
    assert_format_err_names_file(
        &err,
        dir.path(),
        "a directory; inputs must be regular files",
    );

    let missing = dir.path().join("missing.safetensors");
    let err = MappedFile::open(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.safetensors"), "{err}");

    // The whole-file tools give the same errors and write nothing.
    let p = write_file(dir.path(), "cut.safetensors", &good[..good.len() - 3]);
    let out = dir.path().join("out.safetensors");
    let before = listing(dir.path());
    let err = dequantize_file(&p, &out, None, Device::Cpu).unwrap_err();
    assert_format_err_names_file(&err, &p, "not a valid safetensors file");
    assert_eq!(listing(dir.path()), before);
}

/// Bytes of `v`'s elements, little-endian.
fn le_bytes<T: Element>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

#[test]
fn dequantize_file_converts_4bit_tensors_and_copies_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let a = plain(20, &[9, 35], DType::BF16, 64);
    let b = double(21, &[3, 300], DType::F16, 32, 0.01);
    let mut e = entries("m.q_proj.weight", &a);
    e.extend(entries("m.v_proj.weight", &b));
    let norm = f32_buf(&[1.0, -2.0, 3.5]);
    let ids = TensorBuf {
        dtype: Dtype::I64,
        shape: vec![2, 2],
        data: (0..32).collect(),
    };
    e.insert("m.norm.weight".into(), norm.clone());
    e.insert("m.ids".into(), ids.clone());
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(e.iter().map(|(k, v)| (k.clone(), v)), Some(meta.clone())).unwrap();
    let input = write_file(dir.path(), "in.safetensors", &bytes);

    for (dtype, device) in [
        (None, Device::Cpu),
        (Some(DType::F32), Device::Cpu),
        (Some(DType::BF16), Device::Sim),
    ] {
        if device.check_available().is_err() {
            continue;
        }
        let out = dir.path().join("out.safetensors");
        let report = dequantize_file(&input, &out, dtype, device).unwrap();
        assert_eq!(report.converted, ["m.q_proj.weight", "m.v_proj.weight"]);
        assert_eq!(report.copied, ["m.ids", "m.norm.weight"]);

        let f = MappedFile::open(&out).unwrap();
        assert_eq!(f.safetensors_metadata().unwrap(), Some(meta.clone()));
        let st = f.safetensors().unwrap();
        let mut names = st.names();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "m.ids",
                "m.norm.weight",
                "m.q_proj.weight",
                "m.v_proj.weight"
            ]
        );
        for (name, t) in [("m.q_proj.weight", &a), ("m.v_proj.weight", &b)] {
            let v = st.tensor(name).unwrap();
            let want_dtype = dtype.unwrap_or(t.dtype);
            assert_eq!(v.dtype(), want_dtype.safetensors(), "{name}");
            assert_eq!(v.shape(), t.shape.as_slice(), "{name}");
            let want = match want_dtype {
                DType::F32 => {
                    le_bytes(&tli_kernels::nf4::dequant::dequantize::<f32>(&t.view()).unwrap())
                }
                DType::BF16 => {
                    le_bytes(&tli_kernels::nf4::dequant::dequantize::<bf16>(&t.view()).unwrap())
                }
                DType::F16 => {
                    le_bytes(&tli_kernels::nf4::dequant::dequantize::<f16>(&t.view()).unwrap())
                }
            };
            assert!(
                v.data() == want.as_slice(),
                "{name}: dequantized bytes differ ({device})"
            );
        }
        for (name, buf) in [("m.norm.weight", &norm), ("m.ids", &ids)] {
            let v = st.tensor(name).unwrap();
            assert_eq!(
                (v.dtype(), v.shape(), v.data()),
                (buf.dtype, buf.shape.as_slice(), buf.data.as_slice())
            );
        }
    }
    assert_eq!(listing(dir.path()), ["in.safetensors", "out.safetensors"]);
}

#[test]
fn dequantize_file_refuses_fp4_and_malformed_tensors_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = valid_plain();
    let qs = e
        .remove(&format!("{BASE}.quant_state.bitsandbytes__nf4"))
        .unwrap();
    e.insert(format!("{BASE}.quant_state.bitsandbytes__fp4"), qs);
    let input = write_file(dir.path(), "fp4.safetensors", &serialize(&e));
    let out = dir.path().join("out.safetensors");
    let err = dequantize_file(&input, &out, None, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fp4.safetensors") && err.contains(BASE) && err.contains("only nf4"),
        "{err}"
    );
    assert!(!out.exists());

    let mut e = valid_plain();
    e.insert(format!("{BASE}.absmax"), f32_buf(&[1.0]));
    let input = write_file(dir.path(), "bad.safetensors", &serialize(&e));
    let err = dequantize_file(&input, &out, None, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("has 1 elements"),
        "{err}"
    );
    assert_eq!(listing(dir.path()), ["bad.safetensors", "fp4.safetensors"]);
}

#[test]
fn writer_matches_the_safetensors_crate_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = valid_double();
    e.insert("z.bias".into(), f32_buf(&[0.25; 7]));
    e.insert(
        "y.half".into(),
        TensorBuf {
            dtype: Dtype::BF16,
            shape: vec![3],
            data: vec![1, 2, 3, 4, 5, 6],
        },
    );
    let want = serialize(&e);
    let out = dir.path().join("w.safetensors");
    let tensors = e
        .iter()
        .map(|(k, v)| OutTensor::bytes(k.clone(), v.dtype, v.shape.clone(), v.data.as_slice()))
        .collect();
    let mut seen = Vec::new();
    write_safetensors(&out, tensors, None, &mut |name, n| {
        seen.push((name.to_string(), n))
    })
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), want);
    assert_eq!(seen.len(), e.len());
    assert_eq!(listing(dir.path()), ["w.safetensors"]);
}

#[test]
fn failed_write_leaves_no_file_and_keeps_an_existing_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let good = || OutTensor::bytes("a", Dtype::F32, vec![2], vec![0u8; 8]);

    // A tensor whose producer fails part way.
    let failing = OutTensor::deferred("b", Dtype::F32, vec![1000], |w| {
        w.write_all(&[0u8; 100]).unwrap();
        Err(Error::Format {
            path: "producer".into(),
            reason: "deliberate failure".into(),
        })
    });
    let err = write_safetensors(&out, vec![good(), failing], None, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("deliberate failure"), "{err}");
    assert!(
        listing(dir.path()).is_empty(),
        "left behind: {:?}",
        listing(dir.path())
    );

    // A producer that writes the wrong number of bytes.
    let short = OutTensor::deferred("b", Dtype::F32, vec![10], |w| {
        w.write_all(&[0u8; 36]).map_err(|e| Error::Format {
            path: "producer".into(),
            reason: e.to_string(),
        })
    });
    let err = write_safetensors(&out, vec![good(), short], None, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `b`: wrote 36 bytes") && err.contains("expected 40"),
        "{err}"
    );
    assert!(
        listing(dir.path()).is_empty(),
        "left behind: {:?}",
        listing(dir.path())
    );

    // Bytes that do not match dtype × shape, and duplicate names.
    let bad = OutTensor::bytes("c", Dtype::F16, vec![3], vec![0u8; 5]);
    let err = write_safetensors(&out, vec![bad], None, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `c`: 5 bytes given") && err.contains("(6 bytes)"),
        "{err}"
    );
    let err = write_safetensors(&out, vec![good(), good()], None, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor `a` appears twice"), "{err}");
    assert!(listing(dir.path()).is_empty());

    // An existing file survives a failed rewrite untouched.
    std::fs::write(&out, b"previous contents").unwrap();
    let failing = OutTensor::deferred("b", Dtype::F32, vec![1], |_| {
        Err(Error::Format {
            path: "producer".into(),
            reason: "deliberate failure".into(),
        })
    });
    write_safetensors(&out, vec![good(), failing], None, &mut |_, _| {}).unwrap_err();
    assert_eq!(std::fs::read(&out).unwrap(), b"previous contents");
    assert_eq!(listing(dir.path()), ["out.safetensors"]);

    // And a successful write replaces it.
    write_safetensors(&out, vec![good()], None, &mut |_, _| {}).unwrap();
    let f = MappedFile::open(&out).unwrap();
    assert_eq!(f.safetensors().unwrap().names(), ["a"]);
    assert_eq!(listing(dir.path()), ["out.safetensors"]);
}

#[test]
fn output_into_a_missing_directory_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/dir/out.safetensors");
    let err = write_safetensors(&out, vec![], None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}
