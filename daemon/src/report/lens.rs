//! The logit-lens evidence of a finding as a heatmap: per prompt, a table of layers (rows)
//! by rank (columns), each cell the token read there, shaded by its probability. Plain HTML
//! with inline styles, like the rest of the report: no script, nothing fetched.

use std::fmt::Write as _;

use policies::result::LensEvidence;

use super::esc;

/// One heatmap table per prompt.
pub(super) fn heatmaps(lens: &[LensEvidence]) -> String {
    let mut s = String::new();
    for l in lens {
        let ranks = l.layers.iter().map(|x| x.top.len()).max().unwrap_or(0);
        let _ = write!(
            s,
            "<p><b>{}#{}</b>, next token after <code>{}</code></p><table class=\"lens\" data-kind=\"lens\"><tr><th>layer</th>",
            esc(&l.set),
            l.index + 1,
            esc(&format!("{:?}", l.token))
        );
        for r in 1..=ranks {
            let _ = write!(s, "<th>#{r}</th>");
        }
        s.push_str("</tr>");
        for layer in &l.layers {
            let _ = write!(s, "<tr><td>{}</td>", esc(&layer.layer));
            for t in &layer.top {
                let _ = write!(
                    s,
                    "<td class=\"tok\" title=\"p = {}\" style=\"background:{}\">{} <small>{:.3}</small></td>",
                    t.value,
                    super::svg::shade(t.value),
                    esc(&format!("{:?}", t.token)),
                    t.value
                );
            }
            for _ in layer.top.len()..ranks {
                s.push_str("<td></td>");
            }
            s.push_str("</tr>");
        }
        s.push_str("</table>");
    }
    s
}

#[cfg(test)]
mod tests {
    use policies::result::{LensEvidence, LensLayer, TokenValue};

    #[test]
    fn every_layer_is_a_row_shaded_by_probability_and_escaped() {
        let tok = |t: &str, v: f64| TokenValue {
            token: t.into(),
            value: v,
        };
        let lens = vec![LensEvidence {
            set: "harm<ful>".into(),
            index: 2,
            token: "\n".into(),
            layers: vec![
                LensLayer {
                    layer: "embed".into(),
                    top: vec![tok("<b>", 0.5), tok(" I", 0.25)],
                },
                LensLayer {
                    layer: "0".into(),
                    top: vec![tok(" Sorry", 1.0)],
                },
            ],
        }];
        let html = super::heatmaps(&lens);
        assert!(html.contains("harm&lt;ful&gt;#3"), "{html}");
        assert!(html.contains("&quot;&lt;b&gt;&quot;"), "{html}");
        assert!(!html.contains("<b>\""), "{html}");
        assert_eq!(html.matches("<tr>").count(), 3);
        assert!(html.contains("rgba(9,105,218,0.400)"), "{html}");
        assert!(html.contains("rgba(9,105,218,0.800)"), "{html}");
        // A short layer is padded to the table's width.
        assert!(html.contains("<td></td>"), "{html}");
    }
}
