//! `tli scan`, `tli train`, `tli eval` end to end on the synthetic model
//! written as a checkpoint directory.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tli_kernels::model::synthetic;

fn tli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn failed(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// A pairs file of the first `n` shipped training pairs (or control pairs).
fn pairs_file(path: &Path, control: bool, n: usize) {
    let (t, c) = tli_kernels::pairs::shipped().unwrap();
    let list = if control { c } else { t };
    let mut s = String::from("# test pairs\n");
    for p in list.iter().take(n) {
        s.push_str(&format!("{}\t{}\n", p.swahili, p.english));
    }
    std::fs::write(path, s).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn scan_train_eval_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    synthetic::write_dir(&model, 4).unwrap();
    let train = d.join("train.tsv");
    let control = d.join("control.tsv");
    pairs_file(&train, false, 40);
    pairs_file(&control, true, 10);

    // scan: table, JSON, plot.
    let json = d.join("scan.json");
    let plot = d.join("scan.svg");
    let out = ok(&tli(&[
        "scan",
        "--model",
        s(&model),
        "--pairs",
        s(&train),
        "--layers",
        "0,2,4",
        "--json",
        s(&json),
        "--plot",
        s(&plot),
    ]));
    assert!(
        out.contains("words mean (sd)") && out.contains("all mean (sd)"),
        "{out}"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["pooling"], "both");
    let idx: Vec<u64> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 0, 2, 2, 4, 4]);
    assert_eq!(v["layers"][1]["cosines"].as_array().unwrap().len(), 40);
    for key in ["nonmatching_mean", "margin", "top1", "mrr_en_sw"] {
        assert!(v["layers"][1][key].is_number(), "scan {key}");
    }
    assert!(
        out.contains("words margin") && out.contains("all top1"),
        "{out}"
    );
    assert_eq!(v["pairs"].as_array().unwrap().len(), 40);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("pooling: words"),
        "{}",
        &svg[..200.min(svg.len())]
    );

    // train: a short run.
    let adapter = d.join("adapter");
    let out = ok(&tli(&[
        "train",
        "--model",
        s(&model),
        "--pairs",
        s(&train),
        "--out",
        s(&adapter),
        "--epochs",
        "2",
        "--warmup",
        "2",
        "--lr",
        "5e-3",
        "--seed",
        "9",
    ]));
    assert!(
        out.contains("mean loss") && out.contains("steps/s"),
        "{out}"
    );
    assert!(adapter.join("adapter_config.json").is_file());
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let log = std::fs::read_to_string(adapter.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 10, "{log}");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 16);
    assert_eq!(cfg["lora_alpha"], 32);
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([0, 1]));

    // eval: table, JSON, CSV, plot.
    let ejson = d.join("eval.json");
    let csv = d.join("eval.csv");
    let eplot = d.join("eval.svg");
    let out = ok(&tli(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--train",
        s(&train),
        "--control",
        s(&control),
        "--json",
        s(&ejson),
        "--csv",
        s(&csv),
        "--plot",
        s(&eplot),
    ]));
    assert!(out.contains("trained") && out.contains("control"), "{out}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&ejson).unwrap()).unwrap();
    assert_eq!(v["layer"], 2);
    assert_eq!(v["pooling"], "words");
    assert_eq!(v["sets"]["trained"]["n"], 40);
    assert_eq!(v["sets"]["control"]["n"], 10);
    assert_eq!(v["sets"]["control"]["df"], 9);
    assert_eq!(v["sets"]["trained"]["before"].as_array().unwrap().len(), 40);
    for key in [
        "nonmatching_mean_after",
        "margin_before",
        "top1_after",
        "mrr_en_sw_before",
    ] {
        assert!(v["sets"]["control"][key].is_number(), "eval {key}");
    }
    assert!(v["sets"]["trained"]["verdict"].is_string());
    assert!(
        out.contains("non-matching") && out.contains("control: "),
        "{out}"
    );
    let keys: Vec<&String> = v["sets"].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 51);
    assert!(std::fs::read_to_string(&eplot).unwrap().contains("trained"));

    // scan with the adapter and JSON on standard output.
    let out = ok(&tli(&[
        "scan",
        "--model",
        s(&model),
        "--pairs",
        s(&control),
        "--layers",
        "2",
        "--pool",
        "words",
        "--adapter",
        s(&adapter),
        "--json",
        "-",
    ]));
    let start = out.find("{\n").unwrap();
    let v: Value = serde_json::from_str(&out[start..]).unwrap();
    assert_eq!(v["pooling"], "words");
    assert_eq!(v["layers"].as_array().unwrap().len(), 1);

    // The same seed trains the same adapter.
    let again = d.join("again");
    ok(&tli(&[
        "train",
        "--model",
        s(&model),
        "--pairs",
        s(&train),
        "--out",
        s(&again),
        "--epochs",
        "2",
        "--warmup",
        "2",
        "--lr",
        "5e-3",
        "--seed",
        "9",
    ]));
    assert_eq!(
        std::fs::read(adapter.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(again.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn errors_are_clean_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    synthetic::write_dir(&model, 4).unwrap();
    let train = d.join("train.tsv");
    pairs_file(&train, false, 6);

    // No GPU here (or a build without candle-cuda): a clear error.
    let e = failed(&tli(&[
        "scan",
        "--model",
        s(&model),
        "--pairs",
        s(&train),
        "--device",
        "cuda",
    ]));
    assert!(e.contains("CUDA"), "{e}");

    // A malformed pairs file names the file and the line.
    let bad = d.join("bad.tsv");
    std::fs::write(&bad, "maji\twater\nmoto fire\n").unwrap();
    let e = failed(&tli(&["scan", "--model", s(&model), "--pairs", s(&bad)]));
    assert!(e.contains("bad.tsv:2") && e.contains("no tab"), "{e}");

    // A layer beyond the model.
    let e = failed(&tli(&[
        "scan",
        "--model",
        s(&model),
        "--pairs",
        s(&train),
        "--layers",
        "7",
    ]));
    assert!(e.contains('7'), "{e}");
    let e = failed(&tli(&[
        "scan",
        "--model",
        s(&model),
        "--pairs",
        s(&train),
        "--layers",
        "one",
    ]));
    assert!(e.contains("\"one\""), "{e}");

    // A missing model directory.
    let e = failed(&tli(&[
        "train",
        "--model",
        s(&d.join("nope")),
        "--pairs",
        s(&train),
        "--out",
        s(&d.join("a")),
    ]));
    assert!(e.contains("nope"), "{e}");

    // Overlapping training and control lists.
    let e = failed(&tli(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&d.join("a")),
        "--train",
        s(&train),
        "--control",
        s(&train),
    ]));
    assert!(e.contains("share"), "{e}");
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn train_from_an_adapter_with_logs_checkpoints_and_flag_checks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    synthetic::write_dir(&model, 4).unwrap();
    let train = d.join("train.tsv");
    pairs_file(&train, false, 12);
    let (a, b) = (d.join("a"), d.join("b"));
    let log = d.join("a.jsonl");
    let base = ["--model", s(&model), "--pairs", s(&train)];
    let run = |extra: &[&str]| tli(&[&["train"], &base[..], extra].concat());

    // 12 pairs in batches of 5, file order, no dropout: 3 steps.
    let out = ok(&run(&[
        "--out",
        s(&a),
        "--epochs",
        "1",
        "--batch",
        "5",
        "--shuffle",
        "false",
        "--dropout",
        "0",
        "--save-every",
        "2",
        "--log",
        s(&log),
    ]));
    assert!(out.contains("in file order"), "{out}");
    assert_eq!(lines(&log), 3);
    assert!(a.join("checkpoint").join("trainer_state.json").is_file());

    // A finished run has nothing to resume.
    let e = failed(&run(&["--resume", s(&a)]));
    assert!(e.contains("finished all 3 steps"), "{e}");
    // Resuming keeps the run's settings: changing one is refused by name.
    let e = failed(&run(&["--resume", s(&a), "--lr", "1e-3"]));
    assert!(e.contains("--lr"), "{e}");
    // Neither --out nor --resume.
    let e = failed(&run(&[]));
    assert!(e.contains("--out"), "{e}");

    // Start from the trained adapter: its rank unless contradicted.
    let e = failed(&run(&[
        "--init-adapter",
        s(&a),
        "--out",
        s(&b),
        "--rank",
        "4",
    ]));
    assert!(e.contains("--rank 4") && e.contains("rank 16"), "{e}");
    let out = ok(&run(&[
        "--init-adapter",
        s(&a),
        "--out",
        s(&b),
        "--epochs",
        "1",
    ]));
    assert!(out.contains(&format!("from {}", s(&a))), "{out}");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 16);
}

