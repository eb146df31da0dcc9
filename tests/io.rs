//! Outside files, handled so that nothing is lost and nothing hangs: inputs
//! are opened only once known to be regular files (a FIFO without a writer
//! is an error, not a hang; `/dev/zero` is refused before it is read) and
//! read within a size limit; outputs are written through symbolic links to
//! their targets, never over a FIFO, device or directory, and never over one
//! of the run's inputs. Library calls first, then the same cases through the
//! `tli` binary.
#![cfg(unix)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use safetensors::Dtype;
use tli_kernels::io::{
    DEFAULT_MAX_TEXT_BYTES, OutTensor, open_input, output_target, read_input, read_text,
    refuse_input_as_output, write_atomic, write_safetensors,
};

/// Long enough that no loaded machine reaches it; only a hang does.
const HANG: Duration = Duration::from_secs(120);

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

fn is_fifo(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

/// Run `f` on another thread; fail (rather than hang) if it takes longer
/// than [`HANG`].
fn within_limit<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG:?} (hung)"))
}

fn write_text(path: &Path, text: &str) -> tli_kernels::Result<()> {
    write_atomic(path, |w| {
        w.write_all(text.as_bytes())
            .map_err(|e| tli_kernels::Error::Io {
                path: path.to_path_buf(),
                source: e,
            })
    })
}

#[test]
fn outputs_write_through_links_and_keep_them() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("target.json");
    std::fs::write(&target, "old").unwrap();
    // An absolute link, a relative link, and a chain of two.
    let abs = d.path().join("abs");
    std::os::unix::fs::symlink(&target, &abs).unwrap();
    let rel = d.path().join("rel");
    std::os::unix::fs::symlink("target.json", &rel).unwrap();
    let chain = d.path().join("chain");
    std::os::unix::fs::symlink("rel", &chain).unwrap();
    for (link, text) in [(&abs, "one"), (&rel, "two"), (&chain, "three")] {
        write_text(link, text).unwrap();
        assert!(
            std::fs::symlink_metadata(link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{} is still a link",
            link.display()
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), text);
    }
    // A dangling link: its target is created.
    let dangling = d.path().join("dangling");
    std::os::unix::fs::symlink("new.json", &dangling).unwrap();
    write_text(&dangling, "four").unwrap();
    assert_eq!(
        std::fs::read_to_string(d.path().join("new.json")).unwrap(),
        "four"
    );
    assert_eq!(output_target(&dangling).unwrap(), d.path().join("new.json"));
    // No temporary file is left anywhere.
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn outputs_never_replace_special_files_or_directories() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    mkfifo(&fifo);
    let via = d.path().join("via");
    std::os::unix::fs::symlink(&fifo, &via).unwrap();
    let dir = d.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let cases: [(&Path, &str); 4] = [
        (&fifo, "a FIFO"),
        (&via, "a FIFO (the target of"),
        (Path::new("/dev/null"), "a character device"),
        (&dir, "a directory"),
    ];
    for (path, kind) in cases {
        let e = write_text(path, "x").unwrap_err().to_string();
        assert!(e.contains(kind), "{}: {e}", path.display());
        assert!(e.contains("regular files"), "{e}");
    }
    assert!(is_fifo(&fifo), "the FIFO is still a FIFO");
    assert!(
        std::fs::symlink_metadata(&via)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(dir.is_dir());
    // A loop of links is an error, not a hang.
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let e = write_text(&a, "x").unwrap_err().to_string();
    assert!(e.contains("symbolic links"), "{e}");
}

#[test]
fn inputs_must_be_regular_files_and_are_never_waited_on() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    mkfifo(&fifo);
    // No writer ever opens it: a blocking open would never return.
    let f = fifo.clone();
    let e = within_limit("open a FIFO", move || {
        open_input(&f).map(|_| ()).unwrap_err().to_string()
    });
    assert!(e.contains("a FIFO") && e.contains("regular files"), "{e}");
    let e = read_input(Path::new("/dev/zero"), DEFAULT_MAX_TEXT_BYTES)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/dev/zero") && e.contains("a character device"),
        "{e}"
    );
    let e = read_text(d.path()).unwrap_err().to_string();
    assert!(e.contains("a directory"), "{e}");
    // Through a link to a regular file: fine.
    let real = d.path().join("real.txt");
    std::fs::write(&real, "maji\twater\n").unwrap();
    let link = d.path().join("link.txt");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert_eq!(read_text(&link).unwrap(), "maji\twater\n");
}

