//! `fedee init`: scaffold a commented federation spec from a data file, inferring each
//! column's type and levels, so a user edits a spec rather than writing one from nothing.
//!
//! Rules, applied to the non-missing cells of each column:
//! * the label column: its distinct values become the classes;
//! * the site column (`--site-column`) and columns that look like record identifiers (named
//!   `id`, `*_id`, `*id`, or every value distinct) are left out, with a comment saying why;
//! * every value a boolean word (Yes/No, Y/N, true/false, T/F, 0/1): boolean;
//! * every value a number: numeric;
//! * otherwise at most [`MAX_LEVELS`] distinct values: categorical with those levels; more:
//!   left out as free text or a high-cardinality code.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use fedee_spec::{is_missing, parse_bool, parse_number};

use crate::table::DataError;

/// Most levels a column may have to be scaffolded as categorical.
pub const MAX_LEVELS: usize = 32;
/// Most distinct label values `fedee init` lists as classes.
pub const MAX_CLASSES: usize = 50;

/// What `fedee init` decided about one column.
#[derive(Debug, Clone, PartialEq)]
pub enum Inferred {
    /// The label: its values with their counts (in class order).
    Label(Vec<(String, usize)>),
    /// A numeric feature with its range.
    Numeric {
        /// Smallest value.
        min: f64,
        /// Largest value.
        max: f64,
    },
    /// A boolean feature.
    Boolean,
    /// A categorical feature with its levels (sorted).
    Categorical(Vec<String>),
    /// Left out, and why.
    Excluded(String),
}

/// One column's inference.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnInference {
    /// Column name.
    pub name: String,
    /// Non-missing cells.
    pub present: usize,
    /// Missing cells.
    pub missing: usize,
    /// The decision.
    pub kind: Inferred,
}

/// The scaffold: the spec text and what was inferred per column.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaffold {
    /// Data rows read.
    pub rows: usize,
    /// Per column, in file order.
    pub columns: Vec<ColumnInference>,
    /// The commented TOML.
    pub toml: String,
}

#[derive(Default)]
struct Stats {
    present: usize,
    missing: usize,
    counts: BTreeMap<String, usize>,
    numeric: bool,
    boolean: bool,
    integer: bool,
    min: f64,
    max: f64,
}

/// Distinct values tracked per column (enough for any label or categorical column).
const TRACKED_VALUES: usize = 10_000;

/// `id`, `record_id`, `record-id`, `record id`, `recordId`, `RecordID`.
fn looks_like_id(name: &str) -> bool {
    let n = name.trim();
    let lower = n.to_ascii_lowercase();
    if lower == "id" || ["_id", "-id", " id"].iter().any(|s| lower.ends_with(s)) {
        return true;
    }
    let camel = n.strip_suffix("Id").or_else(|| n.strip_suffix("ID"));
    camel.is_some_and(|head| head.chars().last().is_some_and(char::is_lowercase))
}

