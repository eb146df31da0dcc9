//! Swahili–English word pairs: the list format, its parser, and the two lists
//! shipped with the crate.
//!
//! # Format
//!
//! UTF-8 text, one pair per line, `swahili<TAB>english` (`→` marks the tab):
//!
//! ```text
//! # numbers
//! moja→one
//! kumi na moja→eleven
//! ```
//!
//! * Blank lines (empty or whitespace only) and lines whose first
//!   non-whitespace character is `#` are ignored.
//! * Every other line holds exactly two fields separated by exactly one tab.
//!   Whitespace around each field is trimmed; neither field may then be empty
//!   or contain a control character. A field may contain spaces (phrases).
//! * Lines may end in `\n` or `\r\n`; a leading byte-order mark is skipped.
//! * A Swahili entry may appear only once per list (compared
//!   case-insensitively), so a repeated pair and a Swahili word given two
//!   glosses are both errors.
//!
//! Every error names the list and the 1-based line and quotes the line.
//!
//! # Shipped lists
//!
//! [`TRAIN_TSV`] (at least 600 pairs) and [`CONTROL_TSV`] (63 pairs, never
//! trained on) are written for this crate from common vocabulary and share
//! no Swahili word; `data/README.md` gives their conventions and licence.
//! [`shipped`] parses both and checks they are disjoint.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// The shipped training list, `data/sw-en-train.tsv`.
pub const TRAIN_TSV: &str = include_str!("../data/sw-en-train.tsv");

/// The shipped control list, `data/sw-en-control.tsv`: pairs held out from
/// training to measure how alignment generalises to unseen words.
pub const CONTROL_TSV: &str = include_str!("../data/sw-en-control.tsv");

/// The name errors give for [`TRAIN_TSV`].
pub const TRAIN_SOURCE: &str = "data/sw-en-train.tsv";

/// The name errors give for [`CONTROL_TSV`].
pub const CONTROL_SOURCE: &str = "data/sw-en-control.tsv";

/// How many characters of an offending line an error quotes.
const QUOTE_CHARS: usize = 80;

/// How many shared entries [`check_disjoint`] lists before summarising.
const SHARED_SHOWN: usize = 10;

/// One Swahili–English pair and where it was read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pair {
    /// The Swahili word or phrase, trimmed.
    pub swahili: String,
    /// The English gloss, trimmed.
    pub english: String,
    /// The 1-based line it came from.
    pub line: usize,
}

/// Parse a word-pair list (see the [module docs](self) for the format).
///
/// `source` names the list in error messages (a path or a label).
///
/// # Errors
///
/// [`Error::Pairs`] naming `source` and the line, quoting it, for the first
/// line that has no tab, more than one tab, an empty field or a control
/// character in a field, or whose Swahili entry already appeared (the message
/// names both lines).
pub fn parse_pairs(text: &str, source: &str) -> Result<Vec<Pair>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pairs: Vec<Pair> = Vec::new();
    // Lower-cased Swahili entry -> index into `pairs`.
    let mut seen: HashMap<String, usize> = HashMap::new();

    for (index, raw) in text.split('\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let bad = |what: String| Error::Pairs {
            source_name: source.to_string(),
            line,
            reason: format!("{what} in {}", quote(raw)),
        };

        let fields: Vec<&str> = raw.split('\t').collect();
        let (swahili, english) = match fields.as_slice() {
            [_] => {
                return Err(bad(
                    "no tab between the Swahili and the English field".to_string()
                ));
            }
            [sw, en] => (sw.trim(), en.trim()),
            _ => {
                return Err(bad(format!(
                    "{} tabs where exactly one must separate the Swahili and the English field",
                    fields.len() - 1
                )));
            }
        };
        for (name, value) in [("Swahili", swahili), ("English", english)] {
            if value.is_empty() {
                return Err(bad(format!("empty {name} field")));
            }
            if let Some(c) = value.chars().find(|c| c.is_control()) {
                return Err(bad(format!(
                    "the {name} field {value:?} contains the control character U+{:04X}",
                    u32::from(c)
                )));
            }
        }

        let key = swahili.to_lowercase();
        if let Some(&first) = seen.get(&key) {
            let earlier = &pairs[first];
            let what = if earlier.english.to_lowercase() == english.to_lowercase() {
                format!(
                    "duplicate pair {swahili:?} / {english:?} (first on line {})",
                    earlier.line
                )
            } else {
                format!(
                    "duplicate Swahili entry {swahili:?}: line {} gives {:?}, this line {english:?}",
                    earlier.line, earlier.english
                )
            };
            return Err(bad(what));
        }
        seen.insert(key, pairs.len());
        pairs.push(Pair {
            swahili: swahili.to_string(),
            english: english.to_string(),
            line,
        });
    }
    Ok(pairs)
}

