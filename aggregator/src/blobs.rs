//! Content-addressed blob store on disk: global models and accepted updates, named by the
//! SHA-256 of their bytes.
//!
//! Layout: `DIR/ab/abcdef…` (first two hex digits as a fan-out folder). A blob is written to a
//! temporary file in the same folder, flushed with `fsync`, renamed into place, and the folder
//! is `fsync`ed, so after [`BlobStore::put`] returns the blob survives a crash (SIGKILL, power
//! loss on a filesystem that honours `fsync`). Every read re-hashes the bytes, so a corrupted
//! or truncated file is reported, never aggregated.
//!
//! The updates of a large round are written with direct I/O (`O_DIRECT`,
//! [`BlobStore::update_writer`]) where the filesystem allows it, so gigabytes of updates per
//! round do not pass through the page cache; models and small rounds are written through it.
//!
//! Writing the same bytes twice is idempotent. A crash between `put` and the database row that
//! refers to the blob leaves an unreferenced file, which is harmless.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::AggregatorError;

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Prefix of temporary files (uploads in progress) in the store's folder.
const TMP_PREFIX: &str = ".incoming-";

/// SHA-256 of a file's bytes, lowercase hex, read in 1 MiB blocks.
///
/// # Errors
/// [`AggregatorError::BlobIo`] if the file cannot be read.
pub fn hash_file(path: &Path) -> Result<String, AggregatorError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io(format!("reading {}", path.display())))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Ask the kernel to start writing `file`'s dirty pages from `offset` to the end to disk,
/// without waiting (`sync_file_range(2)` with `SYNC_FILE_RANGE_WRITE`). A hint only: it
/// makes nothing durable (the fsync in [`BlobStore::commit`] does), so its result is ignored.
/// On this project's test machine it raised the write bandwidth of 1 GiB in 1 MiB writes plus
/// fsync from 1.0–1.4 to 1.7–2.2 GB/s (BENCHMARKS.md).
#[cfg(target_os = "linux")]
fn start_write_back(file: &std::fs::File, offset: u64) {
    use std::os::fd::AsRawFd;
    let Ok(offset) = i64::try_from(offset) else {
        return;
    };
    // SAFETY: plain syscall on a file descriptor this process owns and keeps open for the
    // call; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_write_back(_: &std::fs::File, _: u64) {}

/// Alignment of direct I/O buffers, file offsets and write sizes: the largest logical block
/// size of common disks (512 B or 4 KiB).
const DIRECT_ALIGN: usize = 4096;

/// Size of a direct writer's buffer: every write but the last is this size.
const DIRECT_BUFFER: usize = 1 << 20;

/// When the updates of a round are written with direct I/O (`--direct-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// For rounds larger than the kernel's background write-back threshold (see
    /// [`BlobStore::direct_io_above`]).
    #[default]
    Auto,
    /// Never: every update goes through the page cache.
    Off,
    /// For rounds of more than this many bytes of updates (0: every round).
    Above(u64),
}

impl std::str::FromStr for DirectIo {
    type Err = String;
    /// `auto`, `off`, or a round size in MB (10^6 bytes).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            _ => s
                .parse::<f64>()
                .ok()
                .filter(|mb| mb.is_finite() && *mb >= 0.0)
                .map(|mb| Self::Above((mb * 1e6) as u64))
                .ok_or_else(|| {
                    format!("`{s}` is not `auto`, `off` or a round size in MB (e.g. 2000)")
                }),
        }
    }
}

/// Round size above which updates are written with direct I/O when `/proc` cannot be read.
const FALLBACK_DIRECT_IO_ABOVE: u64 = 2 << 30;

