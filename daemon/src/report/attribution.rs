//! The plots of an attribution-patching check: the residual stream's estimates as a block x
//! position heat map (red where patching the clean activation in raises the metric, blue where
//! it lowers it), and the patched components' estimates against their real effects, with the
//! Pearson r the finding's metrics report: how far the linear estimate can be trusted.

use std::fmt::Write as _;

use policies::result::{AttributionMap, ComponentEffect, Evidence, Metric};

use super::esc;
use super::svg::{
    self, legend, max_abs, num, numbers, open, signed, Cell, Heatmap, Mark, Swatch, AXIS, COLORS,
};

/// The map and the scatter of `ev`, each absent without its evidence.
pub(super) fn plots(ev: &Evidence, metrics: &[Metric]) -> String {
    let mut s = String::new();
    if let Some(m) = &ev.attribution_map {
        s.push_str(&map(m));
    }
    s.push_str(&scatter(&ev.components, metrics));
    s
}

/// A column's label: the position and its token.
fn column(position: usize, token: Option<&String>) -> String {
    match token {
        Some(t) => format!("{position} {t:?}"),
        None => position.to_string(),
    }
}

fn map(m: &AttributionMap) -> String {
    let cols = m.rows.iter().map(Vec::len).max().unwrap_or(0);
    if cols == 0 {
        return String::new();
    }
    let max = max_abs(m.rows.iter().flatten().copied());
    let labels: Vec<String> = (0..cols).map(|p| column(p, m.tokens.get(p))).collect();
    let hook = &m.hook;
    let cells = m
        .rows
        .iter()
        .enumerate()
        .map(|(layer, row)| {
            (0..cols)
                .map(|p| {
                    row.get(p).map(|&v| Cell {
                        fill: signed(v, max),
                        tip: format!("blocks.{layer}.{hook}, position {}: {v}", labels[p]),
                        mark: Mark::Plain,
                    })
                })
                .collect()
        })
        .collect();
    let swatch = |v: f64, label: String| Swatch {
        fill: signed(v, max),
        mark: Mark::Plain,
        label,
    };
    let heatmap = Heatmap {
        kind: "attribution-map",
        title: format!(
            "Attribution estimates at blocks.L.{hook}: block (rows) by position of the first \
             clean prompt (columns); red where patching the clean activation in raises the \
             metric, blue where it lowers it, strongest at {max}"
        ),
        caption: format!("Estimates at blocks.L.{hook}, block x position"),
        axes: "rows: block, columns: position and token of the first clean prompt".into(),
        rows: (0..m.rows.len()).map(|l| l.to_string()).collect(),
        cols: labels.clone(),
        cells,
        size: (480.0 / cols as f64)
            .min(600.0 / m.rows.len().max(1) as f64)
            .clamp(8.0, 24.0),
        legend: vec![
            swatch(max, format!("+{max}: raises the metric")),
            swatch(-max, format!("-{max}: lowers it")),
        ],
    };
    let mut s = heatmap.svg();
    let header: Vec<String> = std::iter::once("block".to_string()).chain(labels).collect();
    let rows: Vec<Vec<String>> = m
        .rows
        .iter()
        .enumerate()
        .map(|(l, row)| {
            std::iter::once(l.to_string())
                .chain(row.iter().map(|v| v.to_string()))
                .collect()
        })
        .collect();
    s.push_str(&numbers(
        &format!("Estimates at blocks.L.{hook} (block x position)"),
        &header,
        &rows,
    ));
    s
}

/// The finding's Pearson r of estimates and effects, and how many components (the first, by
/// estimate) it is over: the `top K` its metric's name ends with.
fn pearson(metrics: &[Metric]) -> Option<(f64, Option<usize>)> {
    let m = metrics
        .iter()
        .find(|m| m.name.starts_with("pearson correlation"))?;
    let k = m.name.rsplit_once("top ").and_then(|(_, k)| k.parse().ok());
    Some((m.value, k))
}

