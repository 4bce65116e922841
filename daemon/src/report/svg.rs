//! What the report's inline SVG plots share: the `<svg>` element with its title, the colour
//! scales, a heat-map grid with marked cells, a legend, and the collapsible table of a plot's
//! numbers. Every text that reaches the page is escaped here or by the caller with `esc`.

use std::fmt::Write as _;

use super::esc;

/// Series colours, in order.
pub(super) const COLORS: &[&str] = &["#cf222e", "#0969da", "#1a7f37", "#8250df", "#bf8700"];
/// The fill of a heat-map cell that was left out (e.g. an excluded candidate).
pub(super) const GREY: &str = "#afb8c1";
/// Axes and reference lines.
pub(super) const AXIS: &str = "#8c959f";
/// Approximate width of one character of the plots' 10px labels.
const CHAR_PX: f64 = 6.0;

/// The finite range of `v`, widened to one unit around a single value; (0, 1) when no value
/// is finite.
pub(super) fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

/// The largest finite `|v|` (0 when none).
pub(super) fn max_abs(v: impl Iterator<Item = f64>) -> f64 {
    v.filter(|x| x.is_finite())
        .map(f64::abs)
        .fold(0.0, f64::max)
}

/// The opening tag of a plot of `kind`, `w` x `h` pixels, whose first child is its title: the
/// plot's accessible name, and its tooltip.
pub(super) fn open(kind: &str, w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg class=\"plot\" data-kind=\"{}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\"><title>{}</title>",
        esc(kind),
        esc(title)
    )
}

/// Blue as strong as `x` in [0, 1] (clamped; transparent when not finite).
pub(super) fn shade(x: f64) -> String {
    let a = if x.is_finite() {
        x.clamp(0.0, 1.0) * 0.8
    } else {
        0.0
    };
    format!("rgba(9,105,218,{a:.3})")
}

/// Red for a positive `v`, blue for a negative one, as strong as `|v| / max` (clamped;
/// transparent when not finite or when `max` is not positive).
pub(super) fn signed(v: f64, max: f64) -> String {
    let a = if v.is_finite() && max > 0.0 {
        (v.abs() / max).clamp(0.0, 1.0) * 0.8
    } else {
        0.0
    };
    let rgb = if v >= 0.0 { "207,34,46" } else { "9,105,218" };
    format!("rgba({rgb},{a:.3})")
}

/// `text` cut to `n` characters, with an ellipsis when cut.
pub(super) fn clip(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        return text.to_string();
    }
    let mut s: String = text.chars().take(n.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// How a cell is marked besides its fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    Plain,
    /// A thin dark outline.
    Outlined,
    /// A thick black outline and a dot: the one cell that was chosen.
    Chosen,
}

impl Mark {
    fn class(self) -> &'static str {
        match self {
            Mark::Plain => "cell",
            Mark::Outlined => "cell outlined",
            Mark::Chosen => "cell chosen",
        }
    }

    fn stroke(self) -> &'static str {
        match self {
            Mark::Plain => "",
            Mark::Outlined => " stroke=\"#1f2328\" stroke-width=\"1.5\"",
            Mark::Chosen => " stroke=\"#000\" stroke-width=\"3\"",
        }
    }
}

/// One heat-map cell.
pub(super) struct Cell {
    pub fill: String,
    /// What the cell is and its value (a tooltip; escaped when drawn).
    pub tip: String,
    pub mark: Mark,
}

/// One entry of a legend: a swatch and what it means.
pub(super) struct Swatch {
    pub fill: String,
    pub mark: Mark,
    pub label: String,
}

/// The legend `items` from `(x, y)`, wrapped at `width`: the SVG and its height.
pub(super) fn legend(items: &[Swatch], x: f64, y: f64, width: f64) -> (String, f64) {
    let mut s = String::new();
    let (mut cx, mut cy) = (x, y);
    for it in items {
        let w = 20.0 + CHAR_PX * it.label.chars().count() as f64 + 14.0;
        if cx > x && cx + w > width {
            cx = x;
            cy += 18.0;
        }
        let _ = write!(
            s,
            "<g class=\"legend\"><rect x=\"{cx}\" y=\"{cy}\" width=\"12\" height=\"12\" fill=\"{}\"{}/><text x=\"{}\" y=\"{}\" font-size=\"10\">{}</text></g>",
            esc(&it.fill),
            if it.mark == Mark::Plain {
                " stroke=\"#d0d7de\""
            } else {
                it.mark.stroke()
            },
            cx + 18.0,
            cy + 10.0,
            esc(&it.label)
        );
        cx += w;
    }
    let height = if items.is_empty() { 0.0 } else { cy - y + 18.0 };
    (s, height)
}

