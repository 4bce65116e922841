//! The attention patterns of an induction check's top heads: per head, a heat map of query
//! cells (rows) by key cells (columns), shaded by the mean attention weight in each cell, and
//! the weights in a table.

use policies::result::AttentionPattern;

use super::svg::{numbers, shade, Cell, Heatmap, Mark, Swatch};

/// One heat map per pattern; a pattern without cells is left out.
pub(super) fn patterns(ps: &[AttentionPattern]) -> String {
    let mut s = String::new();
    for p in ps {
        let cols = p.rows.iter().map(Vec::len).max().unwrap_or(0);
        if cols == 0 {
            continue;
        }
        let max = super::svg::max_abs(p.rows.iter().flatten().copied());
        let start = |i: usize| (i * p.stride.max(1)).to_string();
        let head = format!("head {}.{}", p.layer, p.head);
        let cells = p
            .rows
            .iter()
            .enumerate()
            .map(|(q, row)| {
                (0..cols)
                    .map(|k| {
                        row.get(k).map(|&w| Cell {
                            fill: shade(if max > 0.0 { w / max } else { 0.0 }),
                            tip: format!(
                                "{head}: query from position {}, key from position {}: {w}",
                                start(q),
                                start(k)
                            ),
                            mark: Mark::Plain,
                        })
                    })
                    .collect()
            })
            .collect();
        let map = Heatmap {
            kind: "attention",
            title: format!(
                "Attention pattern of {head} on sequence {}: query positions (rows) by key \
                 positions (columns), {} position(s) per cell, shaded by the mean attention \
                 weight (darkest {max})",
                p.sequence, p.stride
            ),
            caption: format!("{head}, sequence {}", p.sequence),
            axes: format!(
                "rows: query position, columns: key position ({} per cell)",
                p.stride
            ),
            rows: (0..p.rows.len()).map(start).collect(),
            cols: (0..cols).map(start).collect(),
            cells,
            size: (240.0 / cols as f64).clamp(6.0, 16.0),
            legend: vec![
                Swatch {
                    fill: shade(0.0),
                    mark: Mark::Plain,
                    label: "0".into(),
                },
                Swatch {
                    fill: shade(1.0),
                    mark: Mark::Plain,
                    label: format!("{max} (the largest)"),
                },
            ],
        };
        s.push_str(&map.svg());
        let header: Vec<String> = std::iter::once("query \\ key".to_string())
            .chain((0..cols).map(start))
            .collect();
        let rows: Vec<Vec<String>> = p
            .rows
            .iter()
            .enumerate()
            .map(|(q, row)| {
                std::iter::once(start(q))
                    .chain(row.iter().map(|w| w.to_string()))
                    .collect()
            })
            .collect();
        s.push_str(&numbers(
            &format!("Attention weights of {head} (mean per cell)"),
            &header,
            &rows,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use policies::result::AttentionPattern;

    fn pattern(layer: usize, head: usize, rows: Vec<Vec<f64>>) -> AttentionPattern {
        AttentionPattern {
            layer,
            head,
            sequence: 0,
            stride: 3,
            rows,
        }
    }

    #[test]
    fn each_head_gets_a_labelled_heatmap_shaded_by_weight_and_a_table() {
        let html = super::patterns(&[
            pattern(18, 6, vec![vec![1.0], vec![0.25, 0.5]]),
            pattern(3, 1, vec![vec![0.1]]),
        ]);
        assert_eq!(html.matches("data-kind=\"attention\"").count(), 2, "{html}");
        assert!(
            html.contains("<title>Attention pattern of head 18.6 on sequence 0"),
            "{html}"
        );
        assert!(html.contains(">head 18.6, sequence 0</text>"), "{html}");
        assert!(html.contains(">head 3.1, sequence 0</text>"), "{html}");
        // Shaded relative to the head's largest weight.
        assert!(html.contains("fill=\"rgba(9,105,218,0.800)\""), "{html}");
        assert!(html.contains("fill=\"rgba(9,105,218,0.200)\""), "{html}");
        // Rows and columns are labelled by their first position (3 per cell).
        assert!(
            html.contains("query from position 3, key from position 3: 0.5"),
            "{html}"
        );
        assert!(html.contains("<summary>Attention weights of head 18.6 (mean per cell)"));
        assert!(
            html.contains("<th>query \\ key</th><th>0</th><th>3</th>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><td>3</td><td>0.25</td><td>0.5</td></tr>"),
            "{html}"
        );
    }

    #[test]
    fn no_patterns_or_empty_patterns_draw_nothing() {
        assert_eq!(super::patterns(&[]), "");
        assert_eq!(super::patterns(&[pattern(0, 0, vec![])]), "");
        assert_eq!(super::patterns(&[pattern(0, 0, vec![vec![]])]), "");
    }
}
