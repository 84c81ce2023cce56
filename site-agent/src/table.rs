//! A site's tabular data, read as its federation spec says: the label and typed feature
//! columns of a CSV file (the `csv` crate) or a Parquet file (arrow-rs `parquet`, by the
//! `.parquet` / `.pq` extension; nulls are missing), messy cells cleaned, rows of one site selected
//! with `--where COLUMN=VALUE`, split (stratified) into train / validation / test, missing
//! values dropped or imputed, numeric columns standardised, and a data report.
//!
//! Cells are trimmed; blank, `NA`, `N/A`, `NaN`, `null` and `?` are missing
//! ([`fedee_spec::MISSING_TOKENS`]); booleans accept Yes/No, Y/N, true/false, T/F and 0/1.
//! A cell that cannot be read as its column's type stops the load with its line, column and
//! value: a value is never guessed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedee_spec::{FeatureType, FederationSpec, MissingPolicy, Standardize, is_missing};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Examples: `x` is `(n, features)` row-major f32, `y` is `(n,)` class indices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Examples {
    /// Features, row-major.
    pub x: Vec<f32>,
    /// Class indices.
    pub y: Vec<i64>,
}

impl Examples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.len()
    }
    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
    /// Append one example.
    pub fn push(&mut self, row: &[f32], y: i64) {
        self.x.extend_from_slice(row);
        self.y.push(y);
    }
}

/// Data errors: each names the file, and where it applies the line, column and value.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file cannot be opened or read as CSV.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: csv::Error,
    },
    /// The file cannot be opened or read as Parquet.
    #[error(
        "cannot read {path} as Parquet: {source} (supported: flat schemas; uncompressed, Snappy, LZ4, gzip or zstd pages)"
    )]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A JSONL line that is not a JSON object.
    #[error(
        "{path} line {line}: not a JSON object ({source}); JSONL files hold one object per line"
    )]
    Json {
        /// The file.
        path: PathBuf,
        /// Line in the file, from 1.
        line: u64,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file has no header line (empty file).
    #[error("{path} is empty: a header line naming the columns is needed")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A column the spec (or `--where`) needs is not in the header.
    #[error(
        "{path} has no column `{column}` (needed as {role}); its columns are: {available}. Rename the column in the file or fix the federation spec"
    )]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// Why it is needed (label, feature, `--where`).
        role: &'static str,
        /// The header's columns.
        available: String,
    },
    /// A cell cannot be read as its column's type.
    #[error(
        "{path} {at}, column `{column}`: `{value}` is not {expected}; fix the cell, leave it blank if it is missing, or change the column's type in the spec"
    )]
    Unparseable {
        /// The file.
        path: PathBuf,
        /// Where: `line N` of a CSV file (the header is line 1), `row N` of a Parquet file.
        at: Location,
        /// Column name.
        column: String,
        /// The cell as written.
        value: String,
        /// What the spec expects.
        expected: String,
    },
    /// A label value that belongs to no class of the spec.
    #[error(
        "{path} {at}: label `{value}` in column `{column}` is not one of the federation's classes ({classes}); map it to a class in the spec (task.classes) or remove the row"
    )]
    UnknownClass {
        /// The file.
        path: PathBuf,
        /// Where in the file.
        at: Location,
        /// The label column.
        column: String,
        /// The cell.
        value: String,
        /// The classes' label values.
        classes: String,
    },
    /// No usable row (after `--where` and the missing-value policy).
    #[error("{path}{selection}: no usable rows ({detail}); check --where and the file")]
    NoRows {
        /// The file.
        path: PathBuf,
        /// ` (where COLUMN=VALUE)`, or empty.
        selection: String,
        /// Counts of what was read and left out.
        detail: String,
    },
    /// The site's data holds examples of fewer than two classes.
    #[error(
        "{path}{selection}: every usable row is of class `{class}`; a site needs examples of at least two classes to train a classifier"
    )]
    OneClass {
        /// The file.
        path: PathBuf,
        /// ` (where COLUMN=VALUE)`, or empty.
        selection: String,
        /// The only class.
        class: String,
    },
    /// Too few rows for the spec's splits.
    #[error(
        "{path}{selection}: {rows} usable rows leave no training examples after the validation ({validation}) and test ({test}) splits; lower data.validation_fraction / data.test_fraction or add rows"
    )]
    TooFew {
        /// The file.
        path: PathBuf,
        /// ` (where COLUMN=VALUE)`, or empty.
        selection: String,
        /// Usable rows.
        rows: usize,
        /// Validation fraction.
        validation: f64,
        /// Test fraction.
        test: f64,
    },
    /// A `--where` argument that is not `COLUMN=VALUE`.
    #[error("--where `{0}`: write COLUMN=VALUE, e.g. --where dataset=Cleveland")]
    BadFilter(String),
    /// A model's preprocessing figures do not fit the spec.
    #[error(
        "the model's preprocessing does not fit the federation spec: {0}; use the model that was fine-tuned under this spec"
    )]
    Preprocessing(String),
}

/// Where a row is in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Line of a CSV file (the header is line 1).
    Line(u64),
    /// Row of a Parquet file, from 1.
    Row(u64),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Line(n) => write!(f, "line {n}"),
            Self::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// One row of a data file: where it is, and its cells as text.
pub type Row = (Location, Vec<String>);

/// A data file's rows as text cells: the header, then each row with its location.
pub struct Rows {
    /// Column names (trimmed).
    pub headers: Vec<String>,
    rows: Box<dyn Iterator<Item = Result<Row, DataError>>>,
}

impl Iterator for Rows {
    type Item = Result<Row, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rows.next()
    }
}

/// Whether `path` is read as Parquet (extension `.parquet` or `.pq`, any case).
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("pq"))
}

