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

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::AggregatorError;

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
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
        let sha = sha256_hex(bytes);
        let path = self.path(&sha);
        // Already there and intact: nothing to do (same name = same bytes).
        if let Ok(existing) = std::fs::read(&path) {
            if sha256_hex(&existing) == sha {
                return Ok(sha);
            }
            tracing::warn!(blob = %sha, "replacing a corrupt blob file");
        }
        let folder = path.parent().expect("blob path has a folder");
        std::fs::create_dir_all(folder).map_err(io(format!("creating {}", folder.display())))?;
        let mut tmp = tempfile::NamedTempFile::new_in(folder)
            .map_err(io(format!("temporary file in {}", folder.display())))?;
        tmp.write_all(bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io(format!("writing blob {sha}")))?;
        tmp.persist(&path)
            .map_err(|e| AggregatorError::Blob(format!("renaming blob {sha}: {}", e.error)))?;
        std::fs::File::open(folder)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", folder.display())))?;
        Ok(sha)
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
}