#[test]
fn inputs_over_the_limit_are_refused_before_reading() {
    let d = tempfile::tempdir().unwrap();
    // A sparse terabyte: reading it would exhaust memory long before the end.
    let huge = d.path().join("huge.json");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let start = Instant::now();
    let e = read_text(&huge).unwrap_err().to_string();
    assert!(start.elapsed() < HANG);
    assert!(
        e.contains(&format!("{}", 1u64 << 40))
            && e.contains(&format!("{DEFAULT_MAX_TEXT_BYTES}"))
            && e.contains("TLI_MAX_TEXT_BYTES"),
        "{e}"
    );
    // The limit is exact: at the limit is read, one byte over is not.
    let small = d.path().join("small.txt");
    std::fs::write(&small, "0123456789").unwrap();
    assert_eq!(read_input(&small, 10).unwrap().len(), 10);
    let e = read_input(&small, 9).unwrap_err().to_string();
    assert!(e.contains("10 bytes") && e.contains("9-byte limit"), "{e}");
    // Not UTF-8: named with the offset.
    let bin = d.path().join("bin.txt");
    std::fs::write(&bin, b"ab\xffcd").unwrap();
    let e = read_text(&bin).unwrap_err().to_string();
    assert!(e.contains("not UTF-8") && e.contains("byte 2"), "{e}");
}

#[test]
fn an_output_that_is_an_input_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.safetensors");
    std::fs::write(&input, "x").unwrap();
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let hard = d.path().join("hard");
    std::fs::hard_link(&input, &hard).unwrap();
    for out in [&input, &link, &hard] {
        let e = refuse_input_as_output(out, &[Path::new("/nonexistent"), &input])
            .unwrap_err()
            .to_string();
        assert!(e.contains("same file as the input"), "{e}");
    }
    refuse_input_as_output(&d.path().join("new"), &[&input]).unwrap();
    let other = d.path().join("other");
    std::fs::write(&other, "y").unwrap();
    refuse_input_as_output(&other, &[&input]).unwrap();
}

// ---- the same through the binary ----------------------------------------

/// Run `tli` with `args`; fail (and kill it) if it has not finished within
/// [`HANG`].
fn tli(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tli"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > HANG {
            let _ = child.kill();
            panic!("tli {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {o:?}");
    assert_eq!(o.status.code(), Some(1), "an error exit, not a signal");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small f32 safetensors checkpoint to quantize.
fn checkpoint(path: &Path) -> Vec<u8> {
    let v: Vec<u8> = (0..64 * 64)
        .flat_map(|i| ((i as f32 * 0.37).sin()).to_le_bytes())
        .collect();
    write_safetensors(
        path,
        vec![OutTensor::bytes(
            "model.layers.0.mlp.up_proj.weight",
            Dtype::F32,
            vec![64, 64],
            v,
        )],
        None,
        &mut |_, _| {},
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn cli_never_replaces_its_input_or_a_special_file() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("model.safetensors");
    let original = checkpoint(&input);
    // nf4 quantize X X: the full-precision input stays.
    let e = failed(&tli(&["nf4", "quantize", s(&input), s(&input)]));
    assert!(e.contains("same file as the input"), "{e}");
    assert_eq!(std::fs::read(&input).unwrap(), original);
    // ... and through a link to it.
    let link = d.path().join("link.safetensors");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let e = failed(&tli(&["nf4", "quantize", s(&input), s(&link)]));
    assert!(e.contains("same file as the input"), "{e}");
    assert_eq!(std::fs::read(&input).unwrap(), original);
    // A FIFO as the output: refused, and still a FIFO.
    let fifo = d.path().join("out.fifo");
    mkfifo(&fifo);
    let e = failed(&tli(&["nf4", "quantize", s(&input), s(&fifo)]));
    assert!(e.contains("a FIFO"), "{e}");
    assert!(is_fifo(&fifo));
    // A link to a new file: written through, the link kept.
    let out_link = d.path().join("out-link");
    let out: PathBuf = d.path().join("out.safetensors");
    std::os::unix::fs::symlink(&out, &out_link).unwrap();
    let o = tli(&["nf4", "quantize", s(&input), s(&out_link)]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        std::fs::symlink_metadata(&out_link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(std::fs::metadata(&out).unwrap().len() > 0);
}

#[test]
fn cli_inputs_that_are_not_regular_files_fail_at_once() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("in.fifo");
    mkfifo(&fifo);
    let out = d.path().join("out.safetensors");
    let e = failed(&tli(&["nf4", "quantize", s(&fifo), s(&out)]));
    assert!(e.contains("a FIFO"), "{e}");
    let e = failed(&tli(&["nf4", "quantize", "/dev/zero", s(&out)]));
    assert!(e.contains("a character device"), "{e}");
    assert!(!out.exists(), "no output on failure");
    // Word pairs from a FIFO with no writer, or from /dev/zero.
    let model = d.path().join("model");
    tli_kernels::model::synthetic::write_dir(&model, 4).unwrap();
    for pairs in [s(&fifo), "/dev/zero"] {
        let e = failed(&tli(&["scan", "--model", s(&model), "--pairs", pairs]));
        assert!(e.contains("regular files"), "{pairs}: {e}");
    }
}