/// The amount of dirty page cache at which Linux starts writing back in the background:
/// `vm.dirty_background_bytes`, or `vm.dirty_background_ratio` % (default 10) of available
/// memory (`MemAvailable`, a close stand-in for the kernel's "dirtyable" memory).
///
/// A round whose updates fit under it is absorbed by the page cache, and its close reads the
/// updates from memory. A larger one is written back while it arrives and, past
/// `vm.dirty_ratio`, throttled to the disk's buffered write rate: on this project's test
/// machine (24 GiB, threshold about 2.4 GB) rounds of 5.6–6.4 GB ingested at 220–300 MB/s
/// buffered and 400–480 MB/s with direct I/O (BENCHMARKS.md).
fn write_back_threshold() -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let number = |s: &str| s.trim().parse::<u64>().ok();
    if let Some(b) = read("/proc/sys/vm/dirty_background_bytes")
        .and_then(|s| number(&s))
        .filter(|&b| b > 0)
    {
        return b;
    }
    let ratio = read("/proc/sys/vm/dirty_background_ratio")
        .and_then(|s| number(&s))
        .unwrap_or(10);
    let available_kib = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| number(v.trim_end().trim_end_matches("kB")))
    });
    available_kib.map_or(FALLBACK_DIRECT_IO_ABOVE, |k| k * 1024 / 100 * ratio)
}

/// Where a blob's bytes go.
#[derive(Debug)]
enum Sink {
    /// Through the page cache, 1 MiB at a time.
    Buffered {
        file: std::io::BufWriter<tempfile::NamedTempFile>,
        /// File offset up to which write-back has been started.
        written_back: u64,
    },
    /// Around it (`O_DIRECT`): whole aligned blocks from an aligned buffer, the last one
    /// padded with zeros and the file truncated to its length by [`BlobWriter::finish`].
    Direct {
        tmp: tempfile::NamedTempFile,
        /// `DIRECT_BUFFER + DIRECT_ALIGN` bytes; the aligned block starts at `start`.
        buf: Vec<u8>,
        start: usize,
        filled: usize,
    },
}

/// A blob being written: see [`BlobStore::writer`] and [`BlobStore::update_writer`].
#[derive(Debug)]
pub struct BlobWriter {
    sink: Sink,
    hasher: Sha256,
    len: u64,
}

/// Start the disk write-back of a blob's pages every this many bytes, so the fsync before
/// the acknowledgement has little left to do and the disk is kept busy while bytes arrive.
const WRITE_BACK_EVERY: u64 = 8 << 20;

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match &mut self.sink {
            Sink::Buffered { file, written_back } => {
                let n = file.write(buf)?;
                let in_file = self.len + n as u64 - file.buffer().len() as u64;
                if in_file >= *written_back + WRITE_BACK_EVERY {
                    start_write_back(file.get_ref().as_file(), *written_back);
                    *written_back = in_file;
                }
                n
            }
            Sink::Direct {
                tmp,
                buf: block,
                start,
                filled,
            } => {
                let n = buf.len().min(DIRECT_BUFFER - *filled);
                block[*start + *filled..*start + *filled + n].copy_from_slice(&buf[..n]);
                *filled += n;
                if *filled == DIRECT_BUFFER {
                    tmp.as_file()
                        .write_all(&block[*start..*start + DIRECT_BUFFER])?;
                    *filled = 0;
                }
                n
            }
        };
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.sink {
            Sink::Buffered { file, .. } => file.flush(),
            // Only whole blocks can be written; the rest waits for `finish`.
            Sink::Direct { .. } => Ok(()),
        }
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stop writing: the blob's SHA-256 is known, its file can be read back for validation
    /// ([`PendingBlob::path`]) before [`BlobStore::commit`] makes it durable. Dropping the
    /// pending blob deletes the file. A write error of the last bytes is kept and reported
    /// by [`BlobStore::commit`].
    pub fn finish(mut self) -> PendingBlob {
        let sha = hex::encode(self.hasher.finalize_reset());
        // A write error can surface on the final write; keep it and report it at commit.
        let (tmp, error) = match self.sink {
            Sink::Buffered { mut file, .. } => {
                let error = file.flush().err();
                (file.into_parts().0, error)
            }
            Sink::Direct {
                tmp,
                mut buf,
                start,
                filled,
            } => {
                let padded = filled.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                buf[start + filled..start + padded].fill(0);
                let error = tmp
                    .as_file()
                    .write_all(&buf[start..start + padded])
                    .and_then(|()| tmp.as_file().set_len(self.len))
                    .err();
                (tmp, error)
            }
        };
        PendingBlob {
            tmp,
            sha,
            len: self.len,
            error,
        }
    }
}

