//! Content-addressed blob store on disk: global models and accepted updates, named by the
//! SHA-256 of their bytes.
//!
//! Layout: `DIR/ab/abcdef…` (first two hex digits as a fan-out folder). A blob is written to a
//! temporary file in the same folder, flushed with `fsync`, renamed into place, and the folder
//! is `fsync`ed, so after [`BlobStore::put`] returns the blob survives a crash (SIGKILL, power
//! loss on a filesystem that honours `fsync`). Every read re-hashes the bytes, so a corrupted
//! or truncated file is reported, never aggregated.
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
/// [`AggregatorError::Blob`] if the file cannot be read.
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

/// A blob being written: see [`BlobStore::writer`].
#[derive(Debug)]
pub struct BlobWriter {
    file: std::io::BufWriter<tempfile::NamedTempFile>,
    hasher: Sha256,
    len: u64,
    /// File offset up to which write-back has been started.
    written_back: u64,
}

/// Start the disk write-back of a blob's pages every this many bytes, so the fsync before
/// the acknowledgement has little left to do and the disk is kept busy while bytes arrive.
const WRITE_BACK_EVERY: u64 = 8 << 20;

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        let in_file = self.len - self.file.buffer().len() as u64;
        if in_file >= self.written_back + WRITE_BACK_EVERY {
            start_write_back(self.file.get_ref().as_file(), self.written_back);
            self.written_back = in_file;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
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
    /// pending blob deletes the file.
    ///
    /// # Errors
    pub fn finish(mut self) -> PendingBlob {
        let sha = hex::encode(self.hasher.finalize_reset());
        // A write error can surface on the final flush; keep it and report it at commit.
        let error = self.file.flush().err().map(|e| e.to_string());
        let (tmp, _) = self.file.into_parts();
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
    error: Option<String>,
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
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AggregatorError {
    move |e| AggregatorError::Blob(format!("{what}: {e}"))
}

fn valid_sha(sha: &str) -> bool {
    sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl BlobStore {
    /// Open (creating if needed) the store in `dir`.
    ///
    /// # Errors
    /// [`AggregatorError::Blob`] if the folder cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, AggregatorError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(format!(
            "cannot create blob folder {} (check --blob-dir)",
            dir.display()
        )))?;
        // Uploads cut off by a crash leave temporary files; nothing refers to them.
        for entry in std::fs::read_dir(&dir)
            .map_err(io(format!("listing {}", dir.display())))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir })
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
    /// [`AggregatorError::Blob`] on IO failure (disk full, permissions).
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
    /// [`AggregatorError::Blob`] if the temporary file cannot be created.
    pub fn writer(&self) -> Result<BlobWriter, AggregatorError> {
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(io(format!("temporary file in {}", self.dir.display())))?;
        Ok(BlobWriter {
            file: std::io::BufWriter::with_capacity(1 << 20, tmp),
            hasher: Sha256::new(),
            len: 0,
            written_back: 0,
        })
    }

    /// Make a written blob durable under its name (fsync, rename, folder fsync); returns the
    /// name. If an intact blob of that name exists, the new file is dropped.
    ///
    /// # Errors
    /// [`AggregatorError::Blob`] on IO failure.
    pub fn commit(&self, pending: PendingBlob) -> Result<String, AggregatorError> {
        let PendingBlob {
            tmp, sha, error, ..
        } = pending;
        if let Some(e) = error {
            return Err(AggregatorError::Blob(format!("writing blob {sha}: {e}")));
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
            .map_err(|e| AggregatorError::Blob(format!("renaming blob {sha}: {}", e.error)))?;
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
    /// [`AggregatorError::Blob`] if the name is not a SHA-256, the file is missing, or its
    /// bytes hash to something else (corruption, truncation).
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
        assert!(w.written_back >= WRITE_BACK_EVERY, "write-back was started");
        let sha = s.commit(w.finish()).unwrap();
        assert_eq!(sha, sha256_hex(&bytes));
        assert_eq!(s.get(&sha).unwrap(), bytes);
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
