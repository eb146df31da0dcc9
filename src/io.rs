//! File I/O for everything the crate reads and writes: inputs opened only
//! once known to be regular files and read within a size limit,
//! memory-mapped safetensors input, and atomic output that writes through
//! links and never replaces a special file.
//!
//! * [`open_input`] and [`read_input`] refuse FIFOs, devices, sockets and
//!   directories *before* reading (a FIFO is opened without blocking, so one
//!   with no writer is an error, not a hang), and [`read_input`] refuses a
//!   file larger than its limit before allocating
//!   ([`max_text_bytes`], `TLI_MAX_TEXT_BYTES`).
//! * [`output_target`] is where an output path leads: the path itself, or
//!   the file a symbolic link (chain) names; a directory, FIFO, device or
//!   socket is refused. [`refuse_input_as_output`] refuses an output that is
//!   one of the run's inputs.
//!
//! * [`MappedFile`] maps an input file instead of reading it, so a
//!   multi-gigabyte checkpoint costs address space, not memory, and parses it
//!   with the `safetensors` crate; a truncated or corrupt file is an
//!   [`Error::Format`] naming the file.
//! * [`write_atomic`] writes a file under a temporary name in the destination
//!   directory, flushes it to disk and renames it into place: readers see the
//!   old file or the complete new one, never a prefix, and a failure leaves
//!   neither a partial output nor the temporary file behind.
//! * [`write_safetensors`] streams tensors into such a file. Each tensor's
//!   bytes are produced only when it is written ([`OutData::Deferred`]), so an
//!   output several times larger than memory can still be written.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// The default largest text input (JSON configs, tokenizers, word-pair
/// files, trainer state): 256 MiB, about ten times the largest
/// `tokenizer.json` of a public model.
pub const DEFAULT_MAX_TEXT_BYTES: u64 = 256 << 20;

/// The largest text input read whole: `TLI_MAX_TEXT_BYTES` (bytes) when it is
/// set to a number, else [`DEFAULT_MAX_TEXT_BYTES`].
pub fn max_text_bytes() -> u64 {
    std::env::var("TLI_MAX_TEXT_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_TEXT_BYTES)
}

/// What kind of non-regular file `t` is, for messages.
fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Open `path` for reading, only if it is (or links to) a regular file.
///
/// On Unix the file is opened with `O_NONBLOCK`, so a FIFO without a writer
/// does not block the open, and then checked with `fstat` on the open
/// descriptor (no window for the path to change between check and use).
///
/// # Errors
/// [`Error::Io`] naming the file if it cannot be opened;
/// [`Error::Format`] naming it and what it is (a FIFO, a character device,
/// a directory, ...) if it is not a regular file.
pub fn open_input(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            format!(
                "{}; inputs must be regular files",
                kind_of(&meta.file_type())
            ),
        ));
    }
    Ok(file)
}

/// Read the whole of the regular file `path`, refusing one of more than
/// `limit` bytes before allocating for it.
///
/// # Errors
/// As [`open_input`]; [`Error::Format`] naming the file, its size and the
/// limit (and `TLI_MAX_TEXT_BYTES`) if it is too large.
pub fn read_input(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_input(path)?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_large = |size: u64| {
        Error::format(
            path,
            format!(
                "{size} bytes is more than the {limit}-byte limit for this input \
                 (set TLI_MAX_TEXT_BYTES to raise it)"
            ),
        )
    };
    if size > limit {
        return Err(too_large(size));
    }
    // The file may grow while it is read: read at most one byte past the
    // limit, so growth is an error rather than an allocation.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_input`] within [`max_text_bytes`], as UTF-8 text.
///
/// # Errors
/// As [`read_input`]; [`Error::Format`] naming the file and the byte offset
/// if it is not UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = read_input(path, max_text_bytes())?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not UTF-8 text (at byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

/// How many symbolic links [`output_target`] follows before giving up (the
/// limit Linux's path resolution has).
const MAX_LINK_HOPS: usize = 40;

/// Where an output written to `path` goes: `path` itself when it is a
/// regular file or does not exist yet; when it is a symbolic link, the file
/// at the end of the link chain (which may not exist yet), so that writing
/// replaces the link's target and keeps the link.
///
/// # Errors
/// [`Error::Format`] naming the path and what it is when it (or the link's
/// target) is a directory, FIFO, device or socket, or when the links loop;
/// [`Error::Io`] when it cannot be inspected.
pub fn output_target(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINK_HOPS {
        match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(Error::io(&p, e)),
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p).map_err(|e| Error::io(&p, e))?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            Ok(m) if m.is_file() => return Ok(p),
            Ok(m) => {
                let via = if p == path {
                    String::new()
                } else {
                    format!(" (the target of {})", path.display())
                };
                return Err(Error::format(
                    &p,
                    format!(
                        "{}{via}; outputs are written to regular files only, \
                         never over a directory or a special file",
                        kind_of(&m.file_type())
                    ),
                ));
            }
        }
    }
    Err(Error::format(
        path,
        format!("more than {MAX_LINK_HOPS} symbolic links (a loop?)"),
    ))
}

