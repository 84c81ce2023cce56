//! Model updates as flat f32 tensors, read with the `safetensors` crate (no libtorch).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::AggregatorError;

/// Largest safetensors header accepted (the crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

fn invalid(m: String) -> AggregatorError {
    AggregatorError::InvalidUpdate(m)
}

/// Write named F32 tensors in the safetensors format to `w`, streaming: the output is
/// byte-identical to `safetensors::serialize` of the same tensors (header from the crate's
/// `Metadata`, tensors in name order, little-endian data), but no copy of the data is made.
/// `entries` must be sorted by name.
///
/// # Errors
/// IO errors of `w`.
pub fn write_safetensors<'a, W: Write>(
    w: &mut W,
    entries: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])> + Clone,
) -> std::io::Result<()> {
    let mut offset = 0usize;
    let infos: Vec<(String, TensorInfo)> = entries
        .clone()
        .into_iter()
        .map(|(n, shape, d)| {
            let info = TensorInfo {
                dtype: Dtype::F32,
                shape: shape.to_vec(),
                data_offsets: (offset, offset + 4 * d.len()),
            };
            offset += 4 * d.len();
            (n.to_owned(), info)
        })
        .collect();
    let meta = Metadata::new(None, infos).map_err(std::io::Error::other)?;
    let mut header = serde_json::to_string(&meta)
        .map_err(std::io::Error::other)?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    let mut buf = Vec::with_capacity(1 << 16);
    for (_, _, d) in entries {
        for block in d.chunks(1 << 14) {
            buf.clear();
            buf.extend(block.iter().flat_map(|x| x.to_le_bytes()));
            w.write_all(&buf)?;
        }
    }
    Ok(())
}

/// Open a safetensors file and parse its header: the file, its length, the raw header bytes
/// (8-byte length + JSON, for hashing) and its tensor entries in name order.
///
/// # Errors
/// [`AggregatorError::InvalidUpdate`] ("not valid safetensors: …") for a short file, a header
/// length that does not fit, or a malformed header; [`AggregatorError::BlobIo`] for IO errors.
#[allow(clippy::type_complexity)]
fn read_header(
    path: &Path,
) -> Result<(File, u64, Vec<u8>, Vec<(String, TensorInfo)>), AggregatorError> {
    let io = |e| crate::blobs::io(format!("reading {}", path.display()))(e);
    let bad = |m: String| invalid(format!("not valid safetensors: {m}"));
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(bad(format!("{len} bytes is shorter than a header")));
    }
    let mut raw = vec![0u8; 8];
    file.read_exact_at(&mut raw, 0).map_err(io)?;
    let n = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || 8 + n > len {
        return Err(bad(format!(
            "header length {n} does not fit a file of {len} bytes"
        )));
    }
    raw.resize(8 + n as usize, 0);
    file.read_exact_at(&mut raw[8..], 8).map_err(io)?;
    let entries = parse_entries(&raw[8..])?;
    Ok((file, len, raw, entries))
}

/// The tensor entries of a safetensors JSON header, in name order (`__metadata__` skipped
/// unread), parsed straight into typed entries: no generic JSON tree is built.
fn parse_entries(json: &[u8]) -> Result<Vec<(String, TensorInfo)>, AggregatorError> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(String, TensorInfo)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a safetensors header object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(name) = map.next_key::<String>()? {
                if name == "__metadata__" {
                    map.next_value::<IgnoredAny>()?;
                } else {
                    let info: TensorInfo = map.next_value()?;
                    out.push((name, info));
                }
            }
            Ok(out)
        }
    }
    let bad = |m: String| invalid(format!("not valid safetensors: {m}"));
    let mut de = serde_json::Deserializer::from_slice(json);
    let mut entries = de
        .deserialize_map(Entries)
        .and_then(|e| de.end().map(|()| e))
        .map_err(|e| bad(format!("header: {e}")))?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(bad(format!(
            "tensor `{}` appears twice in the header",
            w[0].0
        )));
    }
    Ok(entries)
}

/// The longest safetensors header an update of this layout can need: each tensor's name,
/// dtype, shape and offsets, with room to spare, plus slack for `__metadata__`.
fn header_bound(names: &[String], shapes: &[Vec<usize>]) -> u64 {
    let per_tensor: u64 = names
        .iter()
        .zip(shapes)
        .map(|(n, s)| 2 * n.len() as u64 + 128 + 24 * s.len() as u64)
        .sum();
    per_tensor + 16 * 1024
}

/// Where a header's tensors lie: per reference tensor (in `names` order) the byte offset of
/// its data from the start of the file and its number of values; and every tensor as
/// (data start, data end, name) in on-disk order.
struct Bound {
    ranges: Vec<(u64, usize)>,
    spans: Vec<(u64, u64, String)>,
}