/// Open a data file by its extension: Parquet ([`is_parquet`]), JSONL (`.jsonl`, `.ndjson`:
/// one JSON object per line, the first line's keys are the columns), TSV (`.tsv`, `.tab`),
/// CSV otherwise. CSV and TSV rows must all have the header's number of cells; Parquet and
/// JSON values become text (numbers in Rust's shortest form, so an integer column reads `1`,
/// a double `1.5`), nulls and absent keys become empty (missing) cells.
///
/// # Errors
/// [`DataError::Read`] / [`DataError::Parquet`] when the file cannot be opened or decoded;
/// [`DataError::Empty`] without a header. Later rows report their own errors.
pub fn open(path: &Path) -> Result<Rows, DataError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        _ if is_parquet(path) => open_parquet(path),
        Some("jsonl" | "ndjson") => open_jsonl(path),
        Some("tsv" | "tab") => open_csv(path, b'\t'),
        _ => open_csv(path, b','),
    }
}

/// A JSON value as a cell: strings as they are, null as missing, the rest as JSON text.
fn json_cell(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn open_jsonl(path: &Path) -> Result<Rows, DataError> {
    use std::io::BufRead;
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let mut lines = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?)
        .lines()
        .enumerate()
        .filter(|(_, l)| !matches!(l, Ok(l) if l.trim().is_empty()));
    let object = {
        let path = path.to_owned();
        move |(i, line): (usize, std::io::Result<String>)| {
            let line_no = i as u64 + 1;
            let text = line.map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                .map(|o| (line_no, o))
                .map_err(|source| DataError::Json {
                    path: path.clone(),
                    line: line_no,
                    source,
                })
        }
    };
    let Some(first) = lines.next() else {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    };
    let (first_line, first) = object(first)?;
    let headers: Vec<String> = first.keys().map(|k| k.trim().to_owned()).collect();
    let keys: Vec<String> = first.keys().cloned().collect();
    let cells = move |o: &serde_json::Map<String, serde_json::Value>| {
        keys.iter().map(|k| json_cell(o.get(k))).collect::<Vec<_>>()
    };
    let head = std::iter::once(Ok((Location::Line(first_line), cells(&first))));
    let rest = lines.map(move |l| {
        let (n, o) = object(l)?;
        Ok((Location::Line(n), cells(&o)))
    });
    Ok(Rows {
        headers,
        rows: Box::new(head.chain(rest)),
    })
}

fn open_csv(path: &Path, delimiter: u8) -> Result<Rows, DataError> {
    let owned = path.to_owned();
    let read = move |source| DataError::Read {
        path: owned.clone(),
        source,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(false)
        .delimiter(delimiter)
        .from_path(path)
        .map_err(&read)?;
    let headers: Vec<String> = rdr
        .headers()
        .map_err(&read)?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    if headers.iter().all(String::is_empty) {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    let rows = rdr.into_records().map(move |r| {
        let r = r.map_err(&read)?;
        let at = Location::Line(r.position().map_or(0, |p| p.line()));
        Ok((at, r.iter().map(str::to_owned).collect()))
    });
    Ok(Rows {
        headers,
        rows: Box::new(rows),
    })
}

fn open_parquet(path: &Path) -> Result<Rows, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let owned = path.to_owned();
    let bad = move |source| DataError::Parquet {
        path: owned.clone(),
        source,
    };
    let reader = SerializedFileReader::try_from(path).map_err(&bad)?;
    let headers: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().trim().to_owned())
        .collect();
    if headers.is_empty() {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    let cell = |f: &Field| match f {
        Field::Null => String::new(),
        Field::Str(s) => s.clone(),
        Field::Bool(b) => b.to_string(),
        Field::Float(v) => v.to_string(),
        Field::Double(v) => v.to_string(),
        other => other.to_string(),
    };
    let rows = reader.into_iter().enumerate().map(move |(i, row)| {
        let row = row.map_err(&bad)?;
        let cells = row.get_column_iter().map(|(_, f)| cell(f)).collect();
        Ok((Location::Row(i as u64 + 1), cells))
    });
    Ok(Rows {
        headers,
        rows: Box::new(rows),
    })
}

/// Rows of one site in a shared file: `COLUMN=VALUE` (both trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFilter {
    /// Column name.
    pub column: String,
    /// Value selecting this site's rows.
    pub value: String,
}

impl std::str::FromStr for RowFilter {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.split_once('=') {
            Some((c, v)) if !c.trim().is_empty() => Ok(Self {
                column: c.trim().to_owned(),
                value: v.trim().to_owned(),
            }),
            _ => Err(DataError::BadFilter(s.to_owned())),
        }
    }
}

/// What a site read, counted; printed at the site before training. Only aggregate counts.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DataReport {
    /// The file.
    pub file: String,
    /// `COLUMN=VALUE` of `--where`, if any.
    pub selection: Option<String>,
    /// Data rows in the file.
    pub rows_read: usize,
    /// Rows selected by `--where` (all rows without it).
    pub rows_selected: usize,
    /// Rows left out: label missing.
    pub dropped_missing_label: usize,
    /// Rows left out: a feature missing (policy `drop-row`).
    pub dropped_missing_features: usize,
    /// Rows used.
    pub rows_used: usize,
    /// Used rows per class, in class order.
    pub class_counts: Vec<(String, usize)>,
    /// Missing cells per column among selected rows (columns with none are left out).
    pub missing: BTreeMap<String, usize>,
    /// Split sizes.
    pub train: usize,
    /// Validation split size.
    pub validation: usize,
    /// Test split size.
    pub test: usize,
}

impl std::fmt::Display for DataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sel = self
            .selection
            .as_deref()
            .map(|s| format!(" where {s}"))
            .unwrap_or_default();
        writeln!(
            f,
            "data: {}{sel}: {} rows read, {} selected, {} used ({} without label, {} with a missing feature left out)",
            self.file,
            self.rows_read,
            self.rows_selected,
            self.rows_used,
            self.dropped_missing_label,
            self.dropped_missing_features
        )?;
        let classes: Vec<String> = self
            .class_counts
            .iter()
            .map(|(c, n)| format!("{c} = {n}"))
            .collect();
        writeln!(f, "  classes: {}", classes.join(", "))?;
        if !self.missing.is_empty() {
            let m: Vec<String> = self
                .missing
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            writeln!(f, "  missing cells: {}", m.join(", "))?;
        }
        write!(
            f,
            "  split: train {}, validation {}, test {}",
            self.train, self.validation, self.test
        )
    }
}

