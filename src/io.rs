//! Checkpoint file I/O: memory-mapped safetensors input and atomic
//! safetensors output.
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
    /// [`Error::Format`] if it is not a regular file (a directory, say).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::format(path, "not a regular file"));
        }
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
///
/// If `write` fails, or anything after it does, the temporary file is
/// removed and `path` is left as it was (absent, or its previous contents).
/// The new file gets the permissions a plain `File::create` would give it
/// (`0o666` less the umask on Unix).
///
/// # Errors
/// Whatever `write` returns; [`Error::Io`] naming the file or directory for
/// failures to create, write, sync or rename.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
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