/// Check parsed header `entries` of a file of `len` bytes whose header JSON is `n` bytes
/// long (F32 only, offsets contiguous and matching shapes, length exact), and bind them to
/// the layout `names`/`shapes`.
///
/// # Errors
/// As [`FileTensors::open`].
#[allow(clippy::result_large_err)]
fn bind(
    entries: Vec<(String, TensorInfo)>,
    n: u64,
    len: u64,
    names: &[String],
    shapes: &[Vec<usize>],
) -> Result<Bound, Result<AggregatorError, AggregatorError>> {
    let bad = |m: String| Ok(invalid(format!("not valid safetensors: {m}")));
    let mut infos: Vec<(String, TensorInfo)> = Vec::with_capacity(entries.len());
    for (name, info) in entries {
        if info.dtype != Dtype::F32 {
            return Err(Ok(invalid(format!(
                "tensor `{name}` has dtype {:?}; updates must be F32",
                info.dtype
            ))));
        }
        infos.push((name, info));
    }
    // As the safetensors crate validates: data offsets contiguous from 0, each span the
    // size its shape needs, the last ending at the end of the file.
    infos.sort_by_key(|(_, i)| i.data_offsets);
    let data_start = 8 + n;
    let mut at = 0usize;
    for (name, info) in &infos {
        let (s, e) = info.data_offsets;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|x| x.checked_mul(4));
        if s != at || e < s || Some(e - s) != numel {
            return Err(bad(format!(
                "tensor `{name}` has data offsets {:?} that do not match its shape {:?}",
                info.data_offsets, info.shape
            )));
        }
        at = e;
    }
    if data_start + at as u64 != len {
        return Err(bad(format!(
            "the header describes {} data bytes, the file holds {}",
            at,
            len.saturating_sub(data_start)
        )));
    }
    // Bind to the reference layout.
    let mut ranges = Vec::with_capacity(names.len());
    for (name, shape) in names.iter().zip(shapes) {
        match infos.iter().find(|(n, _)| n == name) {
            None => {
                return Err(Err(invalid(format!(
                    "tensor `{name}` is missing (expected shape {shape:?})"
                ))));
            }
            Some((_, i)) if &i.shape != shape => {
                return Err(Err(invalid(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    i.shape
                ))));
            }
            Some((_, i)) => {
                ranges.push((data_start + i.data_offsets.0 as u64, shape.iter().product()));
            }
        }
    }
    if let Some((extra, _)) = infos.iter().find(|(n, _)| !names.contains(n)) {
        return Err(Err(invalid(format!(
            "tensor `{extra}` is not part of the global model"
        ))));
    }
    let spans = infos
        .into_iter()
        .map(|(name, i)| {
            let (s, e) = i.data_offsets;
            (data_start + s as u64, data_start + e as u64, name)
        })
        .collect();
    Ok(Bound { ranges, spans })
}

/// A safetensors file of F32 tensors bound to a reference layout, read in slices with
/// positioned reads: a model or update of any size is aggregated in O(slice) memory.
///
/// The file's SHA-256 is computed as it is read (the header first, then the tensors in their
/// on-disk order); [`FileTensors::verify_sha256`] completes it.
#[derive(Debug)]
pub struct FileTensors {
    file: File,
    path: std::path::PathBuf,
    len: u64,
    /// Per reference tensor: byte offset of its data in the file, number of values.
    ranges: Vec<(u64, usize)>,
    names: Vec<String>,
    hasher: Sha256,
    hashed: u64,
    bytes: Vec<u8>,
    /// File offset up to which read-ahead has been requested.
    prefetched: u64,
}

/// How far past a read [`FileTensors::read`] asks the kernel to read ahead: at least this, or
/// twice the read. A round's close reads many update files a slice at a time; files written
/// with direct I/O are not in the page cache, and asking for the next slices of every file at
/// once keeps the disk busy while the current slice is aggregated (the 16 × 100 M close went
/// from 13–14 s to 12 s on this project's test machine, BENCHMARKS.md).
const READ_AHEAD_MIN: u64 = 4 << 20;

/// Ask the kernel to read `len` bytes of `file` from `offset` into the page cache in the
/// background (`posix_fadvise(POSIX_FADV_WILLNEED)`). A hint: its result is ignored.
#[cfg(target_os = "linux")]
fn read_ahead(file: &File, offset: u64, len: u64) {
    let _ = rustix::fs::fadvise(
        file,
        offset,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::WillNeed,
    );
}

