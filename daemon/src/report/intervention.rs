//! Steering checks' metrics without and with their intervention, as grouped bar charts: one
//! chart per metric (a refusal rate and a refusal score do not share a scale), one group of
//! two bars per check and prompt set, the numbers in a table.

use std::fmt::Write as _;

use policies::result::InterventionMeans;

use super::esc;
use super::svg::{self, clip, legend, num, numbers, open, Mark, Swatch, AXIS, COLORS};

/// A check's means, with the policy and check they belong to.
pub(super) struct Bars<'a> {
    pub policy: &'a str,
    pub check: &'a str,
    pub means: &'a InterventionMeans,
}

const WITHOUT: &str = COLORS[1];
const WITH: &str = COLORS[0];

/// One chart per metric, in the order the metrics first appear; nothing without means.
pub(super) fn charts(all: &[Bars<'_>]) -> String {
    let mut metrics: Vec<&str> = Vec::new();
    for b in all {
        if !metrics.contains(&b.means.metric.as_str()) {
            metrics.push(&b.means.metric);
        }
    }
    let mut s = String::new();
    for metric in metrics {
        let group: Vec<&Bars<'_>> = all.iter().filter(|b| b.means.metric == metric).collect();
        s.push_str(&chart(metric, &group));
    }
    s
}

/// A bar's value as its label shows it: three decimals at most (the table has all).
fn short(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0" } else { s }.to_string()
}

fn chart(metric: &str, group: &[&Bars<'_>]) -> String {
    let (lo, hi) = svg::range(
        group
            .iter()
            .flat_map(|b| [b.means.without, b.means.with])
            .chain([0.0]),
    );
    let (left, top, plot_h, slot, bar) = (56.0, 26.0, 180.0, 110.0, 30.0);
    let width = (left + slot * group.len() as f64 + 20.0).max(360.0);
    let y = |v: f64| top + plot_h - (v - lo) / (hi - lo) * plot_h;
    let items = [
        Swatch {
            fill: WITHOUT.into(),
            mark: Mark::Plain,
            label: "without the intervention".into(),
        },
        Swatch {
            fill: WITH.into(),
            mark: Mark::Plain,
            label: "with the intervention".into(),
        },
    ];
    let (legend, legend_h) = legend(&items, 8.0, top + plot_h + 40.0, width);
    let height = top + plot_h + 44.0 + legend_h;
    let title = format!(
        "{metric} without (blue) and with (red) the intervention, per check and prompt set: {}",
        group
            .iter()
            .map(|b| format!(
                "{} on {}: {} without, {} with",
                b.check, b.means.set, b.means.without, b.means.with
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut s = open("intervention", width, height, &title);
    let _ = write!(
        s,
        "<text x=\"4\" y=\"14\" font-size=\"11\" font-weight=\"600\">{} without and with the intervention</text>",
        esc(metric)
    );
    let zero = y(0.0);
    let _ = write!(
        s,
        "<line x1=\"{left}\" y1=\"{zero:.1}\" x2=\"{}\" y2=\"{zero:.1}\" stroke=\"{AXIS}\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"{AXIS}\"/>",
        width - 10.0,
        top + plot_h
    );
    let _ = write!(
        s,
        "<text x=\"{0}\" y=\"{1:.1}\" font-size=\"10\" text-anchor=\"end\">{hi:.3}</text><text x=\"{0}\" y=\"{2:.1}\" font-size=\"10\" text-anchor=\"end\">{lo:.3}</text>",
        left - 4.0,
        top + 8.0,
        top + plot_h
    );
    if lo < 0.0 && hi > 0.0 {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">0</text>",
            left - 4.0,
            zero + 3.5
        );
    }
    for (i, b) in group.iter().enumerate() {
        let x0 = left + 10.0 + slot * i as f64;
        for (j, (series, v, fill)) in [
            ("without", b.means.without, WITHOUT),
            ("with", b.means.with, WITH),
        ]
        .into_iter()
        .enumerate()
        {
            let x = x0 + (bar + 4.0) * j as f64;
            let tip = format!(
                "{} on {}, {series} the intervention: {v}",
                b.check, b.means.set
            );
            if v.is_finite() {
                let (top_y, h) = (y(v).min(zero), (y(v) - zero).abs());
                let _ = write!(
                    s,
                    "<rect class=\"bar\" data-series=\"{series}\" x=\"{x:.1}\" y=\"{top_y:.1}\" width=\"{bar}\" height=\"{:.1}\" fill=\"{fill}\"><title>{}</title></rect>",
                    h.max(0.5),
                    esc(&tip)
                );
            }
            let label_y = if v.is_finite() && v < 0.0 {
                y(v) + 11.0
            } else if v.is_finite() {
                y(v) - 3.0
            } else {
                zero - 3.0
            };
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{label_y:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
                x + bar / 2.0,
                short(v)
            );
        }
        let label_x = x0 + bar + 2.0;
        let _ = write!(
            s,
            "<text x=\"{label_x:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\"><title>{}</title>{}</text><text x=\"{label_x:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            top + plot_h + 14.0,
            esc(&format!("{} / {}", b.policy, b.check)),
            esc(&clip(&b.means.set, 17)),
            top + plot_h + 27.0,
            esc(&clip(b.check, 17))
        );
    }
    s.push_str(&legend);
    s.push_str("</svg>");
    let rows: Vec<Vec<String>> = group
        .iter()
        .map(|b| {
            vec![
                b.policy.to_string(),
                b.check.to_string(),
                b.means.set.clone(),
                num(Some(b.means.without)),
                num(Some(b.means.with)),
                num(Some(policies::result::round(
                    b.means.with - b.means.without,
                ))),
            ]
        })
        .collect();
    s.push_str(&numbers(
        &format!("{metric} without and with the intervention"),
        &["policy", "check", "prompt set", "without", "with", "change"],
        &rows,
    ));
    s
}

#[cfg(test)]
mod tests {
    use policies::result::InterventionMeans;

    use super::Bars;

    fn means(set: &str, metric: &str, without: f64, with: f64) -> InterventionMeans {
        InterventionMeans {
            set: set.into(),
            metric: metric.into(),
            without,
            with,
        }
    }

    #[test]
    fn one_chart_per_metric_with_a_pair_of_bars_per_check() {
        let rate = means("harmful<steer>", "refusal rate", 0.75, 0.25);
        let rate2 = means("more", "refusal rate", 0.5, 0.5);
        let score = means("harmless", "refusal score", -3.0, 2.0);
        let html = super::charts(&[
            Bars {
                policy: "p",
                check: "ablate & see",
                means: &rate,
            },
            Bars {
                policy: "p",
                check: "add",
                means: &score,
            },
            Bars {
                policy: "q",
                check: "again",
                means: &rate2,
            },
        ]);
        assert_eq!(
            html.matches("data-kind=\"intervention\"").count(),
            2,
            "{html}"
        );
        let (first, second) = html.split_at(html.rfind("<svg").unwrap());
        assert!(first.contains(">refusal rate without and with the intervention</text>"));
        assert_eq!(first.matches("<rect class=\"bar\"").count(), 4, "{first}");
        assert_eq!(second.matches("<rect class=\"bar\"").count(), 2, "{second}");
        assert!(second.contains(">refusal score without and with the intervention</text>"));
        // Escaped everywhere: labels, tooltips, the table.
        assert!(html.contains("<title>ablate &amp; see on harmful&lt;steer&gt;, without the intervention: 0.75</title>"), "{html}");
        assert!(
            !html.contains("<steer>") && !html.contains("ablate & see"),
            "{html}"
        );
        assert!(html.contains("<tr><td>p</td><td>ablate &amp; see</td><td>harmful&lt;steer&gt;</td><td>0.75</td><td>0.25</td><td>-0.5</td></tr>"), "{html}");
        // The score's bars go down from zero for the negative baseline and up for the other.
        let bar = |series: &str| -> (f64, f64) {
            let at = second.find(&format!("data-series=\"{series}\"")).unwrap();
            let attr = |name: &str| -> f64 {
                let from = second[at..].find(&format!(" {name}=\"")).unwrap() + at + name.len() + 3;
                second[from..second[from..].find('"').unwrap() + from]
                    .parse()
                    .unwrap()
            };
            (attr("y"), attr("height"))
        };
        let ((y_without, h_without), (y_with, h_with)) = (bar("without"), bar("with"));
        assert!(
            (y_without - (y_with + h_with)).abs() < 0.2,
            "both meet at zero"
        );
        assert!(
            (h_without / h_with - 1.5).abs() < 0.01,
            "{h_without} {h_with}"
        );
    }

    #[test]
    fn no_means_no_chart_and_nan_has_no_bar() {
        assert_eq!(super::charts(&[]), "");
        let m = means("s", "refusal rate", f64::NAN, 0.5);
        let html = super::charts(&[Bars {
            policy: "p",
            check: "c",
            means: &m,
        }]);
        assert_eq!(html.matches("<rect class=\"bar\"").count(), 1, "{html}");
        assert!(html.contains(">NaN</text>"), "{html}");
    }

    #[test]
    fn bar_labels_are_short() {
        assert_eq!(super::short(0.666667), "0.667");
        assert_eq!(super::short(1.0), "1");
        assert_eq!(super::short(-0.0001), "0");
        assert_eq!(super::short(0.25), "0.25");
    }
}
