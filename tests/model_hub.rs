//! Hub ids resolved offline in a fake Hugging Face cache built in a temporary
//! directory: `refs/main`, a named revision, a commit hash, a path on disk
//! winning over an id, and a missing model's error naming every place looked
//! at. The cache root is passed in (no process-global environment is set);
//! the environment precedence is tested through the pure lookup function.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use tli_kernels::model::hub::{
    ResolvedModel, hub_cache_dir_from, parse_hub_id, resolve_model_path_in,
};

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const V2: &str = "89abcdef0123456789abcdef0123456789abcdef";
const OLD: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A cache holding `HuggingFaceTB/SmolLM2-135M-Instruct` with three
/// snapshots: `main` and the tag `v2` name two of them, the third is reached
/// only by its hash.
fn fake_cache() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let repo = root
        .path()
        .join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
    for hash in [MAIN, V2, OLD] {
        let snap = repo.join("snapshots").join(hash);
        fs::create_dir_all(&snap).unwrap();
        fs::write(snap.join("config.json"), hash).unwrap();
    }
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), MAIN).unwrap();
    // huggingface_hub writes no newline, but a hand-edited file may have one.
    fs::write(repo.join("refs/v2"), format!("{V2}\n")).unwrap();
    root
}

fn snapshot(root: &Path, hash: &str) -> PathBuf {
    root.join("models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots")
        .join(hash)
}

#[test]
fn hub_ids_resolve_through_refs_and_hashes() {
    let cache = fake_cache();
    let root = cache.path();
    let id = "HuggingFaceTB/SmolLM2-135M-Instruct";
    let cases = [
        (id.to_string(), MAIN, None),
        (format!("{id}@main"), MAIN, Some("main")),
        (format!("{id}@v2"), V2, Some("v2")),
        (format!("{id}@{OLD}"), OLD, Some(OLD)),
    ];
    for (spec, hash, rev) in cases {
        let r = resolve_model_path_in(Path::new(&spec), Some(root)).unwrap();
        assert_eq!(
            r,
            ResolvedModel {
                path: snapshot(root, hash),
                hub_id: Some(id.to_string()),
                revision: rev.map(str::to_string),
            },
            "{spec}"
        );
        assert_eq!(
            fs::read_to_string(r.path.join("config.json")).unwrap(),
            hash
        );
        assert_eq!(r.base_model_name(), id);
    }
}

#[test]
fn a_path_on_disk_wins_over_a_hub_id() {
    let cache = fake_cache();
    let here = tempfile::tempdir().unwrap();
    // A directory spelled like a hub id, given by its full path.
    let dir = here
        .path()
        .join("HuggingFaceTB")
        .join("SmolLM2-135M-Instruct");
    fs::create_dir_all(&dir).unwrap();
    let r = resolve_model_path_in(&dir, Some(cache.path())).unwrap();
    assert_eq!((r.path.clone(), r.hub_id.clone()), (dir.clone(), None));
    assert_eq!(
        PathBuf::from(r.base_model_name()),
        fs::canonicalize(&dir).unwrap()
    );
    assert!(Path::new(&r.base_model_name()).is_absolute());

    // A relative directory spelled as a hub id (tests run in the crate
    // root), with that id cached too: the directory wins.
    let repo = cache.path().join("models--tests--data");
    fs::create_dir_all(repo.join("snapshots").join(MAIN)).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), MAIN).unwrap();
    assert!(Path::new("tests/data").is_dir());
    let r = resolve_model_path_in(Path::new("tests/data"), Some(cache.path())).unwrap();
    assert_eq!((r.path, r.hub_id), (PathBuf::from("tests/data"), None));
    // Without the directory the same spelling is the cached id.
    let r = resolve_model_path_in(Path::new("tests/data@main"), Some(cache.path())).unwrap();
    assert_eq!(
        (r.path, r.hub_id),
        (repo.join("snapshots").join(MAIN), Some("tests/data".into()))
    );
}

