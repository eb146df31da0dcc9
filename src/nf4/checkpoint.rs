//! bitsandbytes 4-bit tensors in safetensors files, as transformers and
//! bitsandbytes write them, and whole-file quantize / dequantize.
//!
//! # The serialized form
//!
//! `Linear4bit._save_to_state_dict` stores the packed weight under its own
//! name and the entries of `QuantState.as_dict(packed=True)` beside it. For a
//! weight `P.weight` of `n` elements in `nblocks = ceil(n / blocksize)`
//! blocks:
//!
//! | key | dtype | shape |
//! | --- | --- | --- |
//! | `P.weight` | `U8` | `[ceil(n/2), 1]` |
//! | `P.weight.absmax` | `F32` (`U8` when double-quantized) | `[nblocks]` |
//! | `P.weight.quant_map` | `F32` | `[16]` |
//! | `P.weight.nested_absmax` (double quant) | `F32` | `[ceil(nblocks/256)]` |
//! | `P.weight.nested_quant_map` (double quant) | `F32` | `[256]` |
//! | `P.weight.quant_state.bitsandbytes__nf4` | `U8` | `[len]` |
//!
//! The last is the UTF-8 bytes of `json.dumps` of the non-tensor fields, in
//! this order and with Python's default separators:
//!
//! ```text
//! {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 5],
//!  "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.012299999594688416}
//! ```
//!
//! (one line; the `nested_*` fields only when double-quantized). `dtype` is
//! torch's name without the `torch.` prefix, `shape` a list of ints, and
//! `nested_offset` the f32 offset widened to a Python float and printed with
//! `repr`. [`quant_state_json`] reproduces those bytes exactly.
//!
//! # Decisions
//!
//! * **Only NF4.** A tensor stored as FP4 (`...bitsandbytes__fp4`, or
//!   `"quant_type": "fp4"`) is an error saying so, never silently copied.
//! * **The stored `quant_map` must be the NF4 table.** bitsandbytes writes
//!   the table but its dequantizer ignores it and uses the built-in one; a
//!   file with a different table therefore does not mean what it seems to,
//!   and [`read_nf4`] rejects it, naming the first differing entry. The
//!   nested (8-bit) map, by contrast, *is* data bitsandbytes uses, so any
//!   256-entry f32 table is accepted.
//! * **Double quantization is detected by content**: `absmax` of dtype `U8`,
//!   a `nested_*` key, or a `nested_*` JSON field. Whichever is found, all of
//!   them must be present and consistent.
//! * **Lenient where bitsandbytes is**: the packed weight may have any shape
//!   with `ceil(n/2)` elements (bitsandbytes flattens it); unknown JSON fields
//!   are ignored; `dtype` accepts any spelling [`DType::from_str`] does.
//! * `nested_offset` is read as a Python float (f64) and then rounded to f32,
//!   as `torch.tensor(float(...))` does.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use half::{bf16, f16};
use rayon::prelude::*;
use regex::Regex;
use safetensors::{Dtype, SafeTensors, View};
use serde_json::{Map, Value};

use super::quantize::{QuantizeOptions, quantize};
use super::{DoubleQuant, NF4_CODE, Nf4Tensor, Scales, check_blocksize, num_blocks, packed_len};
use crate::io::{MappedFile, OutTensor, write_safetensors};
use crate::{DType, Device, Element, Error, Result};

/// What joins a weight's name and its quant type in the quant-state key:
/// `P.weight` + this + `nf4`.
pub const QUANT_STATE_INFIX: &str = ".quant_state.bitsandbytes__";
/// Suffix of the quant-state key of an NF4 weight.
pub const NF4_QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";
/// Suffix of the per-block scales (f32, or u8 codes when double-quantized).
pub const ABSMAX_SUFFIX: &str = ".absmax";
/// Suffix of the 16-entry code table.
pub const QUANT_MAP_SUFFIX: &str = ".quant_map";
/// Suffix of the nested (second-level) absmax, double quant only.
pub const NESTED_ABSMAX_SUFFIX: &str = ".nested_absmax";
/// Suffix of the nested 256-entry code map, double quant only.
pub const NESTED_QUANT_MAP_SUFFIX: &str = ".nested_quant_map";
/// Name suffix the default `quantize` selection looks for (the attention
/// and MLP projections of Llama-style models).
pub const DEFAULT_QUANTIZE_SUFFIX: &str = "proj.weight";

const ALL_COMPANION_SUFFIXES: [&str; 5] = [
    ABSMAX_SUFFIX,
    QUANT_MAP_SUFFIX,
    NESTED_ABSMAX_SUFFIX,
    NESTED_QUANT_MAP_SUFFIX,
    NF4_QUANT_STATE_SUFFIX,
];