/// A site's encoded tabular data.
#[derive(Debug, Clone, PartialEq)]
pub struct TabularData {
    /// Model inputs per example ([`FederationSpec::in_features`]).
    pub features: usize,
    /// Training split.
    pub train: Examples,
    /// Validation split (model selection only).
    pub validation: Examples,
    /// Test split (reported metrics).
    pub test: Examples,
    /// What was read.
    pub report: DataReport,
    /// The imputation and standardisation fitted on the training split and applied to all
    /// three splits (under `standardize = "federated"`: fitted, not applied; the splits stay
    /// raw, missing cells NaN, until [`TabularData::apply`]).
    pub preprocessing: Preprocessing,
}

/// One feature column's position in the file and its offset in the encoded row.
struct Column<'a> {
    index: usize,
    offset: usize,
    feature: &'a fedee_spec::Feature,
}

/// The index of column `name`, or an error listing the columns there are.
pub(crate) fn column(
    headers: &[String],
    name: &str,
    role: &'static str,
    path: &Path,
) -> Result<usize, DataError> {
    headers
        .iter()
        .position(|h| h == name)
        .ok_or_else(|| DataError::MissingColumn {
            path: path.to_owned(),
            column: name.to_owned(),
            role,
            available: headers
                .iter()
                .map(|h| format!("`{h}`"))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A row's inputs as read: complete, with a missing cell that the policy may impute, or
/// unusable (dropped and counted).
enum Read<T> {
    Complete(T),
    Incomplete(T),
    Unusable,
}

/// The rows of `path` that `filter` selects, read by `parse` and grouped by class, with the
/// counts of the data report. Shared by tabular and text data: the label column, `--where`,
/// missing labels, labels outside the classes, the missing-value policy, and the checks that
/// some rows and two classes remain.
fn read_by_class<T>(
    spec: &FederationSpec,
    path: &Path,
    filter: Option<&RowFilter>,
    rows: Rows,
    mut parse: impl FnMut(&[String], Location, &mut DataReport) -> Result<Read<T>, DataError>,
) -> Result<(Vec<Vec<T>>, DataReport), DataError> {
    let headers = &rows.headers;
    let label = column(headers, &spec.task.label, "the label", path)?;
    let where_col = filter
        .map(|w| column(headers, &w.column, "the --where column", path))
        .transpose()?;
    let mut report = DataReport {
        file: path.display().to_string(),
        selection: filter.map(|w| format!("{}={}", w.column, w.value)),
        ..DataReport::default()
    };
    let classes: Vec<String> = spec
        .task
        .classes
        .iter()
        .flat_map(|c| c.values())
        .map(|v| format!("`{v}`"))
        .collect();
    let mut by_class: Vec<Vec<T>> = (0..spec.num_classes()).map(|_| Vec::new()).collect();
    for row in rows {
        let (at, rec) = row?;
        report.rows_read += 1;
        if let (Some(i), Some(w)) = (where_col, filter)
            && rec.get(i).map(|c| c.trim()) != Some(w.value.as_str())
        {
            continue;
        }
        report.rows_selected += 1;
        let input = parse(&rec, at, &mut report)?;
        let raw_label = rec.get(label).map_or("", String::as_str);
        if is_missing(raw_label) {
            *report.missing.entry(spec.task.label.clone()).or_default() += 1;
            report.dropped_missing_label += 1;
            continue;
        }
        let class = spec
            .class_of(raw_label)
            .ok_or_else(|| DataError::UnknownClass {
                path: path.to_owned(),
                at,
                column: spec.task.label.clone(),
                value: raw_label.to_owned(),
                classes: classes.join(", "),
            })?;
        match input {
            Read::Complete(x) => by_class[class].push(x),
            Read::Incomplete(x) if spec.data.missing == MissingPolicy::Impute => {
                by_class[class].push(x);
            }
            Read::Incomplete(_) | Read::Unusable => report.dropped_missing_features += 1,
        }
    }
    report.rows_used = by_class.iter().map(Vec::len).sum();
    report.class_counts = spec
        .task
        .classes
        .iter()
        .zip(&by_class)
        .map(|(c, rows)| (c.name().to_owned(), rows.len()))
        .collect();
    let selection = selection_text(&report);
    if report.rows_used == 0 {
        return Err(DataError::NoRows {
            path: path.to_owned(),
            selection,
            detail: format!(
                "{} rows read, {} selected, {} without label, {} with a missing feature",
                report.rows_read,
                report.rows_selected,
                report.dropped_missing_label,
                report.dropped_missing_features
            ),
        });
    }
    let present: Vec<usize> = (0..by_class.len())
        .filter(|&c| !by_class[c].is_empty())
        .collect();
    if present.len() < 2 {
        return Err(DataError::OneClass {
            path: path.to_owned(),
            selection,
            class: spec.task.classes[present[0]].name().to_owned(),
        });
    }
    Ok((by_class, report))
}

/// ` (where COLUMN=VALUE)`, or empty.
fn selection_text(report: &DataReport) -> String {
    report
        .selection
        .as_deref()
        .map(|s| format!(" (where {s})"))
        .unwrap_or_default()
}

/// Stratified split: each class shuffled with the spec's seed, then cut into test,
/// validation and train (`round(n · fraction)` per class); returns `[train, validation,
/// test]` of `(example, class)` and fills the report's split sizes.
///
/// # Errors
/// [`DataError::TooFew`] when the training or test split is empty.
fn split<T>(
    spec: &FederationSpec,
    path: &Path,
    by_class: Vec<Vec<T>>,
    report: &mut DataReport,
) -> Result<[Vec<(T, i64)>; 3], DataError> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(spec.data.split_seed);
    let mut out: [Vec<(T, i64)>; 3] = Default::default();
    for (class, mut rows) in by_class.into_iter().enumerate() {
        rows.shuffle(&mut rng);
        let n = rows.len() as f64;
        let n_test = (n * spec.data.test_fraction).round() as usize;
        let n_val = (n * spec.data.validation_fraction).round() as usize;
        for (i, r) in rows.into_iter().enumerate() {
            let dst = if i < n_test {
                2
            } else if i < n_test + n_val {
                1
            } else {
                0
            };
            out[dst].push((r, class as i64));
        }
    }
    if out[0].is_empty() || out[2].is_empty() {
        return Err(DataError::TooFew {
            path: path.to_owned(),
            selection: selection_text(report),
            rows: report.rows_used,
            validation: spec.data.validation_fraction,
            test: spec.data.test_fraction,
        });
    }
    report.train = out[0].len();
    report.validation = out[1].len();
    report.test = out[2].len();
    Ok(out)
}

/// Read `path` (CSV with a header line, or Parquet) as `spec` says, keeping the rows
/// `filter` selects.
///
/// # Errors
/// [`DataError`]: an unreadable or empty file, a missing column, a cell that is not its
/// column's type, a label outside the classes, no usable rows, a single class, or too few
/// rows for the splits. Each names the file, line, column and value where they apply.
pub fn load(
    spec: &FederationSpec,
    path: &Path,
    filter: Option<&RowFilter>,
) -> Result<TabularData, DataError> {
    let rows = open(path)?;
    let enc = Encoder::new(spec, &rows.headers, path)?;
    let parse = |rec: &[String], at: Location, report: &mut DataReport| {
        enc.encode(rec, at, path, &mut report.missing)
    };
    let (by_class, mut report) = read_by_class(spec, path, filter, rows, parse)?;
    let [train, validation, test] = split(spec, path, by_class, &mut report)?;
    let examples = |rows: Vec<(Vec<f32>, i64)>| {
        let mut ex = Examples::default();
        for (r, y) in rows {
            ex.push(&r, y);
        }
        ex
    };
    let (mut train, mut validation, mut test) =
        (examples(train), examples(validation), examples(test));
    let preprocessing = Preprocessing::fit(spec, &enc, &train);
    // Under federated standardisation the pooled figures come later (`TabularData::apply`).
    if spec.data.standardize != Standardize::Federated {
        for ex in [&mut train, &mut validation, &mut test] {
            preprocessing.apply(&mut ex.x);
        }
    }
    Ok(TabularData {
        features: enc.width,
        train,
        validation,
        test,
        report,
        preprocessing,
    })
}

impl TabularData {
    /// Impute and standardise the raw splits of a `standardize = "federated"` load with
    /// `prep` (the federation's pooled figures, or the holder's own [`TabularData::preprocessing`]
    /// outside a federation), which becomes this data's preprocessing.
    pub fn apply(&mut self, prep: &Preprocessing) {
        for ex in [&mut self.train, &mut self.validation, &mut self.test] {
            prep.apply(&mut ex.x);
        }
        self.preprocessing = prep.clone();
    }
}

/// The feature columns of a spec located in a file's header: each cell parsed as its type and
/// written at its offset of the encoded row (categorical features one-hot).
struct Encoder<'a> {
    columns: Vec<Column<'a>>,
    width: usize,
}

impl<'a> Encoder<'a> {
    fn new(spec: &'a FederationSpec, headers: &[String], path: &Path) -> Result<Self, DataError> {
        let mut offset = 0;
        let mut columns = Vec::with_capacity(spec.features.len());
        for f in &spec.features {
            columns.push(Column {
                index: column(headers, &f.name, "a feature", path)?,
                offset,
                feature: f,
            });
            offset += f.width();
        }
        Ok(Self {
            columns,
            width: offset,
        })
    }

    /// One row's inputs; a missing numeric or boolean cell is NaN (imputed later, or the row
    /// is dropped), a missing categorical cell all zeros. Missing cells are counted in
    /// `missing` by column.
    fn encode(
        &self,
        rec: &[String],
        at: Location,
        path: &Path,
        missing: &mut BTreeMap<String, usize>,
    ) -> Result<Read<Vec<f32>>, DataError> {
        let mut row = vec![0f32; self.width];
        let mut missing_feature = false;
        for c in &self.columns {
            let raw = rec.get(c.index).map_or("", String::as_str);
            if is_missing(raw) {
                *missing.entry(c.feature.name.clone()).or_default() += 1;
                missing_feature = true;
                if c.feature.kind != FeatureType::Categorical {
                    row[c.offset] = f32::NAN;
                }
                continue;
            }
            let bad = |expected: String| DataError::Unparseable {
                path: path.to_owned(),
                at,
                column: c.feature.name.clone(),
                value: raw.to_owned(),
                expected,
            };
            match c.feature.kind {
                FeatureType::Numeric => {
                    row[c.offset] =
                        fedee_spec::parse_number(raw).ok_or_else(|| bad("a number".into()))? as f32;
                }
                FeatureType::Boolean => {
                    row[c.offset] = match fedee_spec::parse_bool(raw) {
                        Some(true) => 1.0,
                        Some(false) => 0.0,
                        None => return Err(bad("a boolean (Yes/No, Y/N, true/false, 0/1)".into())),
                    };
                }
                FeatureType::Categorical => {
                    let v = raw.trim();
                    let level = c
                        .feature
                        .levels
                        .iter()
                        .position(|l| l.trim() == v)
                        .or_else(|| {
                            c.feature
                                .levels
                                .iter()
                                .position(|l| l.trim().eq_ignore_ascii_case(v))
                        })
                        .ok_or_else(|| bad(format!("one of the levels {:?}", c.feature.levels)))?;
                    row[c.offset + level] = 1.0;
                }
            }
        }
        Ok(if missing_feature {
            Read::Incomplete(row)
        } else {
            Read::Complete(row)
        })
    }
}

/// How a tabular model's inputs were imputed and standardised: for each numeric or boolean
/// feature, the training split's mean (filled in for a missing cell under `missing =
/// "impute"`) and standard deviation (a numeric feature becomes `(v − mean) / std` under
/// `standardize = "site"`; a constant column gets std 1). Fitted on the training split of the
/// data that trains a model; predictions must use the same figures, so a fine-tuned model
/// carries them (`fedee finetune` writes them into the safetensors metadata).
///
/// # Security
/// These are aggregate statistics of the data owner's training split (a mean and a standard
/// deviation per column). They stay with the plaintext model: EE models are written without
/// metadata, so the trainer never receives them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocessing {
    /// Model inputs per example.
    pub features: usize,
    /// One entry per numeric or boolean feature, in spec order.
    pub columns: Vec<ColumnStats>,
}