/// A fully written, not yet durable blob.
#[derive(Debug)]
pub struct PendingBlob {
    tmp: tempfile::NamedTempFile,
    sha: String,
    len: u64,
    error: Option<std::io::Error>,
}

impl PendingBlob {
    /// SHA-256 of the bytes written, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha
    }
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The temporary file holding the bytes.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
}

/// A folder of blobs named by their SHA-256.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    /// Rounds of more update bytes than this are written with direct I/O; `None` if the
    /// folder's filesystem does not take it (probed by [`BlobStore::open`]).
    direct_above: Option<u64>,
}

/// A temporary file in `dir` opened for direct I/O (`O_DIRECT`), or why not.
#[cfg(target_os = "linux")]
fn direct_tempfile(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::OpenOptionsExt;
    tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .make_in(dir, |path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_DIRECT)
                .open(path)
        })
}

#[cfg(not(target_os = "linux"))]
fn direct_tempfile(_: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    Err(std::io::Error::other("direct I/O is only used on Linux"))
}

/// A buffer of `DIRECT_BUFFER` bytes aligned for direct I/O, as (storage, offset of the
/// aligned start): allocated with room to spare, so no unsafe allocation is needed.
fn aligned_buffer() -> (Vec<u8>, usize) {
    let buf = vec![0u8; DIRECT_BUFFER + DIRECT_ALIGN];
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    (buf, start)
}

/// Whether direct I/O works in `dir`: open a temporary file with `O_DIRECT` and write one
/// aligned block. Filesystems without it (some network and FUSE filesystems, tmpfs before
/// Linux 6.6) refuse the open or the write.
fn probe_direct_io(dir: &Path) -> Result<(), std::io::Error> {
    let tmp = direct_tempfile(dir)?;
    let (buf, start) = aligned_buffer();
    tmp.as_file().write_all(&buf[start..start + DIRECT_ALIGN])
}

/// An IO error's mapping, saying what was being done.
pub(crate) fn io(what: String) -> impl FnOnce(std::io::Error) -> AggregatorError {
    move |source| AggregatorError::BlobIo { what, source }
}

