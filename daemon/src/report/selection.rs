//! The candidate-selection map of a selected direction: every candidate's proxy score on a
//! block x position heat map, the chosen candidate marked, the scored ones outlined, those
//! excluded before scoring (depth, zero length) grey; every candidate's scores in a table.

use policies::result::{CandidateRecord, SelectionRecord};

use super::svg::{max_abs, num, numbers, signed, Cell, Heatmap, Mark, Swatch, GREY};

/// Excluded before any score: beyond the depth limit, or of zero length.
fn excluded(c: &CandidateRecord) -> bool {
    c.outcome == "zero length" || c.outcome.starts_with("depth")
}

fn mark(c: &CandidateRecord) -> Mark {
    if c.outcome == "chosen" {
        Mark::Chosen
    } else if c.bypass.is_some() {
        Mark::Outlined
    } else {
        Mark::Plain
    }
}

/// The map of direction `name` of `policy`; absent when the record has no candidate.
pub(super) fn map(policy: &str, name: &str, sel: &SelectionRecord) -> String {
    let mut layers: Vec<usize> = sel.candidates.iter().map(|c| c.layer).collect();
    let mut positions: Vec<i64> = sel.candidates.iter().map(|c| c.position).collect();
    layers.sort_unstable();
    layers.dedup();
    positions.sort_unstable();
    positions.dedup();
    if layers.is_empty() {
        return String::new();
    }
    let max = max_abs(
        sel.candidates
            .iter()
            .filter(|c| !excluded(c))
            .map(|c| c.proxy),
    );
    let cells = layers
        .iter()
        .map(|&l| {
            positions
                .iter()
                .map(|&p| {
                    let c = sel
                        .candidates
                        .iter()
                        .find(|c| c.layer == l && c.position == p)?;
                    Some(Cell {
                        fill: if excluded(c) {
                            GREY.into()
                        } else {
                            signed(c.proxy, max)
                        },
                        tip: format!(
                            "block {l} position {p}: proxy {}, bypass {}, induce {}, KL {}; {}",
                            c.proxy,
                            num(c.bypass),
                            num(c.induce),
                            num(c.kl),
                            c.outcome
                        ),
                        mark: mark(c),
                    })
                })
                .collect()
        })
        .collect();
    let swatch = |fill: String, mark: Mark, label: String| Swatch { fill, mark, label };
    let heatmap = Heatmap {
        kind: "selection",
        title: format!(
            "Candidate selection of direction `{name}` ({policy}): proxy score (Cohen's d of \
             the validation sets' projections) per block (rows) and position (columns); the \
             chosen candidate, {} at position {}, has a thick black outline and a dot, the {} \
             scored ones a thin outline, those excluded by depth or zero length are grey",
            sel.hook, sel.position, sel.scored
        ),
        caption: format!(
            "Direction `{name}` ({policy}): chosen {} at position {}",
            sel.hook, sel.position
        ),
        axes: "rows: block (blocks.L.hook_resid_pre), columns: position from the end".into(),
        rows: layers.iter().map(|l| l.to_string()).collect(),
        cols: positions.iter().map(|p| p.to_string()).collect(),
        cells,
        size: 18.0,
        legend: vec![
            swatch(signed(max, max), Mark::Plain, format!("proxy +{max}")),
            swatch(signed(-max, max), Mark::Plain, format!("proxy -{max}")),
            swatch(
                GREY.into(),
                Mark::Plain,
                "excluded (depth, zero length)".into(),
            ),
            swatch(
                "none".into(),
                Mark::Outlined,
                format!("scored on {} prompts per set", sel.prompts),
            ),
            swatch("none".into(), Mark::Chosen, "chosen".into()),
        ],
    };
    let mut s = heatmap.svg();
    let rows: Vec<Vec<String>> = sel
        .candidates
        .iter()
        .map(|c| {
            vec![
                c.layer.to_string(),
                c.position.to_string(),
                c.proxy.to_string(),
                num(c.bypass),
                num(c.induce),
                num(c.kl),
                c.outcome.clone(),
            ]
        })
        .collect();
    s.push_str(&numbers(
        &format!(
            "Scores of the {} candidates of `{name}`",
            sel.candidates.len()
        ),
        &[
            "block", "position", "proxy", "bypass", "induce", "KL", "outcome",
        ],
        &rows,
    ));
    s
}