/// Infer a spec from `path` (CSV with a header line, or Parquet) with `label` as the label
/// column.
///
/// # Errors
/// [`DataError`] for an unreadable or empty file, a missing label or site column, or a label
/// column with more than [`MAX_CLASSES`] values (not a classification label).
pub fn scaffold(
    path: &Path,
    label: &str,
    site_column: Option<&str>,
) -> Result<Scaffold, DataError> {
    let rdr = crate::table::open(path)?;
    let headers = rdr.headers.clone();
    crate::table::column(&headers, label, "the label", path)?;
    if let Some(s) = site_column {
        crate::table::column(&headers, s, "the site column", path)?;
    }
    let mut stats: Vec<Stats> = headers
        .iter()
        .map(|_| Stats {
            numeric: true,
            boolean: true,
            integer: true,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            ..Stats::default()
        })
        .collect();
    let mut rows = 0;
    for rec in rdr {
        let (_, rec) = rec?;
        rows += 1;
        for (s, cell) in stats.iter_mut().zip(rec.iter()) {
            if is_missing(cell) {
                s.missing += 1;
                continue;
            }
            s.present += 1;
            let v = cell.trim();
            if let Some(n) = s.counts.get_mut(v) {
                *n += 1;
            } else if s.counts.len() < TRACKED_VALUES {
                s.counts.insert(v.to_owned(), 1);
            }
            s.boolean &= parse_bool(v).is_some();
            match parse_number(v) {
                Some(x) => {
                    s.integer &= x.fract() == 0.0;
                    s.min = s.min.min(x);
                    s.max = s.max.max(x);
                }
                None => {
                    s.numeric = false;
                    s.integer = false;
                }
            }
        }
    }
    if rows == 0 {
        return Err(DataError::NoRows {
            path: path.to_owned(),
            selection: String::new(),
            detail: "the file has a header and no data rows".into(),
        });
    }
    let mut columns = Vec::with_capacity(headers.len());
    for (name, s) in headers.iter().zip(&stats) {
        let distinct = s.counts.len();
        let kind = if name == label {
            if !(2..=MAX_CLASSES).contains(&distinct) {
                return Err(DataError::NoRows {
                    path: path.to_owned(),
                    selection: String::new(),
                    detail: format!(
                        "label column `{label}` has {distinct} distinct values; a classification label needs between 2 and {MAX_CLASSES}"
                    ),
                });
            }
            let mut values: Vec<(String, usize)> =
                s.counts.iter().map(|(v, n)| (v.clone(), *n)).collect();
            if s.numeric {
                values.sort_by(|a, b| {
                    parse_number(&a.0)
                        .partial_cmp(&parse_number(&b.0))
                        .unwrap_or(std::cmp::Ordering::Equal)
                });
            }
            Inferred::Label(values)
        } else if Some(name.as_str()) == site_column {
            Inferred::Excluded(format!(
                "the site column: each site selects its rows with `fedee site --where {name}=VALUE`"
            ))
        } else if s.present == 0 {
            Inferred::Excluded("every cell is missing".into())
        } else if looks_like_id(name) || is_sequence_or_unique_code(s) {
            Inferred::Excluded(format!(
                "looks like a record identifier ({distinct} distinct values in {} rows): it would let the model memorise records",
                s.present
            ))
        } else if distinct == 1 {
            Inferred::Excluded("constant: the same value in every row".into())
        } else if s.boolean && distinct <= 4 {
            Inferred::Boolean
        } else if s.numeric {
            Inferred::Numeric {
                min: s.min,
                max: s.max,
            }
        } else if distinct <= MAX_LEVELS {
            Inferred::Categorical(s.counts.keys().cloned().collect())
        } else {
            Inferred::Excluded(format!(
                "free text or a code with {distinct}+ distinct values; for a text task write kind = \"text-classification\""
            ))
        };
        columns.push(ColumnInference {
            name: name.clone(),
            present: s.present,
            missing: s.missing,
            kind,
        });
    }
    let toml = render(path, rows, label, &columns);
    Ok(Scaffold {
        rows,
        columns,
        toml,
    })
}