fn scatter(components: &[ComponentEffect], metrics: &[Metric]) -> String {
    if components.is_empty() {
        return String::new();
    }
    let r = pearson(metrics);
    let k = r
        .and_then(|(_, k)| k)
        .unwrap_or(components.len())
        .min(components.len());
    let r_text = match r {
        Some((r, _)) => format!("Pearson r = {r} over the top {k}"),
        None => "no Pearson r in the finding's metrics".to_string(),
    };
    // One scale for both axes, so that the diagonal is estimate = effect.
    let (lo, hi) = svg::range(
        components
            .iter()
            .flat_map(|c| [c.estimate, c.effect])
            .chain([0.0]),
    );
    let (side, left, top) = (300.0, 64.0, 24.0);
    let x = |v: f64| left + (v - lo) / (hi - lo) * side;
    let y = |v: f64| top + side - (v - lo) / (hi - lo) * side;
    let width = left + side + 24.0;
    let items = [
        Swatch {
            fill: COLORS[1].into(),
            mark: Mark::Plain,
            label: format!("top {k} by |estimate|"),
        },
        Swatch {
            fill: COLORS[4].into(),
            mark: Mark::Plain,
            label: "patched besides (named heads)".into(),
        },
    ];
    let shown = if k < components.len() { 2 } else { 1 };
    let (legend, legend_h) = legend(&items[..shown], 8.0, top + side + 36.0, width);
    let height = top + side + 40.0 + legend_h;
    let mut s = open(
        "attribution-scatter",
        width,
        height,
        &format!(
            "Attribution estimate (x) against the real effect of patching (y) for {} \
             components; the dashed diagonal is estimate = effect; {r_text}",
            components.len()
        ),
    );
    let _ = write!(
        s,
        "<text x=\"4\" y=\"14\" font-size=\"11\" font-weight=\"600\">Estimate vs patching: {}</text>",
        esc(&r_text)
    );
    let _ = write!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{side}\" height=\"{side}\" fill=\"none\" stroke=\"{AXIS}\"/>"
    );
    if lo < 0.0 && hi > 0.0 {
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"{AXIS}\" stroke-width=\"0.5\"/><line x1=\"{2:.1}\" y1=\"{top}\" x2=\"{2:.1}\" y2=\"{3}\" stroke=\"{AXIS}\" stroke-width=\"0.5\"/>",
            y(0.0),
            left + side,
            x(0.0),
            top + side
        );
    }
    let _ = write!(
        s,
        "<line class=\"diagonal\" x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{AXIS}\" stroke-dasharray=\"4 3\"><title>estimate = effect</title></line>",
        x(lo),
        y(lo),
        x(hi),
        y(hi)
    );
    for (i, c) in components.iter().enumerate() {
        if !(c.estimate.is_finite() && c.effect.is_finite()) {
            continue;
        }
        let fill = if i < k { COLORS[1] } else { COLORS[4] };
        let _ = write!(
            s,
            "<circle class=\"point\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{fill}\" fill-opacity=\"0.75\"><title>{}: estimate {}, effect {}</title></circle>",
            x(c.estimate),
            y(c.effect),
            esc(&c.component),
            c.estimate,
            c.effect
        );
    }
    let _ = write!(
        s,
        "<text x=\"{left}\" y=\"{0}\" font-size=\"10\">{lo:.3}</text><text x=\"{1}\" y=\"{0}\" font-size=\"10\" text-anchor=\"end\">{hi:.3}</text><text x=\"{2}\" y=\"{0}\" font-size=\"10\" text-anchor=\"middle\">estimate</text>",
        top + side + 14.0,
        left + side,
        left + side / 2.0
    );
    let _ = write!(
        s,
        "<text x=\"{0}\" y=\"{1}\" font-size=\"10\" text-anchor=\"end\">{hi:.3}</text><text x=\"{0}\" y=\"{2}\" font-size=\"10\" text-anchor=\"end\">{lo:.3}</text><text x=\"{0}\" y=\"{3}\" font-size=\"10\" text-anchor=\"end\">effect</text>",
        left - 4.0,
        top + 8.0,
        top + side,
        top + side / 2.0
    );
    s.push_str(&legend);
    s.push_str("</svg>");
    let rows: Vec<Vec<String>> = components
        .iter()
        .enumerate()
        .map(|(i, c)| {
            vec![
                c.component.clone(),
                num(Some(c.estimate)),
                num(Some(c.effect)),
                if i < k { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    let in_top = format!("in the top {k}");
    s.push_str(&numbers(
        &format!(
            "Estimates and real effects of the {} patched components",
            components.len()
        ),
        &["component", "estimate", "effect", in_top.as_str()],
        &rows,
    ));
    s
}

#[cfg(test)]
mod tests {
    use policies::result::{AttributionMap, ComponentEffect, Evidence, Metric};

    fn component(name: &str, estimate: f64, effect: f64) -> ComponentEffect {
        ComponentEffect {
            component: name.into(),
            estimate,
            effect,
        }
    }

    fn evidence() -> Evidence {
        Evidence {
            components: vec![
                component("blocks.1.hook_resid_pre[2]", 2.0, 1.5),
                component("blocks.0.hook_mlp_out", -1.0, -0.5),
                component("blocks.0.attn.hook_result[<1>]", 0.1, 0.3),
            ],
            attribution_map: Some(AttributionMap {
                hook: "hook_resid_pre".into(),
                tokens: vec!["<s>".into(), " Paris".into()],
                rows: vec![vec![0.0, -4.0], vec![2.0, 1.0]],
            }),
            ..Evidence::default()
        }
    }

    fn metrics() -> Vec<Metric> {
        vec![Metric {
            name: "pearson correlation, estimate vs patching, top 2".into(),
            value: 0.987,
            bound: ">= 0.8".into(),
        }]
    }

    #[test]
    fn the_map_is_signed_by_colour_and_labelled_by_token() {
        let html = super::plots(&evidence(), &metrics());
        assert_eq!(html.matches("data-kind=\"attribution-map\"").count(), 1);
        // The strongest estimate is -4: negative is blue, positive red.
        assert!(html.contains("fill=\"rgba(9,105,218,0.800)\"><title>blocks.0.hook_resid_pre, position 1 &quot; Paris&quot;: -4</title>"), "{html}");
        assert!(html.contains("fill=\"rgba(207,34,46,0.400)\"><title>blocks.1.hook_resid_pre, position 0 &quot;&lt;s&gt;&quot;: 2</title>"), "{html}");
        assert!(!html.contains("<s>"), "{html}");
        assert!(
            html.contains("<th>block</th><th>0 &quot;&lt;s&gt;&quot;</th>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><td>0</td><td>0</td><td>-4</td></tr>"),
            "{html}"
        );
    }

    #[test]
    fn the_scatter_shows_the_findings_pearson_r_and_which_points_it_is_over() {
        let html = super::plots(&evidence(), &metrics());
        assert_eq!(html.matches("data-kind=\"attribution-scatter\"").count(), 1);
        assert!(html.contains("Pearson r = 0.987 over the top 2"), "{html}");
        assert_eq!(html.matches("<circle class=\"point\"").count(), 3, "{html}");
        assert_eq!(
            html.matches("fill=\"#0969da\" fill-opacity").count(),
            2,
            "{html}"
        );
        assert_eq!(
            html.matches("fill=\"#bf8700\" fill-opacity").count(),
            1,
            "{html}"
        );
        assert!(
            html.contains("blocks.0.attn.hook_result[&lt;1&gt;]: estimate 0.1, effect 0.3"),
            "{html}"
        );
        assert!(
            html.contains("<td>blocks.0.hook_mlp_out</td><td>-1</td><td>-0.5</td><td>yes</td>"),
            "{html}"
        );
        assert!(html.contains("<th>in the top 2</th>"), "{html}");
        assert!(html.contains("class=\"diagonal\""), "{html}");
    }

    #[test]
    fn without_the_metric_the_scatter_says_so() {
        let html = super::plots(&evidence(), &[]);
        assert!(
            html.contains("no Pearson r in the finding&#39;s metrics"),
            "{html}"
        );
        assert_eq!(
            html.matches("fill=\"#0969da\" fill-opacity").count(),
            3,
            "{html}"
        );
    }

    #[test]
    fn missing_evidence_draws_nothing() {
        assert_eq!(super::plots(&Evidence::default(), &metrics()), "");
        let empty_map = Evidence {
            attribution_map: Some(AttributionMap {
                hook: "hook_resid_pre".into(),
                tokens: vec![],
                rows: vec![vec![], vec![]],
            }),
            ..Evidence::default()
        };
        assert_eq!(super::plots(&empty_map, &metrics()), "");
    }
}