/// Whether `a` and `b` name the same existing file (after links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        #[cfg(unix)]
        (Ok(x), Ok(y)) => {
            use std::os::unix::fs::MetadataExt;
            x.dev() == y.dev() && x.ino() == y.ino()
        }
        #[cfg(not(unix))]
        (Ok(_), Ok(_)) => match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        },
        _ => false,
    }
}

/// Refuse to write `output` when it is the same file as one of `inputs`
/// (a run would otherwise replace what it reads, losing it).
///
/// # Errors
/// [`Error::InvalidArgument`] naming both paths.
pub fn refuse_input_as_output(output: &Path, inputs: &[&Path]) -> Result<()> {
    match inputs.iter().find(|i| same_file(output, i)) {
        Some(i) => Err(Error::invalid(
            "output",
            format!(
                "{} is the same file as the input {}: refusing to replace an input \
                 (choose another output path)",
                output.display(),
                i.display()
            ),
        )),
        None => Ok(()),
    }
}

/// The largest header the `safetensors` reader accepts (its own limit).
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Buffer size for output files: large enough that a write is one syscall
/// per megabyte, small enough not to matter for memory.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

impl MappedFile {
    /// Map `path` read-only.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file if it cannot be opened or mapped;
    /// [`Error::Format`] if it is not a regular file (a directory, a FIFO;
    /// see [`open_input`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = open_input(path)?;
        // SAFETY: the map is read-only and private to this process. Its
        // contents can change only if another process rewrites the file in
        // place while we hold the map; that is outside any Rust guarantee for
        // every file-backed map, and the tools here never modify an input
        // (outputs are written to a new file and renamed over the target).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Parse the file as safetensors (header and offsets are checked; tensor
    /// data is not read).
    ///
    /// # Errors
    /// [`Error::Format`] naming the file when the header is missing,
    /// truncated, not JSON, or its offsets do not cover the file exactly.
    pub fn safetensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| self.not_safetensors(&e))
    }

    /// The free-form `__metadata__` string map of the safetensors header, if
    /// any (transformers writes `{"format": "pt"}`).
    ///
    /// # Errors
    /// As [`safetensors`](Self::safetensors).
    pub fn safetensors_metadata(&self) -> Result<Option<HashMap<String, String>>> {
        let (_, meta) =
            SafeTensors::read_metadata(&self.map).map_err(|e| self.not_safetensors(&e))?;
        Ok(meta.metadata().clone())
    }

    fn not_safetensors(&self, e: &safetensors::SafeTensorError) -> Error {
        Error::format(
            &self.path,
            format!(
                "not a valid safetensors file ({} bytes; truncated or corrupt?): {e}",
                self.map.len()
            ),
        )
    }
}

/// Write `path` atomically: `write` fills a temporary file in the same
/// directory, which is flushed, synced to disk and then renamed onto `path`.
/// A symbolic link is written through: the file it names is replaced and the
/// link is kept ([`output_target`]); a directory, FIFO, device or socket is
/// refused before anything is written.
///
/// If `write` fails, or anything after it does, the temporary file is
/// removed and `path` is left as it was (absent, or its previous contents).
/// The new file gets the permissions a plain `File::create` would give it
/// (`0o666` less the umask on Unix).
///
/// # Errors
/// As [`output_target`]; whatever `write` returns; [`Error::Io`] naming the
/// file or directory for failures to create, write, sync or rename.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let target = output_target(path)?;
    let path = target.as_path();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::format(path, "output path has no file name"))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");

    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    // Dropping `tmp` on any early return below deletes the temporary file.
    let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;

    {
        let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, tmp.as_file());
        write(&mut w)?;
        w.flush().map_err(|e| Error::io(tmp.path(), e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // Make the rename itself durable. Not every filesystem can sync a
    // directory; the data is already safe, so a failure here is not an error.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes one tensor's bytes when its turn comes (see [`OutData::Deferred`]).
pub type Producer<'a> = Box<dyn FnOnce(&mut dyn Write) -> Result<()> + 'a>;

/// How an output tensor's bytes are produced.
pub enum OutData<'a> {
    /// Bytes already at hand (borrowed from an input map, or owned).
    Bytes(Cow<'a, [u8]>),
    /// Bytes produced when the tensor is written: the closure must write
    /// exactly the tensor's size (dtype × shape) in little-endian order.
    Deferred(Producer<'a>),
}

impl std::fmt::Debug for OutData<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutData::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            OutData::Deferred(_) => f.write_str("Deferred"),
        }
    }
}

