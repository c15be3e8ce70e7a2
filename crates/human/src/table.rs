//! Plain-text tables for people: columns padded to their widest cell, two spaces apart.

/// Renders rows (the first is usually the header) as aligned columns, one line per row.
pub fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_trailing_space_is_trimmed() {
        let rows = vec![
            vec!["A".to_string(), "LONG".into()],
            vec!["abc".into(), "x".into()],
        ];
        assert_eq!(render_table(&rows), "A    LONG\nabc  x\n");
        assert_eq!(render_table(&[]), "");
    }
}