/// Every row has a value, every value is distinct, and they are text (a code) or a run of
/// consecutive integers (a row number).
fn is_sequence_or_unique_code(s: &Stats) -> bool {
    let distinct = s.counts.len();
    distinct == s.present
        && s.missing == 0
        && s.present >= 20
        && (!s.numeric || (s.integer && s.max - s.min + 1.0 == s.present as f64))
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn render(path: &Path, rows: usize, label: &str, columns: &[ColumnInference]) -> String {
    let mut t = String::new();
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    let _ = writeln!(
        t,
        "# fedee federation spec, scaffolded by `fedee init` from {file} ({rows} rows).\n\
         # Every type below was inferred from the data: check each line before a federation\n\
         # runs it. The aggregator serves this file to the sites (fedee aggregator --spec).\n\
         version = 1\n"
    );
    let _ = writeln!(
        t,
        "[task]\nkind = \"tabular-classification\"\nlabel = {}",
        q(label)
    );
    if let Some(Inferred::Label(values)) = columns.iter().find(|c| c.name == label).map(|c| &c.kind)
    {
        let seen: Vec<String> = values.iter().map(|(v, n)| format!("{v} ({n})")).collect();
        let _ = writeln!(
            t,
            "# Values seen (rows): {}.\n\
             # Class i is logit i. Gather values into one class with\n\
             # {{ name = \"…\", values = [\"…\", \"…\"] }}.",
            seen.join(", ")
        );
        let classes: Vec<String> = values.iter().map(|(v, _)| q(v)).collect();
        let _ = writeln!(t, "classes = [{}]\n", classes.join(", "));
    }
    let _ = writeln!(
        t,
        "# Feature columns, in model input order: numeric, boolean, or categorical with levels\n\
         # (one-hot). Remove a table to leave a column out."
    );
    for c in columns {
        let missing = if c.missing * 5 > rows {
            // Worded without a key assignment, so editing `[data] missing` by search and
            // replace cannot hit this comment.
            format!(
                ", {} missing: dropping rows with a missing cell loses {:.0} % of the rows for this column alone; consider removing it or imputing",
                c.missing,
                100.0 * c.missing as f64 / rows as f64
            )
        } else if c.missing > 0 {
            format!(", {} missing", c.missing)
        } else {
            String::new()
        };
        match &c.kind {
            Inferred::Numeric { min, max } => {
                let _ = writeln!(
                    t,
                    "[[features]]\nname = {}\ntype = \"numeric\"  # {} values in [{min}, {max}]{missing}\n",
                    q(&c.name),
                    c.present
                );
            }
            Inferred::Boolean => {
                let _ = writeln!(
                    t,
                    "[[features]]\nname = {}\ntype = \"boolean\"  # {} values{missing}\n",
                    q(&c.name),
                    c.present
                );
            }
            Inferred::Categorical(levels) => {
                let l: Vec<String> = levels.iter().map(|v| q(v)).collect();
                let _ = writeln!(
                    t,
                    "[[features]]\nname = {}\ntype = \"categorical\"  # {} values{missing}\nlevels = [{}]\n",
                    q(&c.name),
                    c.present,
                    l.join(", ")
                );
            }
            Inferred::Label(_) | Inferred::Excluded(_) => {}
        }
    }
    let excluded: Vec<String> = columns
        .iter()
        .filter_map(|c| match &c.kind {
            Inferred::Excluded(why) => Some(format!("# - `{}`: {why}", c.name)),
            _ => None,
        })
        .collect();
    if !excluded.is_empty() {
        let _ = writeln!(t, "# Columns left out:\n{}\n", excluded.join("\n"));
    }
    let _ = writeln!(
        t,
        "[data]\n\
         missing = \"drop-row\"        # or \"impute\"; missing: blank, NA, N/A, NaN, null, ?\n\
         validation_fraction = 0.15  # held out per site for model selection\n\
         test_fraction = 0.25        # held out per site for the reported metrics\n\
         split_seed = 42\n\
         standardize = \"site\"        # numeric columns: (x - mean) / std of the site's train split;\n\
         \x20                           # or \"federated\": pooled DP statistics before round 1 (needs\n\
         \x20                           # range = [low, high] on each numeric feature, record-level\n\
         \x20                           # privacy and privacy.statistics_noise_multiplier)\n\n\
         [model]\n\
         kind = \"mlp\"\n\
         hidden = [32]               # one size per hidden layer, e.g. [64, 32]; at most 8 layers\n\
         activation = \"relu\"         # or \"gelu\"\n\n\
         [training]                  # local training at each site, per round\n\
         epochs = 2\n\
         batch_size = 16\n\
         optimizer = \"sgd\"           # or \"adamw\" (with weight_decay)\n\
         learning_rate = 0.05\n\
         momentum = 0.9\n\n\
         [federation]\n\
         rounds = 20\n\
         min_sites = 2               # quorum: sites that must submit for a round to close\n\
         round_timeout_s = 600\n\
         strategy = \"fedavg\"         # fedavg, fedprox, fedadam, fedyogi, median, trimmed-mean\n\n\
         # Uncomment so the aggregator learns only each round's sum of updates (3+ sites;\n\
         # not with median or trimmed-mean):\n\
         # [federation.secure_aggregation]\n\
         # max_update_norm = 10.0    # sites clip their update to this L2 norm (record mode)\n\
         # distributed_dp = true     # site mode: each site adds 1/t of the noise (Skellam)\n\n\
         [privacy]\n\
         mode = \"record\"             # DP-SGD at each site, unit: one record; or \"site\" (a site's update)\n\
         clipping_norm = 1.0\n\
         target_epsilon = 1.0        # ε each site may spend over the whole federation; each site\n\
         \x20                           # calibrates its own σ to its data (a small site needs more\n\
         \x20                           # noise). Or noise_multiplier = σ, the same at every site.\n\
         \x20                           # Sites refuse ε above their budget (default 10).\n\
         delta = 1e-5                # keep below 1 / (records at the smallest site)"
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaffold_infers_types_and_parses_back() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut text = String::from("patient_id,site,age,sex,smoker,note,blood,outcome\n");
        for i in 0..60 {
            let age = if i == 7 {
                "NA".to_owned()
            } else {
                format!("{}", 20 + i)
            };
            let sex = ["F", "M"][i % 2];
            let smoker = ["yes", "no", "Y"][i % 3];
            let blood = ["A", "B", "AB", "O"][i % 4];
            let out = ["0", "1", "2"][i % 3];
            text += &format!(
                "{i},{},{age},{sex},{smoker},note {i},{blood},{out}\n",
                ["x", "y"][i % 2]
            );
        }
        std::fs::write(f.path(), text).unwrap();
        let s = scaffold(f.path(), "outcome", Some("site")).unwrap();
        assert_eq!(s.rows, 60);
        let kind = |n: &str| s.columns.iter().find(|c| c.name == n).unwrap().kind.clone();
        assert!(matches!(kind("patient_id"), Inferred::Excluded(w) if w.contains("identifier")));
        assert!(matches!(kind("site"), Inferred::Excluded(w) if w.contains("--where site=")));
        assert!(
            matches!(kind("age"), Inferred::Numeric { min, max } if min == 20.0 && max == 79.0)
        );
        assert_eq!(
            kind("sex"),
            Inferred::Categorical(vec!["F".into(), "M".into()])
        );
        assert_eq!(kind("smoker"), Inferred::Boolean);
        assert!(matches!(kind("note"), Inferred::Excluded(_)));
        assert!(matches!(kind("outcome"), Inferred::Label(v) if v.len() == 3));
        let spec = fedee_spec::FederationSpec::from_toml(&s.toml)
            .unwrap_or_else(|e| panic!("{e}\n{}", s.toml));
        let names: Vec<&str> = spec.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["age", "sex", "smoker", "blood"]);
        assert_eq!(spec.num_classes(), 3);
        assert_eq!(spec.in_features(), 1 + 2 + 1 + 4);
        assert!(s.toml.contains("1 missing\n"), "{}", s.toml);
        assert!(
            !s.toml.contains("consider removing"),
            "1 of 60 is not mostly missing"
        );
        // The scaffold reads its own file.
        let d = crate::table::load(&spec, f.path(), None).unwrap();
        assert_eq!(d.report.rows_used, 59);
    }

    #[test]
    fn a_mostly_missing_column_is_flagged() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut text = String::from("a,b,y\n");
        for i in 0..20 {
            let b = if i % 3 == 0 {
                format!("{i}")
            } else {
                "NA".into()
            };
            text += &format!("{},{b},{}\n", i % 7, i % 2);
        }
        std::fs::write(f.path(), text).unwrap();
        let s = scaffold(f.path(), "y", None).unwrap();
        let line = s
            .toml
            .lines()
            .find(|l| l.contains("13 missing"))
            .unwrap_or_default();
        assert!(line.contains("loses 65 % of the rows"), "{}", s.toml);
        assert_eq!(
            s.toml.matches("missing = ").count(),
            1,
            "only the [data] key: {}",
            s.toml
        );
    }

    #[test]
    fn scaffold_refuses_what_it_cannot_use() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "a,b\n1,2\n").unwrap();
        let e = scaffold(f.path(), "label", None).unwrap_err().to_string();
        assert!(e.contains("no column `label`"), "{e}");
        let e = scaffold(f.path(), "a", Some("site"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no column `site`"), "{e}");
        let e = scaffold(f.path(), "a", None).unwrap_err().to_string();
        assert!(e.contains("1 distinct values"), "{e}");
    }
}
