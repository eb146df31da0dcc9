//! Word-pair lists: the shipped training and control lists (sizes, format,
//! no duplicates, disjoint), every parser error with its file and line, the
//! lenient parts of the format (comments, blank lines, CRLF, BOM, padding),
//! and properties: the parser never panics and round-trips what it accepts.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tli_kernels::Error;
use tli_kernels::pairs::{
    CONTROL_SOURCE, CONTROL_TSV, Pair, TRAIN_SOURCE, TRAIN_TSV, check_disjoint, parse_pairs,
    read_pairs, shipped,
};

const SRC: &str = "words.tsv";

/// The error message for `text`, which must fail to parse.
fn parse_err(text: &str) -> String {
    match parse_pairs(text, SRC) {
        Ok(p) => panic!("expected an error for {text:?}, parsed {p:?}"),
        Err(e) => e.to_string(),
    }
}

/// Assert `text` fails on `line` with a message naming the file and line and
/// containing every needle.
fn assert_parse_err(text: &str, line: usize, needles: &[&str]) {
    let err = parse_pairs(text, SRC).expect_err("expected an error");
    assert!(
        matches!(&err, Error::Pairs { source_name, line: l, .. } if source_name == SRC && *l == line),
        "wrong variant, file or line (want {SRC} line {line}): {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("{SRC}:{line}: ")),
        "message does not start with file and line: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
}

fn data_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

/// The data lines (not blank, not comments) of a list, with line numbers.
fn data_lines(text: &str) -> Vec<(usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}

// ---------------------------------------------------------------------------
// The shipped lists.

#[test]
fn shipped_lists_parse_with_expected_sizes() {
    let (train, control) = shipped().expect("shipped lists parse");
    assert!(
        train.len() >= 600,
        "training list has {} pairs",
        train.len()
    );
    assert_eq!(control.len(), 63, "control list size");
}

#[test]
fn shipped_files_match_the_embedded_lists() {
    let (train, control) = shipped().unwrap();
    assert_eq!(read_pairs(&data_path("sw-en-train.tsv")).unwrap(), train);
    assert_eq!(
        read_pairs(&data_path("sw-en-control.tsv")).unwrap(),
        control
    );
}

#[test]
fn shipped_lists_are_disjoint_in_pairs_and_words() {
    let (train, control) = shipped().unwrap();
    check_disjoint(&train, &control).unwrap();
    check_disjoint(&control, &train).unwrap();

    // Stricter than the check: no Swahili or English word (a
    // whitespace-separated token of an entry) appears in both lists, so a
    // control pair is unseen even as part of a training phrase.
    let words = |pairs: &[Pair], sw: bool| -> HashSet<String> {
        pairs
            .iter()
            .flat_map(|p| {
                let field = if sw { &p.swahili } else { &p.english };
                field
                    .split(|c: char| c.is_whitespace() || c == '-')
                    .map(str::to_lowercase)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for (lang, sw) in [("Swahili", true), ("English", false)] {
        let shared: Vec<_> = words(&train, sw)
            .intersection(&words(&control, sw))
            .cloned()
            .collect();
        assert!(shared.is_empty(), "{lang} words in both lists: {shared:?}");
    }
}

#[test]
fn shipped_lists_have_no_duplicates() {
    let (train, control) = shipped().unwrap();
    for (name, pairs) in [(TRAIN_SOURCE, &train), (CONTROL_SOURCE, &control)] {
        let mut sw = HashSet::new();
        let mut en = HashSet::new();
        for p in pairs {
            assert!(
                sw.insert(p.swahili.to_lowercase()),
                "{name}:{}: Swahili {:?} repeated",
                p.line,
                p.swahili
            );
            assert!(
                en.insert(p.english.to_lowercase()),
                "{name}:{}: English {:?} repeated",
                p.line,
                p.english
            );
        }
    }
}

#[test]
fn shipped_lines_are_clean() {
    for (name, text) in [(TRAIN_SOURCE, TRAIN_TSV), (CONTROL_SOURCE, CONTROL_TSV)] {
        assert!(!text.contains('\r'), "{name} has carriage returns");
        assert!(text.ends_with('\n'), "{name} lacks a final newline");
        assert!(
            text.starts_with('#'),
            "{name} does not start with its header comment"
        );
        for (n, line) in data_lines(text) {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 2, "{name}:{n}: not exactly one tab: {line:?}");
            for f in fields {
                assert!(!f.is_empty(), "{name}:{n}: empty field: {line:?}");
                assert_eq!(f, f.trim(), "{name}:{n}: padded field: {line:?}");
                assert!(
                    !f.contains("  "),
                    "{name}:{n}: double space in field: {line:?}"
                );
                assert!(
                    !f.chars().any(char::is_control),
                    "{name}:{n}: control character in field: {line:?}"
                );
            }
        }
    }
}

#[test]
fn shipped_line_numbers_point_at_the_pairs() {
    let (train, _) = shipped().unwrap();
    let lines: Vec<&str> = TRAIN_TSV.split('\n').collect();
    for p in &train {
        assert_eq!(
            lines[p.line - 1],
            format!("{}\t{}", p.swahili, p.english),
            "line {}",
            p.line
        );
    }
}

/// Per-category counts of a shipped list: a category is a `# name` comment
/// that follows a blank line (the header comes first, before any blank line).
fn category_counts(text: &str) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut prev_blank = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("# ").filter(|_| prev_blank) {
            counts.push((name.to_string(), 0));
        } else if !line.is_empty() && !line.starts_with('#') {
            counts.last_mut().expect("a pair before any category").1 += 1;
        }
        prev_blank = line.is_empty();
    }
    counts
}

#[test]
fn data_readme_counts_match_the_lists() {
    let readme = std::fs::read_to_string(data_path("README.md")).unwrap();
    // Rows `| category | train | control |` of the categories table.
    let number = |cell: &str| cell.trim().trim_matches('*').parse::<usize>().ok();
    let mut rows: Vec<(String, usize, usize)> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.strip_prefix('|')?.split('|').collect();
            let (train, control) = (number(cells.get(1)?)?, number(cells.get(2)?)?);
            Some((
                cells[0].trim().trim_matches('*').to_string(),
                train,
                control,
            ))
        })
        .collect();
    let total = rows.pop().expect("a total row");
    assert_eq!(total.0, "total");

    let train = category_counts(TRAIN_TSV);
    let control = category_counts(CONTROL_TSV);
    let names = |c: &[(String, usize)]| c.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&train),
        names(&control),
        "same categories, same order"
    );
    let from_files: Vec<(String, usize, usize)> = train
        .iter()
        .zip(&control)
        .map(|(t, c)| (t.0.clone(), t.1, c.1))
        .collect();
    assert_eq!(rows, from_files, "data/README.md table vs the lists");

    let (train_pairs, control_pairs) = shipped().unwrap();
    assert_eq!(total.1, train_pairs.len(), "README total (training)");
    assert_eq!(total.2, control_pairs.len(), "README total (control)");
    // Every category is represented in the control list.
    assert!(control.iter().all(|c| c.1 > 0), "{control:?}");
}