fn valid_sha(sha: &str) -> bool {
    sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl BlobStore {
    /// Open (creating if needed) the store in `dir`, with updates written through the page
    /// cache unless their round is large ([`DirectIo::Auto`]).
    ///
    /// # Errors
    /// [`AggregatorError::BlobIo`] if the folder cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, AggregatorError> {
        Self::open_with(dir, DirectIo::Auto)
    }

    /// Open (creating if needed) the store in `dir`; `direct` says which rounds' updates are
    /// written with direct I/O, if the folder's filesystem takes it (probed here by writing
    /// one block to a temporary file).
    ///
    /// # Errors
    /// [`AggregatorError::BlobIo`] if the folder cannot be created.
    pub fn open_with(dir: impl Into<PathBuf>, direct: DirectIo) -> Result<Self, AggregatorError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(format!(
            "cannot create blob folder {} (check --blob-dir)",
            dir.display()
        )))?;
        // Uploads cut off by a crash leave temporary files; nothing refers to them.
        // (The direct I/O probe below leaves none: its file is deleted when dropped.)
        for entry in std::fs::read_dir(&dir)
            .map_err(io(format!("listing {}", dir.display())))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // Probed only when direct I/O may be used.
        let direct_above = match direct {
            DirectIo::Off => None,
            _ if let Err(e) = probe_direct_io(&dir) => {
                tracing::info!(folder = %dir.display(), error = %e, "direct I/O unavailable: all updates are written through the page cache");
                None
            }
            DirectIo::Auto => Some(write_back_threshold()),
            DirectIo::Above(b) => Some(b),
        };
        Ok(Self { dir, direct_above })
    }

    /// Rounds of more update bytes than this are written with direct I/O
    /// ([`BlobStore::update_writer`]); `None` if it is off or the filesystem does not take it.
    pub fn direct_io_above(&self) -> Option<u64> {
        self.direct_above
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(&sha[..2]).join(sha)
    }

    /// Store `bytes` durably; returns their SHA-256 (lowercase hex), the blob's name.
    ///
    /// # Errors
    /// [`AggregatorError::BlobIo`] on IO failure (disk full, permissions).
    pub fn put(&self, bytes: &[u8]) -> Result<String, AggregatorError> {
        let mut w = self.writer()?;
        w.write_all(bytes)
            .map_err(io("writing a blob".to_owned()))?;
        self.commit(w.finish())
    }

    /// A writer for a new blob: bytes go to a temporary file in the store's folder and are
    /// hashed as they are written, so a blob of any size needs O(1) memory.
    ///
    /// # Errors
    /// [`AggregatorError::BlobIo`] if the temporary file cannot be created.
    pub fn writer(&self) -> Result<BlobWriter, AggregatorError> {
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(io(format!("temporary file in {}", self.dir.display())))?;
        Ok(BlobWriter {
            sink: Sink::Buffered {
                file: std::io::BufWriter::with_capacity(1 << 20, tmp),
                written_back: 0,
            },
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// A writer for an update of a round of about `round_bytes` bytes of updates: as
    /// [`BlobStore::writer`], but with direct I/O if `round_bytes` is over
    /// [`BlobStore::direct_io_above`] (the kernel's background write-back threshold). The
    /// bytes then bypass the page cache: memory is one aligned 1 MiB buffer, and the round's
    /// close reads the update from the disk rather than from memory.
    ///
    /// # Errors
    /// [`AggregatorError::BlobIo`] if the temporary file cannot be created.
    pub fn update_writer(&self, round_bytes: u64) -> Result<BlobWriter, AggregatorError> {
        if self.direct_above.is_none_or(|t| round_bytes <= t) {
            return self.writer();
        }
        let tmp = direct_tempfile(&self.dir).map_err(io(format!(
            "temporary file for direct I/O in {}",
            self.dir.display()
        )))?;
        let (buf, start) = aligned_buffer();
        Ok(BlobWriter {
            sink: Sink::Direct {
                tmp,
                buf,
                start,
                filled: 0,
            },
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Make a written blob durable under its name (fsync, rename, folder fsync); returns the
    /// name. If an intact blob of that name exists, the new file is dropped.
    ///
    /// # Errors
    /// [`AggregatorError::BlobIo`] on IO failure.
    pub fn commit(&self, pending: PendingBlob) -> Result<String, AggregatorError> {
        let PendingBlob {
            tmp, sha, error, ..
        } = pending;
        if let Some(e) = error {
            return Err(io(format!("writing blob {sha}"))(e));
        }
        let path = self.path(&sha);
        // Already there and intact: nothing to do (same name = same bytes).
        if path.exists() {
            match hash_file(&path) {
                Ok(h) if h == sha => return Ok(sha),
                _ => tracing::warn!(blob = %sha, "replacing a corrupt blob file"),
            }
        }
        let folder = path.parent().expect("blob path has a folder");
        std::fs::create_dir_all(folder).map_err(io(format!("creating {}", folder.display())))?;
        tmp.as_file()
            .sync_all()
            .map_err(io(format!("writing blob {sha}")))?;
        tmp.persist(&path)
            .map_err(|e| e.error)
            .map_err(io(format!("renaming blob {sha}")))?;
        std::fs::File::open(folder)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", folder.display())))?;
        Ok(sha)
    }

    /// The path of blob `sha`, which must exist. Its bytes are not checked here: readers that
    /// stream a blob check its SHA-256 as they go ([`crate::tensors::FileTensors`],
    /// [`hash_file`]).
    ///
    /// # Errors
    /// [`AggregatorError::Blob`] if the name is not a SHA-256 or the file is missing.
    pub fn existing_path(&self, sha: &str) -> Result<PathBuf, AggregatorError> {
        if !valid_sha(sha) {
            return Err(AggregatorError::Blob(format!(
                "`{sha}` is not a lowercase hex SHA-256"
            )));
        }
        let path = self.path(sha);
        if !path.is_file() {
            return Err(AggregatorError::Blob(format!(
                "blob {sha} missing from {} (was --blob-dir changed or the folder deleted?)",
                self.dir.display()
            )));
        }
        Ok(path)
    }

    /// The bytes of blob `sha`, checked against their name.
    ///
    /// # Errors
    /// [`AggregatorError::Blob`] if the name is not a SHA-256 or its bytes hash to something
    /// else (corruption, truncation); [`AggregatorError::BlobIo`] if the file cannot be read
    /// (missing).
    pub fn get(&self, sha: &str) -> Result<Vec<u8>, AggregatorError> {
        if !valid_sha(sha) {
            return Err(AggregatorError::Blob(format!(
                "`{sha}` is not a lowercase hex SHA-256"
            )));
        }
        let path = self.path(sha);
        let bytes = std::fs::read(&path).map_err(io(format!(
            "blob {sha} missing from {} (was --blob-dir changed or the folder deleted?)",
            self.dir.display()
        )))?;
        let got = sha256_hex(&bytes);
        if got != sha {
            return Err(AggregatorError::Blob(format!(
                "blob {} is corrupt: its {} bytes hash to {got}",
                path.display(),
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob of several write-back periods, written in uneven pieces (some through the
    /// buffer, some past it), comes back byte for byte under its SHA-256.
    #[test]
    fn large_blobs_written_in_pieces_with_write_back_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path().join("blobs")).unwrap();
        let bytes: Vec<u8> = (0..(2 * WRITE_BACK_EVERY + 12_345))
            .map(|i| ((i * 2_654_435_761) >> 13) as u8)
            .collect();
        let mut w = s.writer().unwrap();
        let mut rest = &bytes[..];
        for piece in [1usize, 100_000, 3 << 20, 777, 9 << 20].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let k = (*piece).min(rest.len());
            w.write_all(&rest[..k]).unwrap();
            rest = &rest[k..];
        }
        let Sink::Buffered { written_back, .. } = &w.sink else {
            panic!("writer() writes through the page cache");
        };
        assert!(*written_back >= WRITE_BACK_EVERY, "write-back was started");
        let sha = s.commit(w.finish()).unwrap();
        assert_eq!(sha, sha256_hex(&bytes));
        assert_eq!(s.get(&sha).unwrap(), bytes);
    }

    /// Updates of rounds over the write-back threshold take the direct path; whatever the length
    /// (empty, under one block, whole buffers, ragged tail) and however the bytes are cut,
    /// the blob comes back byte for byte under its SHA-256, with the file at its exact length.
    #[test]
    fn direct_io_updates_round_trip_at_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let above = s.direct_io_above();
        if cfg!(target_os = "linux") {
            assert!(
                above.is_some(),
                "the filesystem of {} refuses O_DIRECT; run the tests with TMPDIR on a local disk",
                dir.path().display()
            );
        }
        let above = above.unwrap_or(u64::MAX - 1);
        assert!(
            above >= 64 << 20,
            "threshold {above} B is below the page cache's reach"
        );
        let small = s.update_writer(above).unwrap();
        assert!(matches!(small.sink, Sink::Buffered { .. }));
        for len in [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_BUFFER,
            2 * DIRECT_BUFFER + 12_345,
        ] {
            let bytes: Vec<u8> = (0..len)
                .map(|i| ((i * 2_654_435_761) >> 13) as u8)
                .collect();
            let mut w = s.update_writer(above + 1).unwrap();
            assert_eq!(
                matches!(w.sink, Sink::Direct { .. }),
                s.direct_io_above().is_some(),
                "large rounds use direct I/O where it works"
            );
            let mut rest = &bytes[..];
            for piece in [1usize, 100_000, 3 << 20, 777].iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let k = (*piece).min(rest.len());
                w.write_all(&rest[..k]).unwrap();
                rest = &rest[k..];
            }
            let pending = w.finish();
            assert_eq!(std::fs::metadata(pending.path()).unwrap().len(), len as u64);
            let sha = s.commit(pending).unwrap();
            assert_eq!(sha, sha256_hex(&bytes), "length {len}");
            assert_eq!(s.get(&sha).unwrap(), bytes, "length {len}");
        }
    }

    /// `--direct-io` takes `auto`, `off` or MB, and names a bad value; `off` turns direct I/O
    /// off whatever the filesystem, and a size becomes the threshold.
    #[test]
    fn direct_io_setting_parses_and_sets_the_threshold() {
        assert_eq!("auto".parse(), Ok(DirectIo::Auto));
        assert_eq!("off".parse(), Ok(DirectIo::Off));
        assert_eq!("2000".parse(), Ok(DirectIo::Above(2_000_000_000)));
        assert_eq!("0".parse(), Ok(DirectIo::Above(0)));
        for bad in ["-1", "NaN", "lots", ""] {
            let e = bad.parse::<DirectIo>().unwrap_err();
            assert!(e.contains(&format!("`{bad}`")) && e.contains("auto"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let off = BlobStore::open_with(dir.path(), DirectIo::Off).unwrap();
        assert_eq!(off.direct_io_above(), None);
        assert!(matches!(
            off.update_writer(u64::MAX).unwrap().sink,
            Sink::Buffered { .. }
        ));
        let above = BlobStore::open_with(dir.path(), DirectIo::Above(5)).unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(above.direct_io_above(), Some(5));
        }
    }

    #[test]
    fn put_get_round_trip_is_idempotent_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path().join("blobs")).unwrap();
        let a = s.put(b"update bytes").unwrap();
        assert_eq!(a, sha256_hex(b"update bytes"));
        assert_eq!(s.put(b"update bytes").unwrap(), a);
        assert_eq!(s.get(&a).unwrap(), b"update bytes");
        // Corrupt the file on disk: the read names the blob and refuses it.
        std::fs::write(s.path(&a), b"update bytez").unwrap();
        let e = s.get(&a).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        // Writing the true bytes again repairs it.
        s.put(b"update bytes").unwrap();
        assert_eq!(s.get(&a).unwrap(), b"update bytes");
        assert!(
            s.get(&"0".repeat(64))
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        assert!(s.get("../../etc/passwd").is_err());
    }

    #[test]
    fn streamed_blobs_commit_atomically_and_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let mut w = s.writer().unwrap();
        w.write_all(b"part one, ").unwrap();
        w.write_all(b"part two").unwrap();
        let pending = w.finish();
        assert_eq!(pending.sha256(), sha256_hex(b"part one, part two"));
        assert_eq!(
            std::fs::read(pending.path()).unwrap(),
            b"part one, part two"
        );
        let sha = s.commit(pending).unwrap();
        assert_eq!(s.get(&sha).unwrap(), b"part one, part two");
        assert_eq!(hash_file(&s.existing_path(&sha).unwrap()).unwrap(), sha);
        // An upload cut off by a crash leaves a temporary file; reopening sweeps it.
        let w = s.writer().unwrap();
        std::mem::forget(w);
        let leftovers = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
                .count()
        };
        assert_eq!(leftovers(), 1);
        BlobStore::open(dir.path()).unwrap();
        assert_eq!(leftovers(), 0);
    }
}