/// One feature's figures in [`Preprocessing`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ColumnStats {
    /// Feature (column) name.
    pub name: String,
    /// Its position in the encoded row.
    pub offset: usize,
    /// Training-split mean (fills a missing cell).
    pub mean: f64,
    /// Training-split standard deviation (population; 1 for a constant column).
    pub std: f64,
    /// Whether the value is standardised (numeric features, unless `standardize = "none"`).
    pub scale: bool,
}

impl Preprocessing {
    /// Metadata key under which a model file carries its preprocessing (JSON).
    pub const METADATA_KEY: &'static str = "fedee.preprocessing";

    fn fit(spec: &FederationSpec, enc: &Encoder<'_>, train: &Examples) -> Self {
        let w = enc.width;
        let columns = enc
            .columns
            .iter()
            .filter(|c| c.feature.kind != FeatureType::Categorical)
            .map(|c| {
                let values: Vec<f64> = train
                    .x
                    .chunks_exact(w)
                    .map(|r| f64::from(r[c.offset]))
                    .filter(|v| !v.is_nan())
                    .collect();
                let n = values.len().max(1) as f64;
                let mean = values.iter().sum::<f64>() / n;
                let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
                ColumnStats {
                    name: c.feature.name.clone(),
                    offset: c.offset,
                    mean,
                    std: if std > 1e-8 { std } else { 1.0 },
                    scale: c.feature.kind == FeatureType::Numeric
                        && spec.data.standardize != Standardize::None,
                }
            })
            .collect();
        Self {
            features: w,
            columns,
        }
    }