/// A heat map: a visible caption, one row per label of `rows`, one column per label of
/// `cols`, `cells[row][col]` (`None`: no value there), and a legend below.
pub(super) struct Heatmap {
    pub kind: &'static str,
    /// The accessible name: what is plotted and how it is shaded.
    pub title: String,
    /// Shown above the grid.
    pub caption: String,
    /// What the rows and the columns are, shown below the grid.
    pub axes: String,
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub cells: Vec<Vec<Option<Cell>>>,
    /// The side of a cell in pixels.
    pub size: f64,
    pub legend: Vec<Swatch>,
}

impl Heatmap {
    /// The SVG; empty when there is no cell to draw.
    pub fn svg(&self) -> String {
        if self.rows.is_empty() || !self.cells.iter().flatten().any(Option::is_some) {
            return String::new();
        }
        let label_chars = |v: &[String]| v.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        let left = 12.0 + CHAR_PX * label_chars(&self.rows).min(12) as f64;
        let top = 26.0 + CHAR_PX * label_chars(&self.cols).min(12) as f64;
        let (n_rows, n_cols) = (self.rows.len(), self.cols.len());
        let grid_w = self.size * n_cols as f64;
        let grid_h = self.size * n_rows as f64;
        // Wide enough for the grid and, up to the page's width, the caption.
        let caption_w = (CHAR_PX * self.caption.chars().count() as f64 + 16.0).min(1040.0);
        let width = (left + grid_w + 16.0).max(caption_w).max(360.0);
        let (legend, legend_h) = legend(&self.legend, 8.0, top + grid_h + 26.0, width);
        let height = top + grid_h + 30.0 + legend_h;
        let step = (11.0 / self.size).ceil().max(1.0) as usize;
        let mut s = open(self.kind, width, height, &self.title);
        let _ = write!(
            s,
            "<text x=\"4\" y=\"13\" font-size=\"11\" font-weight=\"600\">{}</text>",
            esc(&self.caption)
        );
        for (i, label) in self.rows.iter().enumerate().step_by(step) {
            let _ = write!(
                s,
                "<text x=\"{}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
                left - 4.0,
                top + self.size * (i as f64 + 0.5) + 3.5,
                esc(&clip(label, 12))
            );
        }
        for (j, label) in self.cols.iter().enumerate().step_by(step) {
            let (x, y) = (left + self.size * (j as f64 + 0.5) + 3.5, top - 4.0);
            let _ = write!(
                s,
                "<text x=\"{x:.1}\" y=\"{y}\" font-size=\"10\" transform=\"rotate(-90 {x:.1} {y})\">{}</text>",
                esc(&clip(label, 12))
            );
        }
        // Marked cells are drawn last, so that no neighbour covers their outline.
        let mut marked = String::new();
        for (i, row) in self.cells.iter().enumerate() {
            for (j, cell) in row.iter().enumerate() {
                let Some(c) = cell else { continue };
                let (x, y) = (left + self.size * j as f64, top + self.size * i as f64);
                let out = if c.mark == Mark::Plain {
                    &mut s
                } else {
                    &mut marked
                };
                let inset = if c.mark == Mark::Chosen { 1.5 } else { 0.0 };
                let _ = write!(
                    out,
                    "<rect class=\"{}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"{}><title>{}</title></rect>",
                    c.mark.class(),
                    x + inset,
                    y + inset,
                    self.size - 2.0 * inset,
                    self.size - 2.0 * inset,
                    esc(&c.fill),
                    c.mark.stroke(),
                    esc(&c.tip)
                );
                if c.mark == Mark::Chosen {
                    let _ = write!(
                        out,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{:.1}\" fill=\"#000\"/>",
                        x + self.size / 2.0,
                        y + self.size / 2.0,
                        (self.size / 6.0).max(1.5)
                    );
                }
            }
        }
        s.push_str(&marked);
        let _ = write!(
            s,
            "<text x=\"{left}\" y=\"{:.1}\" font-size=\"10\">{}</text>",
            top + grid_h + 14.0,
            esc(&self.axes)
        );
        s.push_str(&legend);
        s.push_str("</svg>");
        s
    }
}