/// One tensor of an output safetensors file.
#[derive(Debug)]
pub struct OutTensor<'a> {
    /// Its name in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Its contents.
    pub data: OutData<'a>,
}

impl<'a> OutTensor<'a> {
    /// A tensor whose bytes are already at hand.
    pub fn bytes(
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
            data: OutData::Bytes(data.into()),
        }
    }

    /// A tensor whose bytes `produce` writes when its turn comes.
    pub fn deferred(
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        produce: impl FnOnce(&mut dyn Write) -> Result<()> + 'a,
    ) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
            data: OutData::Deferred(Box::new(produce)),
        }
    }
}

/// Bytes of a tensor of `dtype` and `shape`, or `None` on overflow or a
/// sub-byte type whose size is not a whole number of bytes.
pub fn tensor_nbytes(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let bits = numel.checked_mul(dtype.bitsize())?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// A writer that counts what passes through it.
struct Counting<'w> {
    inner: &'w mut dyn Write,
    written: usize,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Write `tensors` (and the optional `__metadata__` map) as a safetensors
/// file at `path`, atomically (see [`write_atomic`]).
///
/// Tensors are laid out as the `safetensors` crate lays them out (by
/// decreasing dtype alignment, then by name), and the header is that crate's
/// serialization, padded with spaces to a multiple of 8 bytes. `on_written`
/// is called with each tensor's name and byte size once it is written.
///
/// # Errors
/// [`Error::InvalidArgument`] for duplicate names, a byte buffer whose length
/// does not match its dtype and shape, a deferred tensor that writes the
/// wrong number of bytes, or a header too large for readers; whatever a
/// deferred tensor returns; [`Error::Io`] naming the file. On any error the
/// destination is left untouched.
pub fn write_safetensors(
    path: &Path,
    mut tensors: Vec<OutTensor<'_>>,
    metadata: Option<HashMap<String, String>>,
    on_written: &mut dyn FnMut(&str, u64),
) -> Result<()> {
    const OP: &str = "write safetensors";
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in &tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::invalid(
                OP,
                format!("{}: tensor `{}` appears twice", path.display(), t.name),
            ));
        }
    }
    tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));

    let mut infos = Vec::with_capacity(tensors.len());
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in &tensors {
        let n = tensor_nbytes(t.dtype, &t.shape).ok_or_else(|| {
            Error::invalid(
                OP,
                format!(
                    "tensor `{}`: shape {:?} of {:?} has no whole-byte size",
                    t.name, t.shape, t.dtype
                ),
            )
        })?;
        if let OutData::Bytes(b) = &t.data
            && b.len() != n
        {
            return Err(Error::invalid(
                OP,
                format!(
                    "tensor `{}`: {} bytes given for {:?} {:?} ({n} bytes)",
                    t.name,
                    b.len(),
                    t.dtype,
                    t.shape
                ),
            ));
        }
        let end = offset
            .checked_add(n)
            .ok_or_else(|| Error::invalid(OP, "total tensor size overflows"))?;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        sizes.push(n);
        offset = end;
    }
    let header =
        Metadata::new(metadata, infos).map_err(|e| Error::invalid(OP, format!("header: {e}")))?;
    let mut header = serde_json::to_string(&header)
        .map_err(|e| Error::invalid(OP, format!("header: {e}")))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() > MAX_HEADER_BYTES {
        return Err(Error::invalid(
            OP,
            format!(
                "header of {} bytes exceeds the {MAX_HEADER_BYTES}-byte limit of safetensors readers",
                header.len()
            ),
        ));
    }

    write_atomic(path, |w| {
        let io = |e| Error::io(path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for (t, n) in tensors.into_iter().zip(sizes) {
            match t.data {
                OutData::Bytes(b) => w.write_all(&b).map_err(io)?,
                OutData::Deferred(produce) => {
                    let mut c = Counting {
                        inner: &mut *w,
                        written: 0,
                    };
                    produce(&mut c)?;
                    if c.written != n {
                        return Err(Error::invalid(
                            OP,
                            format!(
                                "tensor `{}`: wrote {} bytes for {:?} {:?}, expected {n}",
                                t.name, c.written, t.dtype, t.shape
                            ),
                        ));
                    }
                }
            }
            on_written(&t.name, n as u64);
        }
        Ok(())
    })
}