    /// Impute and standardise row-major `(n, features)` inputs in place.
    pub fn apply(&self, x: &mut [f32]) {
        for r in x.chunks_exact_mut(self.features) {
            for c in &self.columns {
                let v = &mut r[c.offset];
                if v.is_nan() {
                    *v = c.mean as f32;
                }
                if c.scale {
                    *v = ((f64::from(*v) - c.mean) / c.std) as f32;
                }
            }
        }
    }

    /// Whether these figures were fitted for `spec`'s features (same names, offsets and
    /// width, and the spec's standardisation).
    ///
    /// # Errors
    /// [`DataError::Preprocessing`] naming the first difference.
    pub fn check(&self, spec: &FederationSpec) -> Result<(), DataError> {
        let mismatch = |detail: String| Err(DataError::Preprocessing(detail));
        if self.features != spec.in_features() {
            return mismatch(format!(
                "fitted for {} inputs, the spec's features encode to {}",
                self.features,
                spec.in_features()
            ));
        }
        let mut offset = 0;
        let mut expected = Vec::new();
        for f in &spec.features {
            if f.kind != FeatureType::Categorical {
                expected.push((
                    f.name.as_str(),
                    offset,
                    f.kind == FeatureType::Numeric && spec.data.standardize != Standardize::None,
                ));
            }
            offset += f.width();
        }
        let found: Vec<(&str, usize, bool)> = self
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.offset, c.scale))
            .collect();
        if found != expected {
            return mismatch(format!(
                "fitted for the columns {found:?} (name, offset, standardised), the spec has {expected:?}"
            ));
        }
        if let Some(c) = self
            .columns
            .iter()
            .find(|c| !c.mean.is_finite() || !c.std.is_finite() || c.std <= 0.0)
        {
            return mismatch(format!(
                "column `{}` has mean {} and std {}: both must be finite and the std positive",
                c.name, c.mean, c.std
            ));
        }
        Ok(())
    }
}

/// One row of a file to predict on, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Where it is in the file.
    pub at: Location,
    /// The value of the `--id-column`, if one was named.
    pub id: Option<String>,
    /// The row's class, when the file has the label column and the value is one of the
    /// classes (used to report accuracy; never needed).
    pub label: Option<i64>,
    /// Index of its input among the records' inputs, or why it has none (a missing feature
    /// under `missing = "drop-row"`, or an empty text).
    pub input: Result<usize, String>,
}

/// Rows to predict on: their inputs (only the rows that have one) and every selected row.
#[derive(Debug, Clone, PartialEq)]
pub struct Records<T> {
    /// Inputs: encoded feature rows (`Vec<f32>`, imputed and standardised) or texts.
    pub inputs: Vec<T>,
    /// Every selected row, in file order.
    pub rows: Vec<Record>,
}