/// Read and parse a word-pair list from a file; errors name the file by its
/// path as given.
///
/// # Errors
///
/// [`Error::Io`] naming the file if it cannot be read; [`Error::Format`] if
/// it is not a regular file or is larger than
/// [`max_text_bytes`](crate::io::max_text_bytes); [`Error::Pairs`]
/// naming the file and the line if the file is not valid UTF-8 (with the
/// byte offset) or a line is malformed or repeated (see [`parse_pairs`]).
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    let bytes = crate::io::read_input(path, crate::io::max_text_bytes())?;
    let source = path.display().to_string();
    match std::str::from_utf8(&bytes) {
        Ok(text) => parse_pairs(text, &source),
        Err(e) => Err(utf8_error(&bytes, e.valid_up_to(), source)),
    }
}

/// Check that no control entry repeats a training entry: no pair, and no
/// Swahili word (compared case-insensitively) even with a different gloss,
/// is in both lists.
///
/// # Errors
///
/// [`Error::PairsOverlap`] listing the shared entries (the first ten, then a
/// count) with their line numbers in both lists.
pub fn check_disjoint(train: &[Pair], control: &[Pair]) -> Result<()> {
    let index: HashMap<String, &Pair> = train
        .iter()
        .map(|p| (p.swahili.to_lowercase(), p))
        .collect();
    let shared: Vec<String> = control
        .iter()
        .filter_map(|c| {
            let t = index.get(&c.swahili.to_lowercase())?;
            Some(if t.english.to_lowercase() == c.english.to_lowercase() {
                format!(
                    "{:?} / {:?} (training line {}, control line {})",
                    c.swahili, c.english, t.line, c.line
                )
            } else {
                format!(
                    "{:?} (training line {} {:?}, control line {} {:?})",
                    c.swahili, t.line, t.english, c.line, c.english
                )
            })
        })
        .collect();
    if shared.is_empty() {
        return Ok(());
    }
    let mut list = shared[..shared.len().min(SHARED_SHOWN)].join("; ");
    if shared.len() > SHARED_SHOWN {
        list.push_str(&format!("; and {} more", shared.len() - SHARED_SHOWN));
    }
    Err(Error::PairsOverlap {
        count: shared.len(),
        shared: list,
    })
}

/// The shipped training and control lists, parsed and checked disjoint.
///
/// # Errors
///
/// None for the lists as shipped (the tests hold them to that); an edited
/// list gives [`Error::Pairs`] naming [`TRAIN_SOURCE`] or [`CONTROL_SOURCE`],
/// or [`Error::PairsOverlap`].
pub fn shipped() -> Result<(Vec<Pair>, Vec<Pair>)> {
    let train = parse_pairs(TRAIN_TSV, TRAIN_SOURCE)?;
    let control = parse_pairs(CONTROL_TSV, CONTROL_SOURCE)?;
    check_disjoint(&train, &control)?;
    Ok((train, control))
}

/// A line quoted for an error message (escapes visible), cut after
/// [`QUOTE_CHARS`] characters.
fn quote(line: &str) -> String {
    let total = line.chars().count();
    if total <= QUOTE_CHARS {
        return format!("{line:?}");
    }
    let head: String = line.chars().take(QUOTE_CHARS).collect();
    format!("{head:?}... ({total} characters)")
}

/// The error for text that is not UTF-8 at byte `at`: the line holding that
/// byte, its column, and the line quoted with the bad bytes replaced.
fn utf8_error(bytes: &[u8], at: usize, source_name: String) -> Error {
    let before = &bytes[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = bytes[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| at + i);
    let text = String::from_utf8_lossy(&bytes[start..end]);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    Error::Pairs {
        source_name,
        line,
        reason: format!(
            "invalid UTF-8 at byte {at} (column {}) in {}",
            at - start + 1,
            quote(text)
        ),
    }
}