#[cfg(test)]
mod tests {
    use policies::result::{CandidateRecord, SelectionRecord};

    fn candidate(layer: usize, position: i64, proxy: f64, outcome: &str) -> CandidateRecord {
        let scored = outcome == "chosen" || outcome == "kept" || outcome.starts_with("kl");
        CandidateRecord {
            layer,
            position,
            proxy,
            bypass: scored.then_some(-3.5),
            induce: scored.then_some(2.0),
            kl: scored.then_some(0.05),
            outcome: outcome.into(),
        }
    }

    fn record() -> SelectionRecord {
        SelectionRecord {
            hook: "blocks.3.hook_resid_pre".into(),
            position: -2,
            scored: 2,
            prompts: 8,
            harmful_score: Some(-1.5),
            harmless_score: Some(-2.9),
            candidates: vec![
                candidate(0, -2, 0.0, "zero length"),
                candidate(0, -1, 0.0, "zero length"),
                candidate(3, -2, 4.0, "chosen"),
                candidate(3, -1, 2.0, "kl: 0.2 >= max_kl 0.1 <&>"),
                candidate(6, -2, 9.0, "depth: block 6 >= max_depth 0.75 x 8"),
                candidate(6, -1, -1.0, "not scored: proxy rank 3 > 2"),
            ],
        }
    }

    #[test]
    fn the_chosen_candidate_is_marked_scored_outlined_excluded_grey() {
        let html = super::map("planted", "refusal", &record());
        assert_eq!(html.matches("data-kind=\"selection\"").count(), 1, "{html}");
        assert_eq!(html.matches("class=\"cell chosen\"").count(), 1, "{html}");
        assert!(
            html.contains("<title>block 3 position -2: proxy 4, bypass -3.5, induce 2, KL 0.05; chosen</title>"),
            "{html}"
        );
        let chosen = html.find("class=\"cell chosen\"").unwrap();
        assert!(html[..chosen].contains("<title>Candidate selection of direction `refusal`"));
        assert_eq!(html.matches("class=\"cell outlined\"").count(), 1, "{html}");
        // Excluded candidates are grey whatever their proxy; the colour scale is the proxy's
        // among the others (the depth-excluded 9 does not set it).
        assert_eq!(
            html.matches("fill=\"#afb8c1\"><title>block").count(),
            3,
            "{html}"
        );
        assert!(
            html.contains("fill=\"rgba(207,34,46,0.800)\" stroke=\"#000\""),
            "{html}"
        );
        assert!(
            html.contains("fill=\"rgba(9,105,218,0.200)\"><title>block 6 position -1"),
            "{html}"
        );
        assert!(
            html.contains("kl: 0.2 &gt;= max_kl 0.1 &lt;&amp;&gt;"),
            "{html}"
        );
        assert!(!html.contains("<&>"), "{html}");
        for label in [
            "excluded (depth, zero length)",
            "scored on 8 prompts per set",
            ">chosen<",
        ] {
            assert!(html.contains(label), "{label}: {html}");
        }
        assert!(html.contains(">Direction `refusal` (planted): chosen blocks.3.hook_resid_pre at position -2</text>"), "{html}");
        assert!(html.contains("<tr><td>6</td><td>-2</td><td>9</td><td>-</td><td>-</td><td>-</td><td>depth: block 6"), "{html}");
    }

    #[test]
    fn a_record_without_candidates_draws_nothing() {
        let mut r = record();
        r.candidates.clear();
        assert_eq!(super::map("p", "d", &r), "");
    }
}