/// Read the rows of `path` that `filter` selects for prediction. Unlike [`load`] the label
/// column is optional (used only to report accuracy) and nothing is split; each row is
/// encoded with `parse` and kept in file order.
fn read_records<T>(
    spec: &FederationSpec,
    path: &Path,
    filter: Option<&RowFilter>,
    id_column: Option<&str>,
    rows: Rows,
    mut parse: impl FnMut(&[String], Location) -> Result<Result<T, String>, DataError>,
) -> Result<Records<T>, DataError> {
    let headers = rows.headers.clone();
    let label = headers.iter().position(|h| *h == spec.task.label);
    let id = id_column
        .map(|c| column(&headers, c, "the --id-column", path))
        .transpose()?;
    let where_col = filter
        .map(|w| column(&headers, &w.column, "the --where column", path))
        .transpose()?;
    let mut out = Records {
        inputs: Vec::new(),
        rows: Vec::new(),
    };
    for row in rows {
        let (at, rec) = row?;
        if let (Some(i), Some(w)) = (where_col, filter)
            && rec.get(i).map(|c| c.trim()) != Some(w.value.as_str())
        {
            continue;
        }
        let input = parse(&rec, at)?.map(|x| {
            out.inputs.push(x);
            out.inputs.len() - 1
        });
        out.rows.push(Record {
            at,
            id: id.map(|i| rec.get(i).map_or("", |c| c.trim()).to_owned()),
            label: label
                .and_then(|i| rec.get(i))
                .and_then(|v| spec.class_of(v))
                .map(|c| c as i64),
            input,
        });
    }
    if out.rows.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_owned(),
            selection: filter
                .map(|w| format!(" (where {}={})", w.column, w.value))
                .unwrap_or_default(),
            detail: "no data rows to predict on".into(),
        });
    }
    Ok(out)
}

/// Tabular rows of `path` to predict on, encoded as `spec` says and imputed and standardised
/// with `prep` (the figures the model was trained with). A row with a missing feature gets no
/// input under `missing = "drop-row"` (its [`Record::input`] says which column).
///
/// # Errors
/// As [`load`] for unreadable files, missing feature columns and cells that are not their
/// column's type; [`DataError::Preprocessing`] if `prep` was fitted for other features.
pub fn load_records(
    spec: &FederationSpec,
    prep: &Preprocessing,
    path: &Path,
    filter: Option<&RowFilter>,
    id_column: Option<&str>,
) -> Result<Records<Vec<f32>>, DataError> {
    prep.check(spec)?;
    let rows = open(path)?;
    let enc = Encoder::new(spec, &rows.headers, path)?;
    let parse = |rec: &[String], at: Location| {
        let mut missing = BTreeMap::new();
        Ok(match enc.encode(rec, at, path, &mut missing)? {
            Read::Incomplete(_) if spec.data.missing == MissingPolicy::DropRow => {
                let cols: Vec<String> = missing.keys().map(|c| format!("`{c}`")).collect();
                Err(format!(
                    "missing {} (the spec's policy is drop-row)",
                    cols.join(", ")
                ))
            }
            Read::Complete(mut x) | Read::Incomplete(mut x) => {
                prep.apply(&mut x);
                Ok(x)
            }
            Read::Unusable => Err("unusable".into()),
        })
    };
    read_records(spec, path, filter, id_column, rows, parse)
}

/// Text rows of `path` to predict on (the spec's text column); an empty text gets no input.
///
/// # Errors
/// As [`load_text`] for unreadable files and a missing text column.
pub fn load_text_records(
    spec: &FederationSpec,
    path: &Path,
    filter: Option<&RowFilter>,
    id_column: Option<&str>,
) -> Result<Records<String>, DataError> {
    let rows = open(path)?;
    let name = spec.task.text.clone().unwrap_or_default();
    let text = column(&rows.headers, &name, "the text", path)?;
    let parse = |rec: &[String], _: Location| {
        let t = rec.get(text).map_or("", |t| t.trim());
        Ok(if t.is_empty() {
            Err(format!("empty `{name}`"))
        } else {
            Ok(t.to_owned())
        })
    };
    read_records(spec, path, filter, id_column, rows, parse)
}

/// A site's text examples, `(text, class)`, per split.
#[derive(Debug, Clone, PartialEq)]
pub struct TextData {
    /// Training split.
    pub train: Vec<(String, i64)>,
    /// Validation split.
    pub validation: Vec<(String, i64)>,
    /// Test split.
    pub test: Vec<(String, i64)>,
    /// What was read.
    pub report: DataReport,
}