/// Every bitsandbytes 4-bit tensor in `st`, whatever its quant type: pairs
/// of base name (`P.weight`) and quant type (`nf4`, `fp4`, ...) taken from
/// the `P.weight.quant_state.bitsandbytes__TYPE` keys, sorted.
pub fn find_4bit_tensors(st: &SafeTensors<'_>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = st
        .names()
        .into_iter()
        .filter_map(|name| {
            let at = name.rfind(QUANT_STATE_INFIX)?;
            let qt = &name[at + QUANT_STATE_INFIX.len()..];
            (at > 0 && !qt.is_empty() && !qt.contains('.'))
                .then(|| (name[..at].to_string(), qt.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// Base names (`P.weight`) of every NF4 tensor in `st`, found by their
/// `P.weight.quant_state.bitsandbytes__nf4` key, sorted.
pub fn find_nf4_tensors(st: &SafeTensors<'_>) -> Vec<String> {
    find_4bit_tensors(st)
        .into_iter()
        .filter(|(_, qt)| qt == "nf4")
        .map(|(base, _)| base)
        .collect()
}

/// The exact keys bitsandbytes writes for NF4 weight `base`, in its order.
pub fn nf4_keys(base: &str, double_quant: bool) -> Vec<String> {
    let mut keys = vec![
        base.to_string(),
        format!("{base}{ABSMAX_SUFFIX}"),
        format!("{base}{QUANT_MAP_SUFFIX}"),
    ];
    if double_quant {
        keys.push(format!("{base}{NESTED_ABSMAX_SUFFIX}"));
        keys.push(format!("{base}{NESTED_QUANT_MAP_SUFFIX}"));
    }
    keys.push(format!("{base}{NF4_QUANT_STATE_SUFFIX}"));
    keys
}

/// Whether `name` is one of the keys a 4-bit tensor `base` may own.
fn is_companion_of(name: &str, base: &str) -> bool {
    name == base
        || name.strip_prefix(base).is_some_and(|rest| {
            ALL_COMPANION_SUFFIXES.contains(&rest) || rest.starts_with(QUANT_STATE_INFIX)
        })
}

/// Errors while reading one 4-bit tensor: every message is
/// `FILE: tensor `BASE`: what is wrong`.
struct Reader<'a, 'd> {
    st: &'a SafeTensors<'d>,
    base: &'a str,
    path: &'a Path,
}

impl<'d> Reader<'_, 'd> {
    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("tensor `{}`: {reason}", self.base))
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base)
    }

    fn has(&self, suffix: &str) -> bool {
        self.st.tensor(&self.key(suffix)).is_ok()
    }

    /// The tensor `base + suffix`, which must exist and have `dtype`.
    fn tensor(&self, suffix: &str, dtype: Dtype) -> Result<safetensors::tensor::TensorView<'d>> {
        let key = self.key(suffix);
        let v = self
            .st
            .tensor(&key)
            .map_err(|_| self.err(format!("missing key `{key}`")))?;
        if v.dtype() != dtype {
            return Err(self.err(format!(
                "`{key}` has dtype {:?} (shape {:?}), expected {dtype:?}",
                v.dtype(),
                v.shape()
            )));
        }
        Ok(v)
    }

    /// Check a tensor holds `want` elements, naming what they are.
    fn check_len(
        &self,
        suffix: &str,
        v: &safetensors::tensor::TensorView<'_>,
        want: usize,
        what: &str,
    ) -> Result<()> {
        let got: usize = v.shape().iter().product();
        if got != want {
            return Err(self.err(format!(
                "`{}` has {got} elements (shape {:?}), expected {want} ({what})",
                self.key(suffix),
                v.shape()
            )));
        }
        Ok(())
    }
}

fn f32s_from_le(bytes: &[u8]) -> Vec<f32> {
    let (chunks, _) = bytes.as_chunks::<4>();
    chunks.iter().map(|c| f32::from_le_bytes(*c)).collect()
}