/// Ctrl-C stops after the current step with a checkpoint; `--resume` then
/// finishes the run.
#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_resume_finishes() {
    signal_checkpoints_and_resume_finishes("INT");
}

/// SIGTERM (a job scheduler stopping the run) behaves as Ctrl-C.
#[cfg(unix)]
#[test]
fn sigterm_checkpoints_and_resume_finishes() {
    signal_checkpoints_and_resume_finishes("TERM");
}

#[cfg(unix)]
fn signal_checkpoints_and_resume_finishes(signal: &str) {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    synthetic::write_dir(&model, 4).unwrap();
    let train = d.join("train.tsv");
    pairs_file(&train, false, 16);
    let a = d.join("a");
    let log = a.join("train_log.jsonl");
    // 200 epochs of 2 steps: long enough to be interrupted.
    let child = Command::new(env!("CARGO_BIN_EXE_tli"))
        .args([
            "train",
            "--model",
            s(&model),
            "--pairs",
            s(&train),
            "--out",
            s(&a),
            "--epochs",
            "200",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while lines(&log) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no progress in the log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let e = failed(&out);
    assert!(
        e.contains("stopped at step") && e.contains("--resume"),
        "{e}"
    );
    let stopped = lines(&log);
    assert!((3..400).contains(&stopped), "{stopped} steps logged");

    let out = ok(&tli(&[
        "train",
        "--model",
        s(&model),
        "--pairs",
        s(&train),
        "--resume",
        s(&a),
    ]));
    assert!(
        out.contains(&format!("resumed at step {stopped} of 400")),
        "{out}"
    );
    assert_eq!(lines(&log), 400);
}

/// Take the BOS post-processor out of a model directory's tokenizer.json
/// (SmolLM2's tokenizer, for one, adds no BOS); config.json keeps its
/// `bos_token_id`.
fn strip_bos(model: &Path) {
    let p = model.join("tokenizer.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert!(v["post_processor"].is_object());
    v["post_processor"] = Value::Null;
    std::fs::write(&p, v.to_string()).unwrap();
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `--bos` on scan, train and eval: what the header says, what the JSON
/// and the trainer state record, and that a prepended BOS gives exactly the
/// numbers of a tokenizer that adds it itself.
#[test]
fn bos_modes_in_scan_train_and_eval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (with, bare) = (d.join("with"), d.join("bare"));
    synthetic::write_dir(&with, 4).unwrap();
    synthetic::write_dir(&bare, 4).unwrap();
    strip_bos(&bare);
    let bos = synthetic::tokenizer().unwrap().bos_id.unwrap();
    let named = format!("{} (id {bos})", synthetic::BOS);
    let train = d.join("train.tsv");
    pairs_file(&train, false, 12);
    let scan = |model: &Path, extra: &[&str], out: &Path| -> String {
        let mut args = vec![
            "scan",
            "--model",
            s(model),
            "--pairs",
            s(&train),
            "--layers",
            "0,2,4",
            "--json",
            s(out),
        ];
        args.extend_from_slice(extra);
        ok(&tli(&args))
    };

    let a = d.join("a.json");
    let out = scan(&with, &[], &a);
    assert!(
        out.contains(&format!(
            "BOS: tokenizer adds BOS {named} itself: nothing prepended"
        )),
        "{out}"
    );
    assert!(!out.contains("attention sink"), "{out}");
    let a = json(&a);
    assert_eq!(a["bos"]["mode"], "auto");
    assert_eq!(a["bos"]["tokenizer_adds_bos"], true);
    assert_eq!(a["bos"]["prepended"], false);
    assert_eq!(a["bos"]["id"], bos);

    // auto (the default) and always prepend the BOS: the same ids, so the
    // same numbers as the tokenizer that adds it.
    for extra in [&[][..], &["--bos", "always"][..]] {
        let b = d.join("b.json");
        let out = scan(&bare, extra, &b);
        let line = if extra.is_empty() {
            format!("BOS: tokenizer adds no BOS: prepending {named}; --bos never to disable")
        } else {
            format!("BOS: tokenizer adds no BOS: prepending {named} (--bos always)")
        };
        assert!(out.contains(&line), "{out}");
        assert!(!out.contains("attention sink"), "{out}");
        let b = json(&b);
        assert_eq!(
            b["bos"]["mode"],
            if extra.is_empty() { "auto" } else { "always" }
        );
        assert_eq!(b["bos"]["tokenizer_adds_bos"], false);
        assert_eq!(b["bos"]["prepended"], true);
        assert_eq!(b["bos"]["token"], synthetic::BOS);
        assert_eq!(b["layers"], a["layers"]);
    }

    // never: each word's first token is at position 0, and the scan says so.
    let n = d.join("n.json");
    let out = scan(&bare, &["--bos", "never"], &n);
    assert!(
        out.contains("BOS: --bos never: the tokenizer as is, which adds no BOS"),
        "{out}"
    );
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning: "))
        .unwrap_or_else(|| panic!("no warning in\n{out}"));
    assert!(
        warning.contains("sits at position 0 and is the attention sink")
            && warning.contains("dominates pooled similarities")
            && warning.ends_with(&format!("--bos auto prepends {named}"))
            && !warning.contains("  "),
        "{warning}"
    );
    let n = json(&n);
    assert_eq!(n["bos"]["mode"], "never");
    assert_eq!(n["bos"]["prepended"], false);
    assert_eq!(n["bos"]["word_at_position_0"], true);
    assert_eq!(n["layers"][0]["cosines"], a["layers"][0]["cosines"]);
    assert_ne!(n["layers"][2]["cosines"], a["layers"][2]["cosines"]);

    // train records the mode; eval reports it.
    let adapter = d.join("adapter");
    let out = ok(&tli(&[
        "train",
        "--model",
        s(&bare),
        "--pairs",
        s(&train),
        "--out",
        s(&adapter),
        "--epochs",
        "1",
        "--batch",
        "4",
        "--warmup",
        "1",
        "--lr",
        "5e-3",
    ]));
    assert!(
        out.contains("BOS: tokenizer adds no BOS: prepending"),
        "{out}"
    );
    let state_path = adapter.join("checkpoint/trainer_state.json");
    let state = json(&state_path);
    assert_eq!(state["settings"]["bos"], "auto");
    for (extra, mode) in [(&[][..], "auto"), (&["--bos", "never"][..], "never")] {
        let e = d.join(format!("eval-{mode}.json"));
        let mut args = vec![
            "eval",
            "--model",
            s(&bare),
            "--adapter",
            s(&adapter),
            "--train",
            s(&train),
            "--json",
            s(&e),
        ];
        args.extend_from_slice(extra);
        let out = ok(&tli(&args));
        assert!(out.contains("BOS: "), "{out}");
        assert_eq!(
            out.contains(
                "note: the adapter was trained with --bos auto, this eval uses --bos never"
            ),
            mode == "never",
            "{out}"
        );
        let e = json(&e);
        assert_eq!(e["bos"]["mode"], mode);
        assert_eq!(e["bos"]["prepended"], mode == "auto");
    }

    // Resume: another mode is refused naming both; without --bos the run's
    // mode is used. (The checkpoint is cut back to step 1 to have a run to
    // resume.)
    let mut cut = state.clone();
    cut["step"] = 1.into();
    cut["steps"] = Value::Array(vec![state["steps"][0].clone()]);
    std::fs::write(&state_path, cut.to_string()).unwrap();
    let resume = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            s(&bare),
            "--pairs",
            s(&train),
            "--resume",
            s(&adapter),
        ];
        args.extend_from_slice(extra);
        tli(&args)
    };
    let e = failed(&resume(&["--bos", "never"]));
    assert!(
        e.contains("used --bos auto") && e.contains("this one --bos never"),
        "{e}"
    );
    let out = ok(&resume(&[]));
    assert!(out.contains("resumed at step 1 of 3"), "{out}");
}

/// Settings that cannot work fail before the model loads and leave nothing
/// behind; one that works but probably is not meant gets a warning.
#[test]
fn train_settings_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    synthetic::write_dir(&model, 4).unwrap();
    let train = d.join("train.tsv");
    pairs_file(&train, false, 6);
    let out = d.join("a");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            s(&model),
            "--pairs",
            s(&train),
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        tli(&args)
    };
    let e = failed(&run(&["--rank", "100000"]));
    assert!(e.contains("rank r = 100000") && e.contains("1..=64"), "{e}");
    assert!(!out.exists(), "nothing written: {e}");
    // 6 pairs in batches of 2: 3 steps an epoch, so u64::MAX epochs overflow.
    let e = failed(&run(&["--epochs", "18446744073709551615", "--batch", "2"]));
    assert!(e.contains("more steps than can be counted"), "{e}");
    assert!(!out.exists(), "nothing written: {e}");
    let o = run(&["--warmup", "100000", "--epochs", "1"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--warmup 100000 is not shorter than the run") && err.contains("never"),
        "{err}"
    );
}

