//! The one report trait every stage's report implements: JSON for machines, a table of per-layer (or
//! per-block) rows and summary lines for people.

use std::path::Path;

/// Rows of cells under a header; the first column is a name (left-aligned), the rest figures.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Aligned text: the first column left, the others right, two spaces apart.
    pub fn render(&self) -> String {
        if self.header.is_empty() {
            return String::new();
        }
        let mut w: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(w.len()) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let s: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| if i == 0 { format!("{c:<0$}", w[0]) } else { format!("{c:>0$}", w[i]) })
                .collect();
            s.join("  ").trim_end().to_string() + "\n"
        };
        let mut out = line(&self.header);
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

/// A stage's report.
pub trait Report {
    /// The report as JSON (the keys are stable: scripts read them).
    fn to_json(&self) -> serde_json::Value;
    /// Per-layer or per-block rows (empty when the stage has none).
    fn table(&self) -> Table {
        Table::default()
    }
    /// Lines that sum the stage up, printed after the table.
    fn summary(&self) -> Vec<String>;
    /// Told where the model was written, for the figures that need the files (sizes on disk).
    fn saved(&mut self, _out: &Path) {}
}

/// 1.23M, 4.5K, ...
pub fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// `x` as a percentage of `of` (0 when `of` is 0).
pub fn percent(x: usize, of: usize) -> f64 {
    100.0 * x as f64 / of.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["layer", "ms"]);
        t.row(vec!["a.long.name".into(), "1.5".into()]);
        t.row(vec!["b".into(), "10.25".into()]);
        assert_eq!(t.render(), "layer           ms\na.long.name    1.5\nb            10.25\n");
        assert_eq!(human(1_500_000), "1.50M");
    }
}