#[test]
fn a_missing_model_names_every_place_looked_at() {
    let cache = fake_cache();
    let root = cache.path();
    let e = resolve_model_path_in(Path::new("meta-llama/Llama-3.2-1B"), Some(root))
        .unwrap_err()
        .to_string();
    let refs = root.join("models--meta-llama--Llama-3.2-1B/refs/main");
    assert!(e.contains("meta-llama/Llama-3.2-1B (as a path)"), "{e}");
    assert!(e.contains(&refs.display().to_string()), "{e}");
    assert!(e.contains("Nothing is downloaded"), "{e}");

    // A revision that is neither a ref nor a cached hash: both places.
    let spec = format!("HuggingFaceTB/SmolLM2-135M-Instruct@{}", "a".repeat(40));
    let e = resolve_model_path_in(Path::new(&spec), Some(root))
        .unwrap_err()
        .to_string();
    let repo = root.join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
    for place in [
        repo.join("refs").join("a".repeat(40)),
        repo.join("snapshots").join("a".repeat(40)),
    ] {
        assert!(e.contains(&place.display().to_string()), "{e}");
    }

    // A ref naming a snapshot that is not there.
    fs::write(repo.join("refs/gone"), "b".repeat(40)).unwrap();
    let e = resolve_model_path_in(
        Path::new("HuggingFaceTB/SmolLM2-135M-Instruct@gone"),
        Some(root),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            &repo
                .join("snapshots")
                .join("b".repeat(40))
                .display()
                .to_string()
        ) && e.contains(&repo.join("refs/gone").display().to_string()),
        "{e}"
    );

    // A refs file that is not a commit hash.
    fs::write(repo.join("refs/bad"), "../../elsewhere").unwrap();
    let e = resolve_model_path_in(
        Path::new("HuggingFaceTB/SmolLM2-135M-Instruct@bad"),
        Some(root),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("expected a 40-digit commit hash"), "{e}");

    // No cache at all, and a spec that is no hub id.
    let e = resolve_model_path_in(Path::new("org/name"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_CACHE, HF_HOME"), "{e}");
    let e = resolve_model_path_in(Path::new("no/such/dir"), Some(root))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no/such/dir: no such file or directory (and not a hub id"),
        "{e}"
    );
}

#[test]
fn hub_id_spelling() {
    assert_eq!(
        parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"),
        Some(("HuggingFaceTB/SmolLM2-135M-Instruct", None))
    );
    assert_eq!(parse_hub_id("gpt2@v1.0"), Some(("gpt2", Some("v1.0"))));
    assert_eq!(
        parse_hub_id("org/name@refs/pr/1"),
        Some(("org/name", Some("refs/pr/1")))
    );
    for bad in [
        "",
        "a/b/c",
        "/abs/path",
        "./model",
        "../model",
        "org/na..me",
        "org--x/name",
        "org/-name",
        "org/name.",
        "org/na me",
        "org/name@",
        "org/name@../x",
        "org/name@/x",
        "org/name@a//b",
    ] {
        assert_eq!(parse_hub_id(bad), None, "{bad:?}");
    }
    assert_eq!(parse_hub_id(&format!("o/{}", "n".repeat(95))), None);
    assert!(parse_hub_id(&format!("o/{}", "n".repeat(94))).is_some());
}

#[test]
fn cache_location_follows_huggingface_hub_precedence() {
    let lookup = |pairs: &[(&str, &str)]| {
        let env: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        hub_cache_dir_from(move |k| env.get(k).cloned())
    };
    let all = [
        ("HF_HUB_CACHE", "/c/hub"),
        ("HUGGINGFACE_HUB_CACHE", "/c/legacy"),
        ("HF_HOME", "/h"),
        ("XDG_CACHE_HOME", "/x"),
        ("HOME", "/home/u"),
    ];
    let want = [
        "/c/hub",
        "/c/legacy",
        "/h/hub",
        "/x/huggingface/hub",
        "/home/u/.cache/huggingface/hub",
    ];
    // Dropping the variables one by one from the front walks down the list.
    for i in 0..all.len() {
        assert_eq!(lookup(&all[i..]), Some(PathBuf::from(want[i])), "{i}");
    }
    assert_eq!(lookup(&[]), None);
    // Empty counts as unset; `~` is the home directory.
    assert_eq!(
        lookup(&[
            ("HF_HUB_CACHE", ""),
            ("HF_HOME", "~/hf"),
            ("HOME", "/home/u")
        ]),
        Some(PathBuf::from("/home/u/hf/hub"))
    );
    assert_eq!(
        lookup(&[("USERPROFILE", "/users/u")]),
        Some(PathBuf::from("/users/u/.cache/huggingface/hub"))
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

    /// Any string: no panic, and an accepted id's cache paths (repo folder,
    /// refs file) never leave the cache root.
    #[test]
    fn hub_spec_parsing_never_panics_or_escapes(spec in "[a-zA-Z0-9./@_~\\\\ -]{0,40}") {
        if let Some((repo, rev)) = parse_hub_id(&spec) {
            let folder = format!("models--{}", repo.replace('/', "--"));
            let refs = Path::new(&folder).join("refs").join(rev.unwrap_or("main"));
            proptest::prop_assert!(
                refs.components().all(|c| matches!(c, std::path::Component::Normal(_))),
                "{spec:?} -> {}", refs.display()
            );
        }
        let cache = tempfile::tempdir().unwrap();
        let _ = resolve_model_path_in(Path::new(&spec), Some(cache.path()));
    }
}
