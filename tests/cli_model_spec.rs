//! `--model` as a hub id in a fake Hugging Face cache (the cache root given
//! to the child process through `HF_HUB_CACHE`), the one-line note of
//! ignored config keys, and what adapters record as their base model.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tli_kernels::model::synthetic;

const HASH: &str = "3f2a9c0e5b7d4e1f8a6b2c9d0e7f1a3b5c8d2e4f";

fn tli(args: &[&str], cache: &Path, cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn stderr_of_success(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The synthetic model with the extra keys a hub config carries.
fn write_model(dir: &Path) {
    synthetic::write_dir(dir, 4).unwrap();
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let o = cfg.as_object_mut().unwrap();
    o.insert("unk_token_id".into(), 0.into());
    o.insert("rope_interleaved".into(), false.into());
    std::fs::write(&path, cfg.to_string()).unwrap();
}

fn adapter_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

#[test]
fn hub_ids_ignored_keys_and_recorded_base_models() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cache = d.join("hub");
    let repo = cache.join("models--tli-test--tiny-llama");
    write_model(&repo.join("snapshots").join(HASH));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), HASH).unwrap();
    write_model(&d.join("local"));

    let (t, _) = tli_kernels::pairs::shipped().unwrap();
    let pairs: String = t
        .iter()
        .take(8)
        .map(|p| format!("{}\t{}\n", p.swahili, p.english))
        .collect();
    std::fs::write(d.join("pairs.tsv"), pairs).unwrap();

    let train = |model: &str, out: &str| {
        tli(
            &[
                "train",
                "--model",
                model,
                "--pairs",
                "pairs.tsv",
                "--out",
                out,
                "--epochs",
                "1",
                "--batch",
                "4",
            ],
            &cache,
            d,
        )
    };
    // A hub id: resolved in the cache, recorded as the id.
    let err = stderr_of_success(&train("tli-test/tiny-llama", "a1"));
    assert_eq!(
        err.matches("ignored config keys: rope_interleaved, unk_token_id\n")
            .count(),
        1,
        "{err}"
    );
    let c = adapter_config(&d.join("a1"));
    assert_eq!(c["base_model_name_or_path"], "tli-test/tiny-llama");
    assert_eq!(c["task_type"], "CAUSAL_LM");

    // A relative directory: recorded as its absolute path.
    stderr_of_success(&train("local", "a2"));
    let c = adapter_config(&d.join("a2"));
    let abs = std::fs::canonicalize(d.join("local")).unwrap();
    assert_eq!(c["base_model_name_or_path"], abs.to_str().unwrap());
    assert_eq!(c["task_type"], "CAUSAL_LM");

    // Not cached: nothing downloaded, the places looked at are named.
    let out = tli(
        &[
            "scan",
            "--model",
            "tli-test/absent@v1",
            "--pairs",
            "pairs.tsv",
        ],
        &cache,
        d,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let refs = cache.join("models--tli-test--absent/refs/v1");
    assert!(
        err.contains(&refs.display().to_string()) && !err.contains("panicked"),
        "{err}"
    );
}