#[cfg(not(target_os = "linux"))]
fn read_ahead(_: &File, _: u64, _: u64) {}

impl FileTensors {
    /// Open `path`, parse and validate its header (F32 only, offsets contiguous and matching
    /// shapes, file length exact), and bind it to the layout `names`/`shapes` (sorted names).
    ///
    /// # Errors
    /// `Err(Ok(e))`: [`AggregatorError::InvalidUpdate`], the bytes are not a valid F32
    /// safetensors file; `Err(Err(e))`: valid, but not the reference layout (naming the first
    /// missing, unexpected or misshapen tensor). IO errors are `Blob` errors in the first
    /// group.
    #[allow(clippy::result_large_err)]
    pub fn open(
        path: &Path,
        names: &[String],
        shapes: &[Vec<usize>],
    ) -> Result<Self, Result<AggregatorError, AggregatorError>> {
        let (file, len, raw, entries) = read_header(path).map_err(Ok)?;
        let n = raw.len() as u64 - 8;
        let Bound { ranges, .. } = bind(entries, n, len, names, shapes)?;
        let mut hasher = Sha256::new();
        hasher.update(&raw);
        let data_start = 8 + n;
        Ok(Self {
            file,
            path: path.to_owned(),
            len,
            ranges,
            names: names.to_vec(),
            hasher,
            hashed: data_start,
            bytes: Vec::new(),
            prefetched: 0,
        })
    }

    /// The names (sorted) and shapes a safetensors file declares, to bind it to itself.
    ///
    /// # Errors
    /// As [`FileTensors::open`] (first group).
    pub fn layout(path: &Path) -> Result<(Vec<String>, Vec<Vec<usize>>), AggregatorError> {
        let (_, _, _, entries) = read_header(path)?;
        Ok(entries.into_iter().map(|(n, i)| (n, i.shape)).unzip())
    }

    /// Number of values of reference tensor `t`.
    pub fn numel(&self, t: usize) -> usize {
        self.ranges[t].1
    }

    /// Read values `start..start + out.len()` of reference tensor `t` into `out`.
    ///
    /// # Errors
    /// [`AggregatorError::BlobIo`] on IO failure.
    pub fn read(&mut self, t: usize, start: usize, out: &mut [f32]) -> Result<(), AggregatorError> {
        let (base, numel) = self.ranges[t];
        assert!(start + out.len() <= numel, "slice within tensor");
        let at = base + 4 * start as u64;
        self.bytes.resize(4 * out.len(), 0);
        self.file
            .read_exact_at(&mut self.bytes, at)
            .map_err(crate::blobs::io(format!(
                "reading tensor `{}`",
                self.names[t]
            )))?;
        let end = at + self.bytes.len() as u64;
        let ahead = (2 * self.bytes.len() as u64).max(READ_AHEAD_MIN);
        // Renewed once half the window is used, so each call asks for new bytes only.
        if end + ahead / 2 > self.prefetched {
            let from = self.prefetched.max(end);
            read_ahead(&self.file, from, end + ahead - from);
            self.prefetched = end + ahead;
        }
        if at == self.hashed {
            self.hasher.update(&self.bytes);
            self.hashed += self.bytes.len() as u64;
        }
        for (o, b) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Read every value once, in slices, refusing NaN and ±Inf.
    ///
    /// # Errors
    /// [`AggregatorError::InvalidUpdate`] naming the tensor and flat index of the first
    /// non-finite value; `Blob` on IO failure.
    pub fn check_finite(&mut self) -> Result<(), AggregatorError> {
        let mut buf = vec![0f32; 1 << 18];
        for t in 0..self.ranges.len() {
            let numel = self.numel(t);
            for start in (0..numel).step_by(buf.len()) {
                let k = buf.len().min(numel - start);
                self.read(t, start, &mut buf[..k])?;
                if let Some(i) = buf[..k].iter().position(|x| !x.is_finite()) {
                    return Err(invalid(format!(
                        "tensor `{}` has a non-finite value ({}) at flat index {}",
                        self.names[t],
                        buf[i],
                        start + i
                    )));
                }
            }
        }
        Ok(())
    }

    /// Check the file's bytes hash to `sha` (hex): from what was read if every byte was read
    /// in order, else by reading the file again.
    ///
    /// # Errors
    /// [`AggregatorError::Blob`] if they do not (corruption on disk);
    /// [`AggregatorError::BlobIo`] on IO failure.
    pub fn verify_sha256(&mut self, sha: &str) -> Result<(), AggregatorError> {
        let got = if self.hashed == self.len {
            hex::encode(self.hasher.finalize_reset())
        } else {
            crate::blobs::hash_file(&self.path)?
        };
        if got != sha {
            return Err(AggregatorError::Blob(format!(
                "blob {sha} is corrupt: its {} bytes hash to {got}",
                self.len
            )));
        }
        Ok(())
    }
}

/// Checks an update as its bytes arrive, as [`FileTensors::open`] and
/// [`FileTensors::check_finite`] would on the finished file: a valid F32 safetensors header
/// bound to the reference layout, then only finite values. The aggregator validates uploads
/// this way while they stream to disk, so a bad update is refused at its first bad byte and
/// a good one is never read back.
///
/// Memory: the header (bounded by the reference layout's: a few KB for real models) and 3
/// carried bytes.
#[derive(Debug)]
pub struct StreamCheck {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    /// Bytes received so far.
    pos: u64,
    /// The header bytes (8-byte length + JSON) until it is complete.
    head: Vec<u8>,
    /// The longest header accepted ([`header_bound`] of the reference layout).
    max_header: u64,
    /// Once the header is bound: tensors as (data start, data end, name), on-disk order.
    spans: Option<Vec<(u64, u64, String)>>,
    /// The bytes of a value split across two pieces.
    carry: Vec<u8>,
    /// The largest L2 norm accepted ([`StreamCheck::with_max_norm`]), and Σx² so far.
    max_norm: Option<f64>,
    sum_sq: f64,
}

impl StreamCheck {
    /// A check against the layout `names` (sorted) / `shapes`.
    pub fn new(names: &[String], shapes: &[Vec<usize>]) -> Self {
        Self {
            names: names.to_vec(),
            shapes: shapes.to_vec(),
            pos: 0,
            head: Vec::new(),
            max_header: header_bound(names, shapes),
            spans: None,
            carry: Vec::with_capacity(4),
            max_norm: None,
            sum_sq: 0.0,
        }
    }