fn f32s_to_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The parsed quant-state JSON.
struct QuantStateJson {
    blocksize: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` when any nested field is present.
    nested: Option<(usize, f32)>,
    /// Whether any `nested_*` field is present at all.
    any_nested_field: bool,
}

impl Reader<'_, '_> {
    fn quant_state(&self) -> Result<QuantStateJson> {
        let key = self.key(NF4_QUANT_STATE_SUFFIX);
        let Ok(v) = self.st.tensor(&key) else {
            // Say what it is when it is another 4-bit type.
            let other: Vec<String> = self
                .st
                .names()
                .into_iter()
                .filter_map(|n| {
                    n.strip_prefix(self.base)?
                        .strip_prefix(QUANT_STATE_INFIX)
                        .map(str::to_string)
                })
                .collect();
            return Err(if let Some(qt) = other.first() {
                self.err(format!(
                    "stored as bitsandbytes {qt:?} (key `{}{QUANT_STATE_INFIX}{qt}`); only nf4 is supported",
                    self.base
                ))
            } else {
                self.err(format!(
                    "missing key `{key}` (not a bitsandbytes NF4 tensor)"
                ))
            });
        };
        if v.dtype() != Dtype::U8 {
            return Err(self.err(format!(
                "`{key}` has dtype {:?}, expected U8 (UTF-8 JSON bytes)",
                v.dtype()
            )));
        }
        let text = std::str::from_utf8(v.data())
            .map_err(|e| self.err(format!("`{key}` is not UTF-8 text: {e}")))?;
        let shown: String = text.chars().take(200).collect();
        let json: Value = serde_json::from_str(text)
            .map_err(|e| self.err(format!("`{key}` is not valid JSON ({e}): {shown:?}")))?;
        let Value::Object(obj) = json else {
            return Err(self.err(format!("`{key}` is not a JSON object: {shown:?}")));
        };

        let quant_type = self.str_field(&obj, "quant_type")?;
        if quant_type != "nf4" {
            return Err(self.err(format!(
                "quant-state quant_type is {quant_type:?}; only \"nf4\" is supported"
            )));
        }
        let blocksize = self.uint_field(&obj, "blocksize")?;
        check_blocksize("nf4 checkpoint", blocksize).map_err(|_| {
            self.err(format!(
                "quant-state blocksize {blocksize} is not one of 32, 64, 128, 256, 512, 1024, 2048, 4096"
            ))
        })?;
        let dtype_name = self.str_field(&obj, "dtype")?;
        let dtype = DType::from_str(dtype_name).map_err(|_| {
            self.err(format!(
                "quant-state dtype {dtype_name:?} is not supported (expected \"bfloat16\", \"float16\" or \"float32\")"
            ))
        })?;
        let shape = match self.field(&obj, "shape")? {
            Value::Array(items) => items
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    self.err(format!(
                        "quant-state shape {} is not a list of non-negative integers",
                        Value::Array(items.clone())
                    ))
                })?,
            other => {
                return Err(self.err(format!(
                    "quant-state shape is {other}, expected a list of integers"
                )));
            }
        };

        let nested_fields = ["nested_blocksize", "nested_dtype", "nested_offset"];
        let any_nested_field = nested_fields.iter().any(|f| obj.contains_key(*f));
        let nested = if any_nested_field {
            let nbs = self.uint_field(&obj, "nested_blocksize")?;
            if !nbs.is_power_of_two() {
                return Err(self.err(format!(
                    "quant-state nested_blocksize {nbs} is not a power of two"
                )));
            }
            let nd = self.str_field(&obj, "nested_dtype")?;
            if DType::from_str(nd).ok() != Some(DType::F32) {
                return Err(self.err(format!(
                    "quant-state nested_dtype is {nd:?}, expected \"float32\""
                )));
            }
            let off = self.field(&obj, "nested_offset")?;
            let offset = off.as_f64().ok_or_else(|| {
                self.err(format!(
                    "quant-state nested_offset is {off}, expected a number"
                ))
            })?;
            // Python float → torch f32 tensor: round the f64 to f32.
            Some((nbs, offset as f32))
        } else {
            None
        };
        Ok(QuantStateJson {
            blocksize,
            dtype,
            shape,
            nested,
            any_nested_field,
        })
    }

    fn field<'v>(&self, obj: &'v Map<String, Value>, name: &str) -> Result<&'v Value> {
        obj.get(name).ok_or_else(|| {
            let have: Vec<&str> = obj.keys().map(String::as_str).collect();
            self.err(format!(
                "quant-state JSON has no `{name}` field (fields present: {have:?})"
            ))
        })
    }

    fn str_field<'v>(&self, obj: &'v Map<String, Value>, name: &str) -> Result<&'v str> {
        let v = self.field(obj, name)?;
        v.as_str()
            .ok_or_else(|| self.err(format!("quant-state {name} is {v}, expected a string")))
    }

    fn uint_field(&self, obj: &Map<String, Value>, name: &str) -> Result<usize> {
        let v = self.field(obj, name)?;
        v.as_u64()
            .and_then(|u| usize::try_from(u).ok())
            .ok_or_else(|| {
                self.err(format!(
                    "quant-state {name} is {v}, expected a non-negative integer"
                ))
            })
    }
}

/// Read the NF4 tensor `base` (e.g. `model.layers.0.mlp.up_proj.weight`)
/// from `st`, checking every key, dtype, length and quant-state field.
///
/// `path_label` names the file in error messages.
///
/// # Errors
/// [`Error::Format`] naming the file, the tensor and the mismatch: a missing
/// key; a tensor of the wrong dtype or length (the packed weight must hold
/// `ceil(n/2)` bytes, absmax one value per block, ...); quant-state bytes
/// that are not UTF-8 JSON, lack a field, or have a field of the wrong type;
/// a quant type other than `nf4` (FP4 tensors included); a block size
/// bitsandbytes does not produce; a `quant_map` that is not the NF4 table;
/// partial double-quantization data.
pub fn read_nf4(st: &SafeTensors<'_>, base: &str, path_label: &Path) -> Result<Nf4Tensor> {
    let r = Reader {
        st,
        base,
        path: path_label,
    };
    let qs = r.quant_state()?;

    let n = qs
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| r.err(format!("quant-state shape {:?} overflows", qs.shape)))?;
    if n == 0 {
        return Err(r.err(format!("quant-state shape {:?} has no elements", qs.shape)));
    }
    let nb = num_blocks(n, qs.blocksize);
    let ctx = format!(
        "n = {n} for shape {:?}, blocksize {}",
        qs.shape, qs.blocksize
    );

    let packed = r.tensor("", Dtype::U8)?;
    r.check_len(
        "",
        &packed,
        packed_len(n),
        &format!("ceil(n/2) packed bytes, {ctx}"),
    )?;

    let qmap = r.tensor(QUANT_MAP_SUFFIX, Dtype::F32)?;
    r.check_len(QUANT_MAP_SUFFIX, &qmap, 16, "the NF4 code table")?;
    let table = f32s_from_le(qmap.data());
    if let Some(i) = (0..16).find(|&i| table[i] != NF4_CODE[i]) {
        return Err(r.err(format!(
            "`{}` is not the NF4 table: entry {i} is {:?}, expected {:?} \
             (bitsandbytes dequantizes with its built-in table, so this file would not mean what it stores)",
            r.key(QUANT_MAP_SUFFIX),
            table[i],
            NF4_CODE[i]
        )));
    }

    let absmax_key = r.key(ABSMAX_SUFFIX);
    let absmax_dtype = st
        .tensor(&absmax_key)
        .map_err(|_| r.err(format!("missing key `{absmax_key}`")))?
        .dtype();
    let double = absmax_dtype == Dtype::U8
        || r.has(NESTED_ABSMAX_SUFFIX)
        || r.has(NESTED_QUANT_MAP_SUFFIX)
        || qs.any_nested_field;

    let scales = if double {
        let why = || {
            let mut s = Vec::new();
            if absmax_dtype == Dtype::U8 {
                s.push(format!("`{absmax_key}` is U8"));
            }
            for suffix in [NESTED_ABSMAX_SUFFIX, NESTED_QUANT_MAP_SUFFIX] {
                if r.has(suffix) {
                    s.push(format!("`{}` exists", r.key(suffix)));
                }
            }
            if qs.any_nested_field {
                s.push("the quant state has nested_* fields".to_string());
            }
            s.join(", ")
        };
        if absmax_dtype != Dtype::U8 {
            return Err(r.err(format!(
                "double-quantized ({}) but `{absmax_key}` has dtype {absmax_dtype:?}, expected U8",
                why()
            )));
        }
        let Some((nested_blocksize, offset)) = qs.nested else {
            return Err(r.err(format!(
                "double-quantized ({}) but the quant-state JSON has no nested_blocksize/nested_dtype/nested_offset",
                why()
            )));
        };
        if !r.has(NESTED_ABSMAX_SUFFIX) || !r.has(NESTED_QUANT_MAP_SUFFIX) {
            let missing = if r.has(NESTED_ABSMAX_SUFFIX) {
                NESTED_QUANT_MAP_SUFFIX
            } else {
                NESTED_ABSMAX_SUFFIX
            };
            return Err(r.err(format!(
                "double-quantized ({}) but key `{}` is missing",
                why(),
                r.key(missing)
            )));
        }
        let q = r.tensor(ABSMAX_SUFFIX, Dtype::U8)?;
        r.check_len(ABSMAX_SUFFIX, &q, nb, &format!("one code per block, {ctx}"))?;
        let a2 = r.tensor(NESTED_ABSMAX_SUFFIX, Dtype::F32)?;
        let nb2 = nb.div_ceil(nested_blocksize);
        r.check_len(
            NESTED_ABSMAX_SUFFIX,
            &a2,
            nb2,
            &format!("ceil({nb} blocks / nested blocksize {nested_blocksize})"),
        )?;
        let c2 = r.tensor(NESTED_QUANT_MAP_SUFFIX, Dtype::F32)?;
        r.check_len(NESTED_QUANT_MAP_SUFFIX, &c2, 256, "the 8-bit code map")?;
        Scales::Double(DoubleQuant {
            qabsmax: q.data().to_vec(),
            absmax2: f32s_from_le(a2.data()),
            code2: f32s_from_le(c2.data()),
            offset,
            nested_blocksize,
        })
    } else {
        let a = r.tensor(ABSMAX_SUFFIX, Dtype::F32)?;
        r.check_len(ABSMAX_SUFFIX, &a, nb, &format!("one per block, {ctx}"))?;
        Scales::Plain(f32s_from_le(a.data()))
    };

    let t = Nf4Tensor {
        packed: packed.data().to_vec(),
        scales,
        blocksize: qs.blocksize,
        shape: qs.shape,
        dtype: qs.dtype,
    };
    // Every size was checked above; this is the ops' own check, kept so the
    // two can never disagree about what a readable tensor is.
    t.view().validate("nf4 checkpoint").map_err(|e| r.err(e))?;
    Ok(t)
}

/// An owned tensor for a safetensors file: dtype, shape, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorBuf {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

impl View for TensorBuf {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl View for &TensorBuf {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A float as Python's `repr` (and so `json.dumps`) prints it: the fewest
/// digits that round-trip (ties to even), fixed notation for decimal exponents −4 to 15
/// (`0.0001`, `2.5`, `65504.0`), scientific otherwise (`1e-05`,
/// `1.0000000200408773e+20`). `None` for NaN and infinities, which
/// `json.dumps` writes as non-standard tokens.
fn python_float_repr(x: f64) -> Option<String> {
    if !x.is_finite() {
        return None;
    }
    if x == 0.0 {
        return Some(if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string());
    }
    // Python prints the fewest significant digits that read back as `x`;
    // when two strings of that length do, the nearer one, ties to even.
    // Rust's `{:e}` finds the same length but may break an exact decimal tie
    // the other way (159.75552368164063 for Python's ...062), so take the
    // correctly rounded string of that length (Rust rounds ties to even)
    // when it reads back as `x`, and Rust's otherwise: then it is the only
    // candidate (next to a power of two the interval is lopsided).
    let shortest = format!("{x:e}");
    let ndigits = shortest
        .split_once('e')?
        .0
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    let nearest = format!("{x:.prec$e}", prec = ndigits.saturating_sub(1));
    let sci = if nearest.parse::<f64>() == Ok(x) {
        nearest
    } else {
        shortest
    };
    let (mantissa, exp) = sci.split_once('e')?;
    let exp: i32 = exp.parse().ok()?;
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut s = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp < 0 {
            s.push_str("0.");
            s.extend(std::iter::repeat_n('0', exp.unsigned_abs() as usize - 1));
            s.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                s.extend(std::iter::repeat_n('0', int_len - digits.len()));
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let _ = write!(
            s,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
    }
    Some(s)
}

/// The quant-state JSON bitsandbytes writes for `t`, byte for byte: the
/// fields of `QuantState.as_dict` that are not tensors, in its order,
/// formatted by Python's `json.dumps` defaults (`", "` and `": "`).
///
/// # Errors
/// [`Error::InvalidArgument`] if the double-quantization offset is NaN or
/// infinite (Python would write a token JSON does not have).
pub fn quant_state_json(t: &Nf4Tensor) -> Result<String> {
    let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        t.blocksize,
        t.dtype.torch_name(),
        shape.join(", ")
    );
    if let Scales::Double(d) = &t.scales {
        let offset = python_float_repr(f64::from(d.offset)).ok_or_else(|| {
            Error::invalid(
                "nf4 checkpoint",
                format!(
                    "double-quantization offset {} cannot be stored in JSON",
                    d.offset
                ),
            )
        })?;
        let _ = write!(
            s,
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {offset}",
            d.nested_blocksize
        );
    }
    s.push('}');
    Ok(s)
}

/// The entries bitsandbytes writes for NF4 weight `base`, in its order (see
/// [`nf4_keys`]), ready for a safetensors file.
///
/// # Errors
/// [`Error::ShapeMismatch`] / [`Error::InvalidArgument`] /
/// [`Error::InvalidBlockSize`] if `t`'s parts do not agree with each other;
/// as [`quant_state_json`].
pub fn nf4_entries(base: &str, t: &Nf4Tensor) -> Result<Vec<(String, TensorBuf)>> {
    t.view().validate("nf4 checkpoint")?;
    let json = quant_state_json(t)?;
    let n = t.numel();
    let mut out = Vec::with_capacity(6);
    let mut push = |suffix: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
        out.push((format!("{base}{suffix}"), TensorBuf { dtype, shape, data }));
    };
    push("", Dtype::U8, vec![packed_len(n), 1], t.packed.clone());
    match &t.scales {
        Scales::Plain(a) => {
            push(ABSMAX_SUFFIX, Dtype::F32, vec![a.len()], f32s_to_le(a));
            push(
                QUANT_MAP_SUFFIX,
                Dtype::F32,
                vec![16],
                f32s_to_le(&NF4_CODE),
            );
        }
        Scales::Double(d) => {
            push(
                ABSMAX_SUFFIX,
                Dtype::U8,
                vec![d.qabsmax.len()],
                d.qabsmax.clone(),
            );
            push(
                QUANT_MAP_SUFFIX,
                Dtype::F32,
                vec![16],
                f32s_to_le(&NF4_CODE),
            );
            push(
                NESTED_ABSMAX_SUFFIX,
                Dtype::F32,
                vec![d.absmax2.len()],
                f32s_to_le(&d.absmax2),
            );
            push(
                NESTED_QUANT_MAP_SUFFIX,
                Dtype::F32,
                vec![d.code2.len()],
                f32s_to_le(&d.code2),
            );
        }
    }
    let json = json.into_bytes();
    push(NF4_QUANT_STATE_SUFFIX, Dtype::U8, vec![json.len()], json);
    Ok(out)
}

/// Progress of a whole-file operation, in bytes of the input file's tensors.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// The work ahead: the byte size of every tensor in the input.
    Start {
        /// Sum over input tensors.
        total_bytes: u64,
    },
    /// One tensor (with its companion keys, for 4-bit tensors) is done.
    Done {
        /// Its name in the output.
        name: &'a str,
        /// Its input bytes.
        bytes: u64,
    },
}

/// What a whole-file operation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileReport {
    /// Tensors converted (quantized, or dequantized), by base name.
    pub converted: Vec<String>,
    /// Tensors copied unchanged.
    pub copied: Vec<String>,
}

fn input_bytes(v: &safetensors::tensor::TensorView<'_>) -> u64 {
    v.data().len() as u64
}

/// Dequantize every bitsandbytes 4-bit tensor of `input` into `output`:
/// each is written under its base name, in its original shape, as `dtype`
/// (default: the quant state's dtype). All other tensors are copied with
/// their dtype, shape and bytes unchanged, and the header's `__metadata__`
/// is kept. The output is written atomically; one tensor is dequantized at
/// a time, straight into the file, so memory stays at about one tensor.
///
/// # Errors
/// As [`dequantize_file_with_progress`].
pub fn dequantize_file(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    device: Device,
) -> Result<FileReport> {
    dequantize_file_with_progress(input, output, dtype, device, &mut |_| {})
}

/// [`dequantize_file`], reporting progress.
///
/// # Errors
/// [`Error::NoCudaDevice`] (or [`Error::InvalidArgument`] for `sim`) if
/// `device` cannot run here; [`Error::Io`] / [`Error::Format`] naming the
/// input if it cannot be read or is not safetensors; every [`read_nf4`]
/// error (all 4-bit tensors are checked before anything is written, and an
/// FP4 tensor is an error); errors of the dequantization op; [`Error::Io`]
/// naming the output. On error no output file is left behind.
pub fn dequantize_file_with_progress(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    device: Device,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<FileReport> {
    device.check_available()?;
    crate::io::refuse_input_as_output(output, &[input])?;
    let file = MappedFile::open(input)?;
    let st = file.safetensors()?;
    let metadata = file.safetensors_metadata()?;

    let mut owned: HashSet<String> = HashSet::new();
    let mut weight: HashMap<String, u64> = HashMap::new();
    let mut plans: Vec<(String, Vec<usize>, DType)> = Vec::new();
    let mut seen = HashSet::new();
    for (base, qt) in find_4bit_tensors(&st) {
        if !seen.insert(base.clone()) {
            return Err(Error::format(
                input,
                format!(
                    "tensor `{base}`: more than one quant-state key (`{base}{QUANT_STATE_INFIX}*`), last {qt:?}"
                ),
            ));
        }
        let t = read_nf4(&st, &base, input)?;
        let keys = nf4_keys(&base, matches!(t.scales, Scales::Double(_)));
        let bytes = keys
            .iter()
            .filter_map(|k| st.tensor(k).ok())
            .map(|v| input_bytes(&v))
            .sum();
        owned.extend(keys);
        weight.insert(base.clone(), bytes);
        plans.push((base, t.shape, dtype.unwrap_or(t.dtype)));
    }

    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let mut tensors = Vec::with_capacity(names.len());
    let mut report = FileReport::default();
    let mut total = 0u64;
    for name in names {
        let Ok(v) = st.tensor(name) else { continue };
        total += input_bytes(&v);
        if owned.contains(name) {
            continue;
        }
        weight.insert(name.to_string(), input_bytes(&v));
        report.copied.push(name.to_string());
        tensors.push(OutTensor::bytes(
            name,
            v.dtype(),
            v.shape().to_vec(),
            v.data(),
        ));
    }
    let st_ref = &st;
    for (base, shape, out_dtype) in plans {
        report.converted.push(base.clone());
        let name = base.clone();
        tensors.push(OutTensor::deferred(
            name,
            out_dtype.safetensors(),
            shape,
            move |w| {
                let t = read_nf4(st_ref, &base, input)?;
                match out_dtype {
                    DType::F32 => dequantize_to::<f32>(&t, device, w, output),
                    DType::BF16 => dequantize_to::<bf16>(&t, device, w, output),
                    DType::F16 => dequantize_to::<f16>(&t, device, w, output),
                }
            },
        ));
    }

    progress(Progress::Start { total_bytes: total });
    write_safetensors(output, tensors, metadata, &mut |name, _| {
        let bytes = weight.get(name).copied().unwrap_or(0);
        progress(Progress::Done { name, bytes });
    })?;
    Ok(report)
}

/// Dequantize `t` on `device` and write its elements little-endian to `w`.
fn dequantize_to<T: Element>(
    t: &Nf4Tensor,
    device: Device,
    w: &mut dyn Write,
    output: &Path,
) -> Result<()> {
    let mut out = vec![T::zeroed(); t.numel()];
    crate::ops::nf4_dequant::dequantize_into(device, &t.view(), &mut out)?;
    let bytes: &[u8] = bytemuck::cast_slice(&out);
    let res = if cfg!(target_endian = "little") {
        w.write_all(bytes)
    } else {
        // safetensors is little-endian: swap each element on big-endian hosts.
        let size = std::mem::size_of::<T>();
        bytes
            .chunks_exact(size)
            .try_for_each(|c| w.write_all(&c.iter().rev().copied().collect::<Vec<u8>>()))
    };
    res.map_err(|e| Error::io(output, e))
}

/// The tensors `tli nf4 quantize` picks when no pattern is given: 2-D,
/// non-empty, f32/bf16/f16, named `...proj.weight` (the attention and MLP
/// projections of Llama-style models, which is what transformers quantizes;
/// embeddings, norms and the LM head stay as they are).
pub fn is_default_quantize_target(name: &str, dtype: Dtype, shape: &[usize]) -> bool {
    DType::from_safetensors(dtype).is_some()
        && shape.len() == 2
        && shape.iter().all(|&d| d > 0)
        && name.ends_with(DEFAULT_QUANTIZE_SUFFIX)
}

/// Widen f32/bf16/f16 little-endian bytes to f32 (exact).
fn widen_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => {
            let (c, _) = bytes.as_chunks::<4>();
            c.par_iter().map(|c| f32::from_le_bytes(*c)).collect()
        }
        DType::BF16 => {
            let (c, _) = bytes.as_chunks::<2>();
            c.par_iter()
                .map(|c| bf16::from_bits(u16::from_le_bytes(*c)).to_f32())
                .collect()
        }
        DType::F16 => {
            let (c, _) = bytes.as_chunks::<2>();
            c.par_iter()
                .map(|c| f16::from_bits(u16::from_le_bytes(*c)).to_f32())
                .collect()
        }
    }
}

/// Quantize the selected tensors of `input` to NF4 in bitsandbytes' exact
/// serialized form and write them, with every other tensor copied unchanged
/// and the `__metadata__` kept, to `output` (atomically).
///
/// Selection: with `include`, every tensor whose name the regex matches
/// anywhere (`Regex::is_match`; anchor it for whole names); without, those
/// [`is_default_quantize_target`] accepts. Tensors that already belong to a
/// bitsandbytes 4-bit tensor (the packed weight and its companion keys) are
/// never selected: they are copied as they are.
///
/// Quantized tensors are held in memory until written (about 1/8 of their
/// f32 size); inputs are memory-mapped.
///
/// # Errors
/// As [`quantize_file_with_progress`].
pub fn quantize_file(
    input: &Path,
    output: &Path,
    opts: QuantizeOptions,
    include: Option<&Regex>,
) -> Result<FileReport> {
    quantize_file_with_progress(input, output, opts, include, &mut |_| {})
}

/// [`quantize_file`], reporting progress.
///
/// # Errors
/// [`Error::InvalidBlockSize`] before anything is read; [`Error::Io`] /
/// [`Error::Format`] naming the input; [`Error::InvalidArgument`] naming the
/// tensor when `include` matches a tensor that is not f32/bf16/f16 (a
/// decision: an explicit pattern that catches integer tensors is a mistake
/// to fix, not to skip quietly), when a matched tensor is empty, or when a
/// key the quantized form needs (`P.weight.absmax`, ...) already exists in
/// the input; [`Error::Io`] naming the output. On error no output file is
/// left behind.
pub fn quantize_file_with_progress(
    input: &Path,
    output: &Path,
    opts: QuantizeOptions,
    include: Option<&Regex>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<FileReport> {
    const OP: &str = "nf4 quantize";
    check_blocksize(OP, opts.blocksize)?;
    crate::io::refuse_input_as_output(output, &[input])?;
    let file = MappedFile::open(input)?;
    let st = file.safetensors()?;
    let metadata = file.safetensors_metadata()?;

    let bases: Vec<String> = find_4bit_tensors(&st).into_iter().map(|(b, _)| b).collect();
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let already = |name: &str| bases.iter().any(|b| is_companion_of(name, b));
    let total: u64 = names
        .iter()
        .filter_map(|n| st.tensor(n).ok())
        .map(|v| input_bytes(&v))
        .sum();
    progress(Progress::Start { total_bytes: total });

    let mut report = FileReport::default();
    let mut copied: Vec<OutTensor<'_>> = Vec::new();
    let mut weight: HashMap<String, u64> = HashMap::new();
    let mut produced: Vec<(String, TensorBuf)> = Vec::new();
    for &name in &names {
        let Ok(v) = st.tensor(name) else { continue };
        let selected = !already(name)
            && match include {
                Some(re) => re.is_match(name),
                None => is_default_quantize_target(name, v.dtype(), v.shape()),
            };
        if !selected {
            weight.insert(name.to_string(), input_bytes(&v));
            report.copied.push(name.to_string());
            copied.push(OutTensor::bytes(
                name,
                v.dtype(),
                v.shape().to_vec(),
                v.data(),
            ));
            continue;
        }
        let pattern = include.map_or(String::new(), |re| {
            format!(" (matched by `{}`)", re.as_str())
        });
        let Some(dtype) = DType::from_safetensors(v.dtype()) else {
            return Err(Error::invalid(
                OP,
                format!(
                    "{}: tensor `{name}`{pattern} has dtype {:?} (shape {:?}); only F32, BF16 and F16 tensors can be \
                     quantized (narrow the pattern)",
                    input.display(),
                    v.dtype(),
                    v.shape()
                ),
            ));
        };
        let data = widen_to_f32(dtype, v.data());
        let t = quantize(&data, v.shape(), dtype, opts).map_err(|e| {
            Error::invalid(
                OP,
                format!(
                    "{}: tensor `{name}`{pattern} ({dtype} {:?}): {e}",
                    input.display(),
                    v.shape()
                ),
            )
        })?;
        drop(data);
        produced.extend(nf4_entries(name, &t)?);
        report.converted.push(name.to_string());
        progress(Progress::Done {
            name,
            bytes: input_bytes(&v),
        });
    }

    // The new keys must not collide with anything kept from the input.
    let kept: HashSet<&str> = report.copied.iter().map(String::as_str).collect();
    for (key, _) in &produced {
        if kept.contains(key.as_str()) {
            return Err(Error::invalid(
                OP,
                format!(
                    "{}: the quantized form needs key `{key}`, but the input already has a tensor of that name",
                    input.display()
                ),
            ));
        }
    }

    let mut tensors = copied;
    tensors.extend(
        produced
            .into_iter()
            .map(|(name, b)| OutTensor::bytes(name, b.dtype, b.shape, b.data)),
    );
    write_safetensors(output, tensors, metadata, &mut |name, _| {
        if let Some(&bytes) = weight.get(name) {
            progress(Progress::Done { name, bytes });
        }
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::python_float_repr;

    /// Expected strings are what CPython's `json.dumps` prints for these
    /// f32 values widened to Python floats, including exact decimal ties
    /// (159.75552368164062) and powers of two, whose rounding interval is
    /// lopsided (2^-24 = 5.960464477539063e-08).
    #[test]
    fn float_repr_matches_python() {
        let cases: [(u32, &str); 18] = [
            (0x3c4985f0, "0.012299999594688416"),
            (0x3727c5ac, "9.999999747378752e-06"),
            (0x34a10fb0, "3.000000106112566e-07"),
            (0x47f12064, "123456.78125"),
            (0x60ad78ec, "1.0000000200408773e+20"),
            (0x0000_0000, "0.0"),
            (0x40200000, "2.5"),
            (0x3f800000, "1.0"),
            (0x477fe000, "65504.0"),
            (0x38d1b717, "9.999999747378752e-05"),
            (0x3a83126f, "0.0010000000474974513"),
            (0x5a0e1bca, "1.0000000272564224e+16"),
            (0x4b3c614e, "12345678.0"),
            (0x003671f7, "4.999999675228202e-39"),
            (1126154602, "159.75552368164062"),
            (3293950305, "-854.7715454101562"),
            (864026624, "5.960464477539063e-08"),
            (512, "7.174648137343064e-43"),
        ];
        for (bits, want) in cases {
            let x = f64::from(f32::from_bits(bits));
            assert_eq!(
                python_float_repr(x).as_deref(),
                Some(want),
                "bits {bits:#x}"
            );
            let neg = want
                .strip_prefix('-')
                .map_or(format!("-{want}"), str::to_string);
            assert_eq!(
                python_float_repr(-x).as_deref(),
                Some(neg.as_str()),
                "bits {bits:#x} negated"
            );
        }
        assert_eq!(python_float_repr(f64::NAN), None);
        assert_eq!(python_float_repr(f64::INFINITY), None);
    }
}
