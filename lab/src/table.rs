//! One printer for the lab's result tables. A benchmark builds typed rows (serde structs whose
//! field names carry their units), prints them with [`print`] through a list of [`Column`]s,
//! and puts the same rows, unchanged, in its JSON document: the table and the file cannot
//! disagree.

use comfy_table::{CellAlignment, Table, presets::ASCII_MARKDOWN};
use serde::Serialize;

/// How a column shows its field.
#[derive(Clone, Copy)]
pub(crate) enum Cell {
    /// As it is (strings unquoted).
    Text,
    /// A float with this many decimals.
    Fixed(usize),
    /// A float in scientific notation with this many decimals.
    Sci(usize),
    /// Seconds shown as milliseconds with 3 decimals.
    Millis,
    /// A list of floats, each with this many decimals, space-separated.
    List(usize),
    /// A share in [0, 1] shown as a percentage with one decimal.
    Percent,
}

/// One column: its header, the row field it shows (`a/b` for field `b` of field `a`), and
/// how.
pub(crate) struct Column {
    header: &'static str,
    key: &'static str,
    cell: Cell,
}

/// A column showing field `key` of each row under `header`.
pub(crate) const fn col(header: &'static str, key: &'static str, cell: Cell) -> Column {
    Column { header, key, cell }
}

fn render(v: &serde_json::Value, cell: Cell) -> String {
    match (cell, v.as_f64()) {
        (Cell::Fixed(d), Some(x)) => format!("{x:.d$}"),
        (Cell::Sci(d), Some(x)) => format!("{x:.d$e}"),
        (Cell::Millis, Some(x)) => format!("{:.3} ms", 1e3 * x),
        (Cell::Percent, Some(x)) => format!("{:.1} %", 100.0 * x),
        (Cell::List(d), _) if v.is_array() => v
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                x.as_f64()
                    .map_or_else(|| x.to_string(), |x| format!("{x:.d$}"))
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "–".to_owned(),
            v => v.to_string(),
        },
    }
}

/// The rows as a Markdown table (the first column left-aligned, the others right-aligned),
/// ready to paste into BENCHMARKS.md.
pub(crate) fn render_table<R: Serialize>(columns: &[Column], rows: &[R]) -> String {
    let mut t = Table::new();
    t.load_preset(ASCII_MARKDOWN)
        .set_header(columns.iter().map(|c| c.header));
    for r in rows {
        let v = serde_json::to_value(r).expect("rows serialize");
        t.add_row(columns.iter().map(|c| {
            let field = v
                .pointer(&format!("/{}", c.key))
                .unwrap_or(&serde_json::Value::Null);
            render(field, c.cell)
        }));
    }
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_cell_alignment(if i == 0 {
            CellAlignment::Left
        } else {
            CellAlignment::Right
        });
    }
    t.to_string()
}

/// Print the rows on stdout as [`render_table`] does.
pub(crate) fn print<R: Serialize>(columns: &[Column], rows: &[R]) {
    println!("{}", render_table(columns, rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        model: &'static str,
        step_seconds: f64,
        ratio: f64,
        share: f64,
        rate: f64,
        parameters: u64,
        seq_len: Option<u64>,
        per_seed: Vec<f64>,
        nested: serde_json::Value,
    }

    #[test]
    fn columns_show_their_fields_in_their_format() {
        let rows = [Row {
            model: "mlp",
            step_seconds: 0.001_234_5,
            ratio: 1.0234,
            share: 0.1234,
            rate: 2.5e7,
            parameters: 7_681,
            seq_len: None,
            per_seed: vec![0.71, 0.7349],
            nested: serde_json::json!({"seconds": 2.0}),
        }];
        let t = render_table(
            &[
                col("model", "model", Cell::Text),
                col("step", "step_seconds", Cell::Millis),
                col("ratio", "ratio", Cell::Fixed(2)),
                col("share", "share", Cell::Percent),
                col("per s", "rate", Cell::Sci(1)),
                col("params", "parameters", Cell::Text),
                col("seq", "seq_len", Cell::Text),
                col("per seed", "per_seed", Cell::List(3)),
                col("nested", "nested/seconds", Cell::Fixed(1)),
                col("absent", "nested/missing", Cell::Fixed(1)),
            ],
            &rows,
        );
        let body = t.lines().last().unwrap();
        for want in [
            "mlp",
            "1.234 ms",
            "1.02",
            "2.5e7",
            "7681",
            "–",
            "0.710 0.735",
            "2.0",
            "12.3 %",
        ] {
            assert!(body.contains(want), "{want} in {t}");
        }
        assert!(t.lines().next().unwrap().contains("step"), "{t}");
    }
}