    /// Also refuse the update once its L2 norm (over every value) exceeds `max_norm`: at the
    /// first chunk that takes it over, since Σx² only grows.
    #[must_use]
    pub fn with_max_norm(mut self, max_norm: f64) -> Self {
        self.max_norm = Some(max_norm);
        self
    }

    /// The L2 norm of the values checked so far.
    pub fn norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }

    /// Check the next `data` bytes of a file that will be `len` bytes long.
    ///
    /// # Errors
    /// As [`FileTensors::open`]: `Err(Ok(e))` not valid F32 safetensors or a non-finite value
    /// (naming the tensor and flat index), `Err(Err(e))` not the reference layout. After an
    /// error the check must not be fed again.
    #[allow(clippy::result_large_err)]
    pub fn feed(
        &mut self,
        mut data: &[u8],
        len: u64,
    ) -> Result<(), Result<AggregatorError, AggregatorError>> {
        let bad = |m: String| Ok(invalid(format!("not valid safetensors: {m}")));
        if self.spans.is_none() {
            let want = if self.head.len() < 8 {
                8
            } else {
                let n = u64::from_le_bytes(self.head[..8].try_into().expect("8 bytes"));
                if n > MAX_HEADER || 8 + n > len {
                    return Err(bad(format!(
                        "header length {n} does not fit a file of {len} bytes"
                    )));
                }
                if n > self.max_header {
                    return Err(bad(format!(
                        "header length {n} is more than this model's layout needs (at most {} bytes)",
                        self.max_header
                    )));
                }
                8 + n as usize
            };
            let take = (want - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            self.pos += take as u64;
            data = &data[take..];
            if self.head.len() < want {
                return Ok(());
            }
            if want == 8 {
                return self.feed(data, len);
            }
            let entries = parse_entries(&self.head[8..]).map_err(Ok)?;
            let n = self.head.len() as u64 - 8;
            self.spans = Some(bind(entries, n, len, &self.names, &self.shapes)?.spans);
            self.head = Vec::new();
        }
        // Values: whole 4-byte words, a split one completed from `carry`.
        let start = self.pos - self.carry.len() as u64;
        self.pos += data.len() as u64;
        if !self.carry.is_empty() {
            let k = (4 - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..k]);
            data = &data[k..];
            if self.carry.len() < 4 {
                return Ok(());
            }
            let w = std::mem::take(&mut self.carry);
            self.check_words(&w, start)?;
        }
        let whole = data.len() / 4 * 4;
        self.check_words(&data[..whole], self.pos - data.len() as u64)?;
        self.carry.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Refuse the first non-finite f32 in `words`, which start at file offset `at`; with a
    /// norm bound, add their squares to Σx² and refuse once it is over the bound.
    #[allow(clippy::result_large_err)]
    fn check_words(
        &mut self,
        words: &[u8],
        at: u64,
    ) -> Result<(), Result<AggregatorError, AggregatorError>> {
        self.check_finite_words(words, at)?;
        let Some(max) = self.max_norm else {
            return Ok(());
        };
        // Finite f32 squares in f64 cannot overflow; eight partial sums let the loop vectorize.
        let mut acc = [0f64; 8];
        let mut blocks = words.chunks_exact(32);
        for b in &mut blocks {
            for (a, w) in acc.iter_mut().zip(b.chunks_exact(4)) {
                let x = f64::from(f32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                *a += x * x;
            }
        }
        for (a, w) in acc.iter_mut().zip(blocks.remainder().chunks_exact(4)) {
            let x = f64::from(f32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            *a += x * x;
        }
        self.sum_sq += acc.iter().sum::<f64>();
        if self.norm() > max {
            return Err(Ok(invalid(format!(
                "update L2 norm is over {:.6} after {} bytes, above the bound {max:.6} = C·(1 + σ·(√d + 10)) \
                 of the federation's clipping norm and noise: clip the update to C before adding the noise",
                self.norm(),
                at + words.len() as u64
            ))));
        }
        Ok(())
    }

    #[allow(clippy::result_large_err)]
    fn check_finite_words(
        &self,
        words: &[u8],
        at: u64,
    ) -> Result<(), Result<AggregatorError, AggregatorError>> {
        // NaN and ±Inf are the f32s whose exponent bits are all ones.
        const EXPONENT: u32 = 0x7f80_0000;
        let bad = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & EXPONENT == EXPONENT;
        // A branch-free pass per block (the compiler vectorizes it); the position of the
        // first bad value is searched for only in a block that has one.
        const BLOCK: usize = 4 << 10;
        let Some(i) = words.chunks(BLOCK).enumerate().find_map(|(k, block)| {
            let any = block
                .chunks_exact(4)
                .fold(0u32, |acc, b| acc | u32::from(bad(b)));
            (any != 0).then(|| k * BLOCK / 4 + block.chunks_exact(4).position(bad).expect("found"))
        }) else {
            return Ok(());
        };
        let off = at + 4 * i as u64;
        let b = &words[4 * i..4 * i + 4];
        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let (s, _, name) = self
            .spans
            .iter()
            .flatten()
            .find(|(s, e, _)| (*s..*e).contains(&off))
            .expect("data bytes lie in a tensor: the header was bound to the file length");
        Err(Ok(invalid(format!(
            "tensor `{name}` has a non-finite value ({v}) at flat index {}",
            (off - s) / 4
        ))))
    }

    /// The stream ended: the header must have been complete (data length is checked by the
    /// chunk stream's total size, which the header was bound to).
    ///
    /// # Errors
    /// `Err(Ok(e))`: the file ended inside its header.
    #[allow(clippy::result_large_err)]
    pub fn finish(&self) -> Result<(), Result<AggregatorError, AggregatorError>> {
        if self.spans.is_none() {
            return Err(Ok(invalid(format!(
                "not valid safetensors: {} bytes end inside the header",
                self.pos
            ))));
        }
        Ok(())
    }
}

/// A model or update: named f32 tensors in name order.
///
/// Shapes are row-major; `data[i].len() == shapes[i].iter().product()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensors {
    /// Tensor names, sorted.
    pub names: Vec<String>,
    /// Shape of each tensor.
    pub shapes: Vec<Vec<usize>>,
    /// Values of each tensor.
    pub data: Vec<Vec<f32>>,
}

impl Tensors {
    /// Parse safetensors bytes holding only F32 tensors with finite values.
    ///
    /// # Errors
    /// [`AggregatorError::InvalidUpdate`] for malformed bytes (including headers that lie about
    /// sizes), non-F32 dtypes, or NaN/Inf values, naming the tensor.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, AggregatorError> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| AggregatorError::InvalidUpdate(format!("not valid safetensors: {e}")))?;
        let mut entries = st.tensors();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Tensors {
            names: vec![],
            shapes: vec![],
            data: vec![],
        };
        for (name, view) in entries {
            if view.dtype() != Dtype::F32 {
                return Err(AggregatorError::InvalidUpdate(format!(
                    "tensor `{name}` has dtype {:?}; updates must be F32",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(AggregatorError::InvalidUpdate(format!(
                    "tensor `{name}` has a non-finite value ({}) at flat index {i}",
                    data[i]
                )));
            }
            out.names.push(name);
            out.shapes.push(view.shape().to_vec());
            out.data.push(data);
        }
        Ok(out)
    }

    /// Read a safetensors file of F32 tensors (a stored global model) tensor by tensor, its
    /// SHA-256 checked against `sha`: memory is the model, not the model twice.
    ///
    /// # Errors
    /// [`AggregatorError::InvalidUpdate`] for a malformed file or non-finite values;
    /// [`AggregatorError::BlobIo`] for IO errors, [`AggregatorError::Blob`] for a hash
    /// mismatch.
    pub fn from_file(path: &Path, sha: &str) -> Result<Self, AggregatorError> {
        let (names, shapes) = FileTensors::layout(path)?;
        let mut f =
            FileTensors::open(path, &names, &shapes).map_err(|e| e.unwrap_or_else(|e| e))?;
        let mut data = Vec::with_capacity(names.len());
        for (t, name) in names.iter().enumerate() {
            let mut d = vec![0f32; f.numel(t)];
            f.read(t, 0, &mut d)?;
            if let Some(i) = d.iter().position(|x| !x.is_finite()) {
                return Err(invalid(format!(
                    "tensor `{name}` has a non-finite value ({}) at flat index {i}",
                    d[i]
                )));
            }
            data.push(d);
        }
        f.verify_sha256(sha)?;
        Ok(Self {
            names,
            shapes,
            data,
        })
    }

    /// Serialize to safetensors bytes.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_safetensors(&mut out)
            .expect("writing to memory cannot fail");
        out
    }

    /// Serialize to `w` in the safetensors format, streaming (see [`write_safetensors`]).
    ///
    /// # Errors
    /// IO errors of `w`.
    pub fn write_safetensors<W: Write>(&self, w: &mut W) -> std::io::Result<()> {
        write_safetensors(w, self.entries())
    }

    /// `(name, shape, values)` of each tensor, in name order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> + Clone {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.data)
            .map(|((n, s), d)| (n.as_str(), s.as_slice(), d.as_slice()))
    }

    /// Check that `self` has exactly the names and shapes of `reference`.
    ///
    /// # Errors
    /// [`AggregatorError::InvalidUpdate`] naming the first missing, unexpected or misshapen
    /// tensor.
    pub fn check_layout(&self, reference: &Tensors) -> Result<(), AggregatorError> {
        for (name, shape) in reference.names.iter().zip(&reference.shapes) {
            match self.names.iter().position(|n| n == name) {
                None => {
                    return Err(AggregatorError::InvalidUpdate(format!(
                        "tensor `{name}` is missing (expected shape {shape:?})"
                    )));
                }
                Some(i) if &self.shapes[i] != shape => {
                    return Err(AggregatorError::InvalidUpdate(format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?}",
                        self.shapes[i]
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = self.names.iter().find(|n| !reference.names.contains(n)) {
            return Err(AggregatorError::InvalidUpdate(format!(
                "tensor `{extra}` is not part of the global model"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(names: &[&str], shapes: &[Vec<usize>], data: Vec<Vec<f32>>) -> Tensors {
        Tensors {
            names: names.iter().map(|s| s.to_string()).collect(),
            shapes: shapes.to_vec(),
            data,
        }
    }

    #[test]
    fn round_trip_and_layout_checks() {
        let a = t(
            &["a", "b"],
            &[vec![2], vec![1, 2]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0]],
        );
        let back = Tensors::from_safetensors(&a.to_safetensors()).unwrap();
        assert_eq!(back, a);
        a.check_layout(&a).unwrap();
        let wrong_shape = t(
            &["a", "b"],
            &[vec![2], vec![2, 1]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0]],
        );
        assert!(
            wrong_shape
                .check_layout(&a)
                .unwrap_err()
                .to_string()
                .contains("`b`")
        );
        let wrong_name = t(
            &["a", "c"],
            &[vec![2], vec![1, 2]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0]],
        );
        assert!(wrong_name.check_layout(&a).is_err());
        let nan = t(&["a"], &[vec![2]], vec![vec![1.0, f32::NAN]]);
        assert!(
            Tensors::from_safetensors(&nan.to_safetensors())
                .unwrap_err()
                .to_string()
                .contains("non-finite")
        );
        assert!(Tensors::from_safetensors(b"\x10\0\0\0\0\0\0\0{}").is_err());
    }

    #[test]
    fn streaming_writer_matches_the_safetensors_crate() {
        let a = t(
            &["a.w", "b"],
            &[vec![2, 3], vec![1]],
            vec![vec![1.0, -2.0, 3.5, 0.0, 1e-30, 7.0], vec![9.0]],
        );
        let bytes: Vec<Vec<u8>> = a
            .data
            .iter()
            .map(|d| d.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = a
            .names
            .iter()
            .zip(&a.shapes)
            .zip(&bytes)
            .map(|((n, s), b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            });
        assert_eq!(
            a.to_safetensors(),
            safetensors::serialize(views, None).unwrap()
        );
    }

    #[test]
    fn file_tensors_validate_read_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let a = t(
            &["a", "b"],
            &[vec![2], vec![1, 3]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0, 5.0]],
        );
        let bytes = a.to_safetensors();
        let path = dir.path().join("u");
        let open = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            FileTensors::open(&path, &a.names, &a.shapes)
        };
        let mut f = open(&bytes).unwrap();
        let mut out = [0f32; 2];
        f.read(1, 1, &mut out).unwrap();
        assert_eq!(out, [4.0, 5.0]);
        f.check_finite().unwrap();
        f.verify_sha256(&crate::blobs::sha256_hex(&bytes)).unwrap();
        assert!(
            f.verify_sha256(&"0".repeat(64))
                .unwrap_err()
                .to_string()
                .contains("corrupt")
        );
        // Truncated, garbage, lying header: not valid safetensors (the first error group).
        for bad in [&bytes[..bytes.len() - 1], b"\x10\0\0\0\0\0\0\0{}", b"abc"] {
            let e = open(bad).unwrap_err().unwrap();
            assert!(e.to_string().contains("not valid safetensors"), "{e}");
        }
        // F64 is refused by name.
        let f64s = safetensors::serialize(
            [(
                "a",
                safetensors::tensor::TensorView::new(Dtype::F64, vec![1], &[0u8; 8]).unwrap(),
            )],
            None,
        )
        .unwrap();
        assert!(
            open(&f64s)
                .unwrap_err()
                .unwrap()
                .to_string()
                .contains("F64")
        );
        // A valid file of another layout: the second error group, naming the tensor.
        let other = t(&["a", "c"], &[vec![2], vec![1, 3]], a.data.clone());
        let e = open(&other.to_safetensors()).unwrap_err().unwrap_err();
        assert!(e.to_string().contains("`b`"), "{e}");
        let nan = t(
            &["a", "b"],
            &a.shapes,
            vec![vec![1.0, 2.0], vec![3.0, f32::NAN, 5.0]],
        );
        let e = open(&nan.to_safetensors())
            .unwrap()
            .check_finite()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("`b` has a non-finite value (NaN) at flat index 1"),
            "{e}"
        );
    }

    /// Whatever the chunking, the streaming check refuses exactly what the file check
    /// refuses, with the same message and error group, and accepts what it accepts.
    #[test]
    fn stream_check_agrees_with_the_file_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let a = t(
            &["a", "b"],
            &[vec![2], vec![1, 3]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0, 5.0]],
        );
        let file = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            FileTensors::open(&path, &a.names, &a.shapes)
                .and_then(|mut f| f.check_finite().map_err(Ok))
        };
        let stream = |b: &[u8], piece: usize| {
            let mut c = StreamCheck::new(&a.names, &a.shapes);
            for p in b.chunks(piece) {
                c.feed(p, b.len() as u64)?;
            }
            c.finish()
        };
        let mut odd = a.to_safetensors();
        // A header padded to an odd length: values straddle the pieces' boundaries.
        let n = u64::from_le_bytes(odd[..8].try_into().unwrap()) as usize;
        let mut header = odd[8..8 + n].to_vec();
        while header.last() == Some(&b' ') {
            header.pop();
        }
        header.push(b' ');
        let mut odd2 = (header.len() as u64).to_le_bytes().to_vec();
        odd2.extend_from_slice(&header);
        odd2.extend_from_slice(&odd[8 + n..]);
        odd = odd2;
        let nan = t(
            &["a", "b"],
            &a.shapes,
            vec![vec![1.0, 2.0], vec![3.0, f32::NAN, 5.0]],
        );
        let inf = t(
            &["a", "b"],
            &a.shapes,
            vec![vec![f32::INFINITY, 2.0], vec![3.0, 4.0, 5.0]],
        );
        let other = t(&["a", "c"], &[vec![2], vec![1, 3]], a.data.clone());
        let good = a.to_safetensors();
        let cases: Vec<Vec<u8>> = vec![
            good.clone(),
            odd,
            nan.to_safetensors(),
            inf.to_safetensors(),
            other.to_safetensors(),
            good[..good.len() - 1].to_vec(),
            good[..5].to_vec(),
            good[..20].to_vec(),
            b"\x10\0\0\0\0\0\0\0{}".to_vec(),
            b"\xff\xff\xff\xff\0\0\0\0{}".to_vec(),
        ];
        let mut refused = 0;
        for (k, bytes) in cases.iter().enumerate() {
            let want = file(bytes).map_err(|e| e.map(|e| e.to_string()).map_err(|e| e.to_string()));
            if want.is_err() {
                refused += 1;
            }
            for piece in [1, 3, 4, 7, 64, bytes.len().max(1)] {
                let got = stream(bytes, piece)
                    .map_err(|e| e.map(|e| e.to_string()).map_err(|e| e.to_string()));
                // A file shorter than its header is refused by both, in their own words.
                if k == 6 || k == 7 {
                    assert!(got.unwrap_err().unwrap().contains("not valid safetensors"));
                    continue;
                }
                assert_eq!(got, want, "case {k}, pieces of {piece} bytes");
            }
        }
        assert_eq!(refused, 8, "only the two good files pass");
    }

    /// The streamed norm is the update's L2 norm whatever the chunking (values split across
    /// pieces included); an update over the bound is refused, one at the bound accepted.
    #[test]
    fn stream_check_measures_the_norm_and_refuses_updates_over_the_bound() {
        let n = 1000;
        let names = vec!["w".to_string(), "z".to_string()];
        let shapes = vec![vec![n], vec![3]];
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let z = vec![1e30f32, -2e30, 0.5];
        let want = w
            .iter()
            .chain(&z)
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let bytes = t(&["w", "z"], &shapes, vec![w, z]).to_safetensors();
        for piece in [1, 3, 5, 33, 4096, bytes.len()] {
            let run = |max: f64| {
                let mut c = StreamCheck::new(&names, &shapes).with_max_norm(max);
                for p in bytes.chunks(piece) {
                    c.feed(p, bytes.len() as u64)?;
                }
                c.finish().map(|()| c.norm())
            };
            let got = run(f64::INFINITY).unwrap();
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "pieces of {piece}: {got} vs {want}"
            );
            assert!(run(want * (1.0 + 1e-9)).is_ok());
            let e = run(want * (1.0 - 1e-9)).unwrap_err().unwrap().to_string();
            assert!(
                e.contains("L2 norm") && e.contains("clip the update"),
                "{e}"
            );
        }
    }

    /// The block-wise finite scan finds the first bad value wherever it lies: first, last,
    /// either side of a block boundary (1 024 values), in a later chunk, and after an
    /// earlier one in the same block; values with the top exponent bits set but finite pass.
    #[test]
    fn stream_check_finds_the_first_non_finite_value_across_blocks() {
        let n = 10_000;
        let names = vec!["w".to_string()];
        let shapes = vec![vec![n]];
        for (i, bad) in [
            (0, f32::NAN),
            (1023, f32::INFINITY),
            (1024, f32::NEG_INFINITY),
            (1025, f32::NAN),
            (4097, f32::NAN),
            (n - 1, f32::INFINITY),
        ] {
            let mut v: Vec<f32> = (0..n).map(|k| k as f32 - 5000.5).collect();
            v[i] = bad;
            if i + 2 < n {
                v[i + 2] = f32::NAN;
            }
            let bytes = t(&["w"], &shapes, vec![v]).to_safetensors();
            for piece in [333, 4096, 1 << 20] {
                let mut c = StreamCheck::new(&names, &shapes);
                let e = bytes
                    .chunks(piece)
                    .try_for_each(|p| c.feed(p, bytes.len() as u64))
                    .unwrap_err()
                    .unwrap();
                assert!(
                    e.to_string()
                        .contains(&format!("value ({bad}) at flat index {i}")),
                    "piece {piece}: {e}"
                );
            }
        }
        let big = t(&["w"], &shapes, vec![vec![f32::MAX; n]]).to_safetensors();
        let mut c = StreamCheck::new(&names, &shapes);
        c.feed(&big, big.len() as u64).unwrap();
        c.finish().unwrap();
    }

    /// A header longer than the reference layout could need is refused from its length
    /// field, before any of it is buffered or parsed; a header with a duplicate tensor name
    /// is refused too.
    #[test]
    fn stream_check_bounds_and_types_the_header() {
        let names = vec!["w".to_string()];
        let shapes = vec![vec![1_000_000]];
        let len = 4_000_000 + 8 + 200_000;
        let mut c = StreamCheck::new(&names, &shapes);
        let e = c.feed(&200_000u64.to_le_bytes(), len).unwrap_err().unwrap();
        assert!(
            e.to_string()
                .contains("header length 200000 is more than this model's layout needs"),
            "{e}"
        );
        let twice = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let e = parse_entries(twice).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        let with_metadata =
            br#"{"__metadata__":{"a":"b"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert_eq!(parse_entries(with_metadata).unwrap().len(), 1);
        assert!(parse_entries(b"[1,2]").is_err());
        assert!(parse_entries(b"{} trailing").is_err());
    }
}