// ---------------------------------------------------------------------------
// Errors: each names the file and the line and quotes the line.

#[test]
fn line_without_tab_is_rejected() {
    assert_parse_err(
        "# header\nmoja\tone\nkula eat\n",
        3,
        &["no tab", "\"kula eat\""],
    );
}

#[test]
fn line_with_two_tabs_is_rejected() {
    assert_parse_err(
        "moja\tone\n\nkula\teat\tfood\n",
        3,
        &["2 tabs", "exactly one", r#""kula\teat\tfood""#],
    );
    assert_parse_err("kula\t\teat\n", 1, &["2 tabs"]);
}

#[test]
fn empty_fields_are_rejected() {
    assert_parse_err("moja\tone\n\teat\n", 2, &["empty Swahili field"]);
    assert_parse_err("kula\t\n", 1, &["empty English field", r#""kula\t""#]);
    assert_parse_err("moja\tone\n  \t  eat\n", 2, &["empty Swahili field"]);
    assert_parse_err("kula\t   \n", 1, &["empty English field"]);
}

#[test]
fn control_characters_in_a_field_are_rejected() {
    assert_parse_err(
        "ku\rla\teat\n",
        1,
        &["Swahili field", "U+000D", r#""ku\rla\teat""#],
    );
    assert_parse_err("kula\te\u{1}at\n", 1, &["English field", "U+0001"]);
}

#[test]
fn duplicate_swahili_names_both_lines() {
    assert_parse_err(
        "moja\tone\nkula\teat\n# c\nmbili\ttwo\nkula\tconsume\n",
        5,
        &[
            "duplicate Swahili entry",
            "\"kula\"",
            "line 2",
            "\"eat\"",
            "\"consume\"",
        ],
    );
    // Compared case-insensitively.
    assert_parse_err(
        "Jumatatu\tMonday\njumatatu\tmonday\n",
        2,
        &["duplicate pair", "first on line 1"],
    );
}

#[test]
fn duplicate_pair_names_both_lines() {
    assert_parse_err(
        "kula\teat\nmbili\ttwo\n\n  kula \t eat\n",
        4,
        &["duplicate pair", "\"kula\" / \"eat\"", "first on line 1"],
    );
}

#[test]
fn same_english_for_two_swahili_words_is_allowed() {
    let p = parse_pairs("tembo\telephant\nndovu\telephant\n", SRC).unwrap();
    assert_eq!(p.len(), 2);
}

#[test]
fn long_lines_are_quoted_truncated() {
    let long = "x".repeat(500);
    let msg = parse_err(&format!("moja\tone\n{long}\n"));
    assert!(msg.starts_with("words.tsv:2: no tab"), "{msg}");
    assert!(msg.contains("(500 characters)"), "{msg}");
    assert!(
        msg.len() < 200,
        "message not truncated: {} bytes",
        msg.len()
    );
    // Cutting a line of multi-byte characters stays on a character boundary.
    let wide = "ŋ".repeat(300);
    let msg = parse_err(&format!("{wide}\n"));
    assert!(msg.contains("(300 characters)"), "{msg}");
}

#[test]
fn invalid_utf8_names_file_line_and_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-words.tsv");
    std::fs::write(&path, b"moja\tone\r\nkula\teat\r\nmbwa\td\xffog\r\n").unwrap();
    let err = read_pairs(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Pairs { line: 3, .. }),
        "wrong variant or line: {err:?}"
    );
    let msg = err.to_string();
    let want = format!("{}:3: invalid UTF-8 at byte 26 (column 7)", path.display());
    assert!(msg.starts_with(&want), "{msg}");
    assert!(msg.contains("\"mbwa\\td\u{fffd}og\""), "{msg}");

    // A bad byte on the first line, and a file cut inside a character.
    std::fs::write(&path, b"\xc3").unwrap();
    let msg = read_pairs(&path).unwrap_err().to_string();
    assert!(
        msg.contains("bad-words.tsv:1: invalid UTF-8 at byte 0"),
        "{msg}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-list.tsv");
    let err = read_pairs(&path).unwrap_err();
    assert!(matches!(&err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-list.tsv"), "{err}");
}

#[test]
fn read_pairs_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my-list.tsv");
    std::fs::write(&path, "moja\tone\nmbili two\n").unwrap();
    let msg = read_pairs(&path).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}:2: no tab", path.display())),
        "{msg}"
    );
}

#[test]
fn overlap_names_pairs_and_lines() {
    let train = parse_pairs("moja\tone\nkula\teat\nmbwa\tdog\n", "t").unwrap();
    let control = parse_pairs("# c\npaka\tcat\nKula\tEat\nmbwa\thound\n", "c").unwrap();
    let err = check_disjoint(&train, &control).unwrap_err();
    assert!(
        matches!(&err, Error::PairsOverlap { count: 2, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    for n in [
        "share 2 Swahili word(s)",
        "\"Kula\" / \"Eat\" (training line 2, control line 3)",
        "\"mbwa\" (training line 3 \"dog\", control line 4 \"hound\")",
    ] {
        assert!(msg.contains(n), "lacks {n:?}: {msg}");
    }
    check_disjoint(&train, &[]).unwrap();
}

#[test]
fn overlap_lists_at_most_ten() {
    let text: String = (0..25).map(|i| format!("w{i}\tg{i}\n")).collect();
    let p = parse_pairs(&text, "t").unwrap();
    let msg = check_disjoint(&p, &p).unwrap_err().to_string();
    assert!(msg.contains("share 25"), "{msg}");
    assert!(msg.contains("and 15 more"), "{msg}");
    assert!(!msg.contains("\"w10\""), "{msg}");
}

// ---------------------------------------------------------------------------
// What the format tolerates.

#[test]
fn comments_blank_lines_and_padding_are_ignored() {
    let text = "# header\n\n   \n  # indented comment\n\t\n moja \t one\nkumi na moja\televen\n";
    let p = parse_pairs(text, SRC).unwrap();
    assert_eq!(
        p,
        vec![
            Pair {
                swahili: "moja".into(),
                english: "one".into(),
                line: 6
            },
            Pair {
                swahili: "kumi na moja".into(),
                english: "eleven".into(),
                line: 7
            },
        ]
    );
}

#[test]
fn crlf_line_endings_are_accepted() {
    let lf = "# c\nmoja\tone\n\nmbili\ttwo\ntatu\tthree";
    let crlf = lf.replace('\n', "\r\n");
    let a = parse_pairs(lf, SRC).unwrap();
    let b = parse_pairs(&crlf, SRC).unwrap();
    assert_eq!(a, b);
    assert_eq!(b.len(), 3);
    assert_eq!(b[2].english, "three");
    assert_eq!(b[1].line, 4);
    // Errors on a CRLF file quote the line without its `\r`.
    let msg = parse_err("moja\tone\r\nkula eat\r\n");
    assert!(msg.ends_with("\"kula eat\""), "{msg}");
}

#[test]
fn byte_order_mark_and_empty_input() {
    let p = parse_pairs("\u{feff}moja\tone\n", SRC).unwrap();
    assert_eq!(p[0].swahili, "moja");
    assert!(parse_pairs("", SRC).unwrap().is_empty());
    assert!(parse_pairs("# only a comment", SRC).unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// Properties.

/// Text built from the characters the parser treats specially, so tabs,
/// newlines, carriage returns and comment marks are common.
fn tricky_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('\t'),
            Just('\n'),
            Just('\r'),
            Just('#'),
            Just(' '),
            Just('\u{feff}'),
            Just('\u{0}'),
            Just('a'),
            Just('b'),
            Just('ŋ'),
            Just('é'),
            any::<char>(),
        ],
        0..200,
    )
    .prop_map(|v| v.into_iter().collect())
}

/// A word or phrase that survives the format: no tab, newline or control
/// character, no padding, and not a comment.
fn entry() -> impl Strategy<Value = String> {
    "[a-zA-Z'ŋé][a-zA-Z' ŋé-]{0,12}"
        .prop_map(|s| s.trim().to_string())
        .prop_filter("non-empty", |s| !s.is_empty())
}

proptest! {
    #![proptest_config(common::proptest_config(256))]
    #[test]
    fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse_pairs(&text, SRC);
    }

    #[test]
    fn parse_never_panics_on_tricky_text(text in tricky_text()) {
        if let Ok(pairs) = parse_pairs(&text, SRC) {
            let mut last = 0;
            for p in &pairs {
                prop_assert!(p.line > last);
                last = p.line;
                for f in [&p.swahili, &p.english] {
                    prop_assert!(!f.is_empty());
                    prop_assert_eq!(f.trim(), f.as_str());
                    prop_assert!(!f.chars().any(char::is_control));
                }
            }
        }
    }

    #[test]
    fn accepted_lists_round_trip(
        entries in proptest::collection::vec((entry(), entry()), 0..30),
        crlf in any::<bool>(),
    ) {
        let mut seen = HashSet::new();
        let entries: Vec<_> = entries
            .into_iter()
            .filter(|(sw, _)| seen.insert(sw.to_lowercase()))
            .collect();
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut text = format!("# generated{nl}{nl}");
        for (sw, en) in &entries {
            text.push_str(&format!("{sw}\t{en}{nl}"));
        }
        let pairs = parse_pairs(&text, SRC).unwrap();
        prop_assert_eq!(pairs.len(), entries.len());
        for (i, (p, (sw, en))) in pairs.iter().zip(&entries).enumerate() {
            prop_assert_eq!(&p.swahili, sw);
            prop_assert_eq!(&p.english, en);
            prop_assert_eq!(p.line, i + 3);
        }
    }
}

proptest! {
    #![proptest_config(common::proptest_config(64))]

    #[test]
    fn read_pairs_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(
            prop_oneof![Just(b'\t'), Just(b'\n'), Just(b'a'), any::<u8>()],
            0..100,
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.tsv");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = read_pairs(&path) {
            prop_assert!(e.to_string().contains("fuzz.tsv"), "{}", e);
        }
    }
}
