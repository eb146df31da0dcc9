//! `--model org/name[@revision]`: a Hugging Face hub id, resolved offline
//! in the local Hugging Face cache.
//!
//! The cache is the one `huggingface_hub` fills: under its root each model
//! has `models--org--name/`, with `refs/<branch or tag>` files holding a
//! commit hash and `snapshots/<commit hash>/` directories holding the files.
//! Nothing is downloaded: a model that is not cached is an error naming every
//! place looked at. A path that exists on disk always wins over a hub id.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const OP: &str = "resolve --model";

/// The longest hub id `huggingface_hub` accepts.
const MAX_REPO_ID_LEN: usize = 96;

/// Where a `--model` argument points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// The model directory (or file) to load.
    pub path: PathBuf,
    /// The hub id (`org/name`, without the revision) when the argument was
    /// resolved in the Hugging Face cache; `None` for a path on disk.
    pub hub_id: Option<String>,
    /// The revision asked for after `@`, when one was.
    pub revision: Option<String>,
}

impl ResolvedModel {
    /// What an adapter records as `base_model_name_or_path`, as PEFT does:
    /// the hub id, or else the absolute path.
    pub fn base_model_name(&self) -> String {
        if let Some(id) = &self.hub_id {
            return id.clone();
        }
        std::fs::canonicalize(&self.path)
            .or_else(|_| std::path::absolute(&self.path))
            .unwrap_or_else(|_| self.path.clone())
            .display()
            .to_string()
    }
}

/// Split `org/name[@revision]` into the repository id and the revision,
/// when `spec` is spelled as a hub id (`huggingface_hub`'s rules: one or two
/// names of ASCII letters, digits, `-`, `_` and `.`, not starting or ending
/// with `-` or `.`, without `--` or `..`, at most 96 characters; a revision
/// without `..` components, backslashes or a leading `/`). `None` otherwise.
pub fn parse_hub_id(spec: &str) -> Option<(&str, Option<&str>)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((repo, rev)) => (repo, Some(rev)),
        None => (spec, None),
    };
    if repo.is_empty()
        || repo.len() > MAX_REPO_ID_LEN
        || repo.contains("--")
        || repo.contains("..")
        || repo.split('/').count() > 2
    {
        return None;
    }
    let name_ok = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
    };
    if !repo.split('/').all(name_ok) {
        return None;
    }
    if let Some(rev) = revision
        && (rev.is_empty()
            || rev.starts_with('/')
            || rev.contains('\\')
            || rev.chars().any(char::is_control)
            || rev
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".."))
    {
        return None;
    }
    Some((repo, revision))
}

/// The Hugging Face hub cache directory as `huggingface_hub` finds it, from
/// the environment variables that `var` returns: `HF_HUB_CACHE`, else the
/// older `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`
/// (`HOME`, or `USERPROFILE` on Windows). Empty values count as unset; a
/// leading `~/` is the home directory. `None` when nothing locates it.
pub fn hub_cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let get = |k: &str| var(k).filter(|v| !v.is_empty());
    let home = get("HOME")
        .or_else(|| get("USERPROFILE"))
        .map(PathBuf::from);
    let expand = |v: OsString| -> Option<PathBuf> {
        let p = PathBuf::from(v);
        match p.strip_prefix("~") {
            Ok(rest) => home.as_ref().map(|h| h.join(rest)),
            Err(_) => Some(p),
        }
    };
    if let Some(v) = get("HF_HUB_CACHE").or_else(|| get("HUGGINGFACE_HUB_CACHE")) {
        return expand(v);
    }
    if let Some(v) = get("HF_HOME") {
        return expand(v).map(|p| p.join("hub"));
    }
    if let Some(v) = get("XDG_CACHE_HOME") {
        return expand(v).map(|p| p.join("huggingface").join("hub"));
    }
    home.map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// [`hub_cache_dir_from`] over this process's environment.
pub fn hub_cache_dir() -> Option<PathBuf> {
    hub_cache_dir_from(|k| std::env::var_os(k))
}

/// Resolve a `--model` argument: a path that exists, else a hub id
/// `org/name[@revision]` in the local Hugging Face cache
/// ([`hub_cache_dir`]).
///
/// # Errors
/// As [`resolve_model_path_in`].
pub fn resolve_model_path(spec: &Path) -> Result<ResolvedModel> {
    resolve_model_path_in(spec, hub_cache_dir().as_deref())
}

/// [`resolve_model_path`] with the cache root given (`None`: no cache could
/// be located).
///
/// The revision (default `main`) is looked up as `refs/<revision>`, whose
/// content names the snapshot; a revision that is itself a 40-digit commit
/// hash names `snapshots/<revision>` directly.
///
/// # Errors
/// [`Error::InvalidArgument`] when `spec` is neither an existing path nor a
/// cached hub id, naming every place looked at; [`Error::Format`] naming the
/// file when a `refs/` file is not a commit hash; [`Error::Io`] when one
/// cannot be read.
pub fn resolve_model_path_in(spec: &Path, cache: Option<&Path>) -> Result<ResolvedModel> {
    let on_disk = |path: &Path| ResolvedModel {
        path: path.to_path_buf(),
        hub_id: None,
        revision: None,
    };
    if spec.exists() {
        return Ok(on_disk(spec));
    }
    let shown = spec.display();
    let Some((repo, revision)) = spec.to_str().and_then(parse_hub_id) else {
        return Err(Error::invalid(
            OP,
            format!("{shown}: no such file or directory (and not a hub id org/name[@revision])"),
        ));
    };
    let Some(cache) = cache else {
        return Err(Error::invalid(
            OP,
            format!(
                "{shown}: no such file or directory, and no Hugging Face cache to look in \
                 (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME and HOME are all unset)"
            ),
        ));
    };
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let rev = revision.unwrap_or("main");
    let found = |snapshot: PathBuf| ResolvedModel {
        path: snapshot,
        hub_id: Some(repo.to_string()),
        revision: revision.map(str::to_string),
    };
    let mut looked = vec![format!("{shown} (as a path)")];
    let ref_file = repo_dir.join("refs").join(rev);
    if ref_file.is_file() {
        let hash = read_ref(&ref_file)?;
        let snapshot = repo_dir.join("snapshots").join(&hash);
        if snapshot.is_dir() {
            return Ok(found(snapshot));
        }
        looked.push(format!(
            "{} (named by {})",
            snapshot.display(),
            ref_file.display()
        ));
    } else {
        looked.push(ref_file.display().to_string());
    }
    if is_commit_hash(rev) {
        let snapshot = repo_dir.join("snapshots").join(rev);
        if snapshot.is_dir() {
            return Ok(found(snapshot));
        }
        looked.push(snapshot.display().to_string());
    }
    Err(Error::invalid(
        OP,
        format!(
            "{shown}: not on disk and not in the Hugging Face cache; looked at {}. \
             Nothing is downloaded: fetch it first (e.g. `hf download {repo}`{})",
            looked.join(", "),
            revision.map_or(String::new(), |r| format!(" --revision {r}"))
        ),
    ))
}

/// A commit hash as the hub writes them: 40 lowercase hex digits.
fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The commit hash in a `refs/` file (a regular file, read only when small).
fn read_ref(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > 1024 {
        return Err(Error::format(
            path,
            format!("{len} bytes; a refs file holds one commit hash"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let hash = text.trim();
    if !is_commit_hash(hash) {
        return Err(Error::format(
            path,
            format!("holds {hash:?}, expected a 40-digit commit hash"),
        ));
    }
    Ok(hash.to_string())
}