/// Words that cannot be pooled are errors naming the line, found before any
/// model work: a word of special tokens only, and a runaway "word" longer
/// than the token limit (which `--max-word-tokens` raises).
#[test]
fn unpoolable_words_are_named_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    synthetic::write_dir(&model, 4).unwrap();
    let bos = synthetic::tokenizer().unwrap();
    let bos_text = bos.inner().id_to_token(bos.bos_id.unwrap()).unwrap();
    let special = d.join("special.tsv");
    std::fs::write(&special, format!("maji\twater\n{bos_text}\tfire\n")).unwrap();
    for verb in ["scan", "train"] {
        let mut args = vec![verb, "--model", s(&model), "--pairs", s(&special)];
        if verb == "train" {
            args.extend(["--out", s(d)]);
        }
        let e = failed(&tli(&args));
        assert!(
            e.contains(":2:") && e.contains("only of special tokens"),
            "{verb}: {e}"
        );
    }
    let long = d.join("long.tsv");
    std::fs::write(&long, format!("maji\twater\n{}\tfire\n", "ab".repeat(5000))).unwrap();
    let start = std::time::Instant::now();
    let e = failed(&tli(&["scan", "--model", s(&model), "--pairs", s(&long)]));
    assert!(
        e.contains("10000 characters") && e.contains("more than the 128"),
        "{e}"
    );
    assert!(e.contains("--max-word-tokens"), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(120));
    // Raised far enough, the same file scans.
    ok(&tli(&[
        "scan",
        "--model",
        s(&model),
        "--pairs",
        s(&long),
        "--layers",
        "1",
        "--max-word-tokens",
        "20000",
    ]));
}