/// The numbers behind a plot, as a table that opens on demand; every cell is escaped here.
pub(super) fn numbers<H: AsRef<str>>(summary: &str, header: &[H], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "<details class=\"numbers\"><summary>{}</summary><table><tr>",
        esc(summary)
    );
    for h in header {
        let _ = write!(s, "<th>{}</th>", esc(h.as_ref()));
    }
    s.push_str("</tr>");
    for row in rows {
        s.push_str("<tr>");
        for cell in row {
            let _ = write!(s, "<td>{}</td>", esc(cell));
        }
        s.push_str("</tr>");
    }
    s.push_str("</table></details>");
    s
}

/// A number as the tables show it: as recorded (already rounded), `-` when absent.
pub(super) fn num(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| x.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(v: f64, mark: Mark) -> Option<Cell> {
        Some(Cell {
            fill: signed(v, 2.0),
            tip: format!("<v> {v}"),
            mark,
        })
    }

    fn map(cells: Vec<Vec<Option<Cell>>>) -> Heatmap {
        Heatmap {
            kind: "test",
            title: "a <title>".into(),
            caption: "cap & tion".into(),
            axes: "rows \"r\"".into(),
            rows: vec!["r<0>".into(), "r1".into()],
            cols: vec!["c'0".into(), "c1".into()],
            cells,
            size: 14.0,
            legend: vec![Swatch {
                fill: GREY.into(),
                mark: Mark::Plain,
                label: "left <out>".into(),
            }],
        }
    }

    #[test]
    fn colours_encode_the_sign_and_the_strength() {
        assert_eq!(signed(2.0, 2.0), "rgba(207,34,46,0.800)");
        assert_eq!(signed(-1.0, 2.0), "rgba(9,105,218,0.400)");
        assert_eq!(signed(-4.0, 2.0), "rgba(9,105,218,0.800)");
        assert!(signed(f64::NAN, 2.0).ends_with(",0.000)"));
        assert_eq!(signed(1.0, 0.0), "rgba(207,34,46,0.000)");
        assert_eq!(shade(0.5), "rgba(9,105,218,0.400)");
        assert_eq!(shade(f64::INFINITY), "rgba(9,105,218,0.000)");
    }

    #[test]
    fn a_heatmap_has_a_title_escaped_labels_and_its_marks_on_top() {
        let svg = map(vec![
            vec![cell(1.0, Mark::Chosen), cell(-2.0, Mark::Plain)],
            vec![None, cell(0.5, Mark::Outlined)],
        ])
        .svg();
        assert!(
            svg.starts_with("<svg class=\"plot\" data-kind=\"test\""),
            "{svg}"
        );
        assert!(
            svg.contains("role=\"img\"><title>a &lt;title&gt;</title>"),
            "{svg}"
        );
        for escaped in [
            "cap &amp; tion",
            "rows &quot;r&quot;",
            "r&lt;0&gt;",
            "c&#39;0",
            "&lt;v&gt; 1",
            "left &lt;out&gt;",
        ] {
            assert!(svg.contains(escaped), "{escaped}: {svg}");
        }
        assert!(!svg.contains("<v>") && !svg.contains("<0>"), "{svg}");
        // Three cells (one is absent); the chosen one drawn after the plain one.
        assert_eq!(svg.matches("<rect class=\"cell").count(), 3, "{svg}");
        let chosen = svg.find("class=\"cell chosen\"").unwrap();
        assert!(svg.find("class=\"cell\"").unwrap() < chosen, "{svg}");
        assert_eq!(svg.matches("class=\"cell chosen\"").count(), 1);
        assert!(svg[chosen..].contains("stroke-width=\"3\""), "{svg}");
        assert!(svg.contains("fill=\"rgba(9,105,218,0.800)\""), "{svg}");
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn a_heatmap_without_cells_is_absent() {
        assert_eq!(map(vec![]).svg(), "");
        let mut m = map(vec![vec![cell(1.0, Mark::Plain)]]);
        m.rows.clear();
        assert_eq!(m.svg(), "");
    }

    #[test]
    fn the_numbers_table_escapes_every_cell() {
        let t = numbers(
            "numbers <of> it",
            &["a&b"],
            &[vec!["<td>".to_string(), num(None), num(Some(0.25))]],
        );
        assert!(t.starts_with("<details class=\"numbers\"><summary>numbers &lt;of&gt; it"));
        assert!(t.contains("<th>a&amp;b</th>"), "{t}");
        assert!(
            t.contains("<td>&lt;td&gt;</td><td>-</td><td>0.25</td>"),
            "{t}"
        );
    }

    #[test]
    fn long_labels_are_clipped() {
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }
}