/// Read the text column and the label of `path` (CSV, TSV, Parquet or JSONL) as a text
/// spec says, keeping the rows `filter` selects. Rows with an empty text are left out.
///
/// # Errors
/// As [`load`].
pub fn load_text(
    spec: &FederationSpec,
    path: &Path,
    filter: Option<&RowFilter>,
) -> Result<TextData, DataError> {
    let rows = open(path)?;
    let name = spec.task.text.clone().unwrap_or_default();
    let text = column(&rows.headers, &name, "the text", path)?;
    let parse = |rec: &[String], _: Location, report: &mut DataReport| {
        let t = rec.get(text).map_or("", |t| t.trim());
        Ok(if t.is_empty() {
            *report.missing.entry(name.clone()).or_default() += 1;
            Read::Unusable
        } else {
            Read::Complete(t.to_owned())
        })
    };
    let (by_class, mut report) = read_by_class(spec, path, filter, rows, parse)?;
    let [train, validation, test] = split(spec, path, by_class, &mut report)?;
    Ok(TextData {
        train,
        validation,
        test,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> FederationSpec {
        FederationSpec::from_toml(&format!(
            r#"
version = 1
[task]
kind = "tabular-classification"
label = "outcome"
classes = ["no", {{ name = "yes", values = ["yes", "maybe"] }}]
[[features]]
name = "age"
type = "numeric"
[[features]]
name = "smoker"
type = "boolean"
[[features]]
name = "ward"
type = "categorical"
levels = ["A", "B"]
[model]
kind = "mlp"
hidden = [4]
[privacy]
mode = "site"
noise_multiplier = 1.0
[data]
validation_fraction = 0.2
test_fraction = 0.2
{extra}
"#
        ))
        .unwrap()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn rows(n: usize, site: &str) -> String {
        (0..n)
            .map(|i| {
                let out = ["no", "yes", "maybe"][i % 3];
                let smoker = ["Yes", " n ", "TRUE", "0"][i % 4];
                let ward = ["A", " b "][i % 2];
                format!("{i},{site},{}, {smoker},{ward},{out}\n", 30 + i)
            })
            .collect()
    }

    const HEADER: &str = "id,hospital,age,smoker,ward,outcome\n";

    #[test]
    fn reads_messy_cells_selects_a_site_and_splits() {
        let mut text = String::from(HEADER);
        text += &rows(40, "North");
        text += &rows(20, "South");
        text += "900,North,NA,yes,A,no\n"; // missing feature: dropped
        text += "901,North,50,yes,A,?\n"; // missing label: dropped
        let f = file(&text);
        let filter: RowFilter = " hospital = North ".parse().unwrap();
        let d = load(&spec(""), f.path(), Some(&filter)).unwrap();
        let r = &d.report;
        assert_eq!(
            (r.rows_read, r.rows_selected, r.rows_used),
            (62, 42, 40),
            "{r}"
        );
        assert_eq!(
            (r.dropped_missing_features, r.dropped_missing_label),
            (1, 1)
        );
        assert_eq!(r.missing["age"], 1);
        assert_eq!(r.class_counts, vec![("no".into(), 14), ("yes".into(), 26)]);
        assert_eq!(d.features, 4);
        assert_eq!(r.train + r.validation + r.test, 40);
        assert_eq!((r.test, r.validation), (8, 8), "stratified 20 % each: {r}");
        // Numeric column standardised on train; boolean and one-hot stay 0/1.
        let ages: Vec<f32> = d.train.x.chunks_exact(4).map(|x| x[0]).collect();
        let mean = ages.iter().sum::<f32>() / ages.len() as f32;
        assert!(mean.abs() < 1e-5, "{mean}");
        for x in d.train.x.chunks_exact(4) {
            assert!(x[1] == 0.0 || x[1] == 1.0);
            assert_eq!(x[2] + x[3], 1.0, "one-hot ward");
        }
        assert!(r.to_string().contains("classes: no = 14, yes = 26"), "{r}");
        // Same data, same split.
        let again = load(&spec(""), f.path(), Some(&filter)).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn imputes_when_the_spec_says_so() {
        let mut text = String::from(HEADER);
        text += &rows(30, "North");
        text += "900,North,,yes,,no\n";
        let f = file(&text);
        let d = load(&spec("missing = \"impute\""), f.path(), None).unwrap();
        assert_eq!(d.report.rows_used, 31);
        let all: Vec<&[f32]> = [&d.train, &d.validation, &d.test]
            .iter()
            .flat_map(|e| e.x.chunks_exact(4))
            .collect();
        assert!(all.iter().all(|r| r.iter().all(|v| v.is_finite())));
        assert_eq!(
            all.iter().filter(|r| r[2] + r[3] == 0.0).count(),
            1,
            "missing ward: all-zero one-hot"
        );
    }

    #[test]
    fn records_to_predict_use_the_fitted_figures_in_file_order() {
        let mut text = String::from(HEADER);
        text += &rows(30, "North");
        let f = file(&text);
        let d = load(&spec(""), f.path(), None).unwrap();
        let prep = &d.preprocessing;
        assert_eq!(prep.columns.len(), 2, "age and smoker: {prep:?}");
        assert!(prep.columns[0].scale && !prep.columns[1].scale);
        prep.check(&spec("")).unwrap();
        // The same rows read as records encode exactly as the training split did.
        let r = load_records(&spec(""), prep, f.path(), None, Some("id")).unwrap();
        assert_eq!(r.rows.len(), 30);
        for (x, y) in d.train.x.chunks_exact(4).zip(&d.train.y) {
            let found = r
                .inputs
                .iter()
                .zip(&r.rows)
                .any(|(i, rec)| i == x && rec.label == Some(*y));
            assert!(found, "{x:?} not among the records");
        }
        // No label column needed; a missing feature under drop-row keeps its row with a note;
        // a bad cell is refused with its line.
        let g = file("id,age,smoker,ward\n7,40,yes,A\n8,,no,B\n");
        let r = load_records(&spec(""), prep, g.path(), None, Some("id")).unwrap();
        assert_eq!(r.inputs.len(), 1);
        assert_eq!(r.rows[0].id.as_deref(), Some("7"));
        assert_eq!((r.rows[0].at, r.rows[0].label), (Location::Line(2), None));
        assert!(
            r.rows[1].input.as_ref().unwrap_err().contains("`age`"),
            "{:?}",
            r.rows[1]
        );
        let r = load_records(&spec("missing = \"impute\""), prep, g.path(), None, None).unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert!(
            r.inputs[1][0].abs() < 1e-5,
            "imputed with the fitted mean, then scaled: {}",
            r.inputs[1][0]
        );
        let bad = file("id,age,smoker,ward\n7,forty,yes,A\n");
        let e = load_records(&spec(""), prep, bad.path(), None, None).unwrap_err();
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("forty"),
            "{e}"
        );
        // Figures fitted for other features are refused.
        let mut other = prep.clone();
        other.columns[0].name = "weight".into();
        let e = load_records(&spec(""), &other, g.path(), None, None).unwrap_err();
        assert!(e.to_string().contains("weight"), "{e}");
    }

    /// The rows of `rows(n, site)` (plus one with a missing age) as a Parquet file: `id` and
    /// `age` as optional doubles, `smoker` as a boolean, the rest as UTF-8 strings.
    fn parquet_file(n: usize, site: &str) -> tempfile::NamedTempFile {
        use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use std::sync::Arc;
        let f = tempfile::Builder::new()
            .suffix(".parquet")
            .tempfile()
            .unwrap();
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(
                "message rows { REQUIRED DOUBLE id; REQUIRED BYTE_ARRAY hospital (UTF8); \
                 OPTIONAL DOUBLE age; REQUIRED BOOLEAN smoker; REQUIRED BYTE_ARRAY ward (UTF8); \
                 REQUIRED BYTE_ARRAY outcome (UTF8); }",
            )
            .unwrap(),
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build(),
        );
        let mut w = SerializedFileWriter::new(f.reopen().unwrap(), schema, props).unwrap();
        let mut g = w.next_row_group().unwrap();
        let text = |v: Vec<String>| {
            v.into_iter()
                .map(|t| ByteArray::from(t.into_bytes()))
                .collect::<Vec<_>>()
        };
        let m = n + 1;
        let mut col = 0;
        while let Some(mut c) = g.next_column().unwrap() {
            match col {
                0 => {
                    let ids: Vec<f64> = (0..m).map(|i| i as f64).collect();
                    c.typed::<DoubleType>()
                        .write_batch(&ids, None, None)
                        .unwrap();
                }
                1 => {
                    let v = text(vec![site.to_owned(); m]);
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, None, None)
                        .unwrap();
                }
                2 => {
                    // The extra last row has no age (definition level 0).
                    let ages: Vec<f64> = (0..n).map(|i| (30 + i) as f64).collect();
                    let def: Vec<i16> = (0..m).map(|i| i16::from(i < n)).collect();
                    c.typed::<DoubleType>()
                        .write_batch(&ages, Some(&def), None)
                        .unwrap();
                }
                3 => {
                    let v: Vec<bool> = (0..m).map(|i| [true, false, true, false][i % 4]).collect();
                    c.typed::<BoolType>().write_batch(&v, None, None).unwrap();
                }
                4 => {
                    let v = text((0..m).map(|i| ["A", " b "][i % 2].to_owned()).collect());
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, None, None)
                        .unwrap();
                }
                _ => {
                    let v = text(
                        (0..m)
                            .map(|i| ["no", "yes", "maybe"][i % 3].to_owned())
                            .collect(),
                    );
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, None, None)
                        .unwrap();
                }
            }
            c.close().unwrap();
            col += 1;
        }
        g.close().unwrap();
        w.close().unwrap();
        f
    }

    #[test]
    fn parquet_reads_like_the_same_csv() {
        let n = 40;
        let pq = parquet_file(n, "North");
        let mut text = String::from(HEADER);
        text += &rows(n, "North");
        text += &format!(
            "{n},North,,yes,{},{}\n",
            ["A", " b "][n % 2],
            ["no", "yes", "maybe"][n % 3]
        );
        let csv = file(&text);
        let filter: RowFilter = "hospital=North".parse().unwrap();
        let a = load(&spec(""), pq.path(), Some(&filter)).unwrap();
        let b = load(&spec(""), csv.path(), Some(&filter)).unwrap();
        assert_eq!(a.report.missing["age"], 1, "a null is a missing cell");
        assert_eq!(a.report.dropped_missing_features, 1);
        assert_eq!(
            (a.train, a.validation, a.test),
            (b.train, b.validation, b.test)
        );
        // `fedee init` reads Parquet too: `id` (0, 1, 2, … as doubles) is a record identifier.
        let s = crate::infer::scaffold(pq.path(), "outcome", Some("hospital")).unwrap();
        let scaffolded = fedee_spec::FederationSpec::from_toml(&s.toml).unwrap();
        let names: Vec<&str> = scaffolded
            .features
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, ["age", "smoker", "ward"], "{}", s.toml);
        // A file that is not Parquet is refused as such.
        let fake = tempfile::Builder::new()
            .suffix(".parquet")
            .tempfile()
            .unwrap();
        std::fs::write(fake.path(), "id,age\n1,2\n").unwrap();
        let e = load(&spec(""), fake.path(), None).unwrap_err().to_string();
        assert!(e.contains("as Parquet"), "{e}");
    }

    #[test]
    fn hostile_files_are_refused_with_line_column_and_value() {
        let s = spec("");
        let err = |text: &str| load(&s, file(text).path(), None).unwrap_err().to_string();
        let e = err("id,age,smoker,ward\n1,2,yes,A\n");
        assert!(
            e.contains("no column `outcome`") && e.contains("`age`"),
            "{e}"
        );
        let e = err(&format!("{HEADER}{}1,N,forty,yes,A,no\n", rows(9, "N")));
        assert!(
            e.contains("line 11") && e.contains("`age`") && e.contains("`forty`"),
            "{e}"
        );
        let e = err(&format!("{HEADER}{}1,N,40,sometimes,A,no\n", rows(9, "N")));
        assert!(e.contains("`sometimes` is not a boolean"), "{e}");
        let e = err(&format!("{HEADER}{}1,N,40,yes,C,no\n", rows(9, "N")));
        assert!(e.contains("`C` is not one of the levels"), "{e}");
        let e = err(&format!("{HEADER}{}1,N,40,yes,A,dead\n", rows(9, "N")));
        assert!(e.contains("label `dead`") && e.contains("`maybe`"), "{e}");
        let e = err("");
        assert!(e.contains("is empty"), "{e}");
        let e = err(HEADER);
        assert!(e.contains("no usable rows"), "{e}");
        let e = err(&format!("{HEADER}1,N,40,yes,A,no\n2,N,41,no,B,no\n"));
        assert!(e.contains("every usable row is of class `no`"), "{e}");
        let e = err(&format!("{HEADER}1,N,40,yes,A,no\n2,N,41,no,B,yes\n"));
        assert!(
            e.contains("leave no training examples") || e.contains("usable rows"),
            "{e}"
        );
        let e = err(&format!("{HEADER}1,N,40\n"));
        assert!(e.contains("cannot read"), "ragged row: {e}");
        let f = file(&format!("{HEADER}{}", rows(9, "N")));
        let w: RowFilter = "ward_name=A".parse().unwrap();
        let e = load(&s, f.path(), Some(&w)).unwrap_err().to_string();
        assert!(
            e.contains("no column `ward_name` (needed as the --where column)"),
            "{e}"
        );
        assert!("nonsense".parse::<RowFilter>().is_err());
    }
}
