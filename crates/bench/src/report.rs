//! Results of a bench and the two ways of printing them: a human table and
//! JSON lines.

use std::fmt::Write as _;

use serde_json::Value;

/// Which direction of a figure (and of its ratio to the baseline) is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    /// Bigger is better (throughput).
    Higher,
    /// Smaller is better (latency).
    Lower,
}

impl Better {
    /// `"higher"` or `"lower"`, for the table.
    fn label(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// One measured figure of a bench: meshwork's value and, when the bench
/// measures one, the baseline's value in the same run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Figure {
    /// The bench that measured it, e.g. `"transport"`.
    pub(crate) bench: &'static str,
    /// What was measured, e.g. `"rtt_seq_64B"`.
    pub(crate) metric: String,
    /// meshwork's value (the median over the runs).
    pub(crate) value: f64,
    /// Unit of `value` and `baseline`, e.g. `"us"` or `"MiB/s"`.
    pub(crate) unit: &'static str,
    /// The baseline's value (the median over the runs), if there is a baseline.
    pub(crate) baseline: Option<f64>,
    /// What the baseline is, e.g. `"raw"` (shown in the table only); without
    /// a baseline, why there is none (e.g. `"tarpc not built"`), or empty.
    pub(crate) baseline_name: &'static str,
    /// `value / baseline`, if there is a baseline.
    pub(crate) ratio: Option<f64>,
    /// Whether a higher or a lower value is better.
    pub(crate) better: Better,
    /// What meshwork aims for, if anything. Shown in the table only.
    pub(crate) target: Option<Target>,
}

/// A figure's target: at most this when lower is better, at least this when
/// higher is better.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Target {
    /// A bound on the ratio to the baseline, e.g. at most 1.2× raw TCP.
    Ratio(f64),
    /// A bound on the value itself, in the figure's unit, e.g. at most 64 KiB.
    Value(f64),
}

impl Figure {
    /// A figure comparing meshwork's `value` with the value of the baseline
    /// called `baseline_name`; the ratio is computed here.
    pub(crate) fn compared(
        bench: &'static str,
        metric: impl Into<String>,
        unit: &'static str,
        better: Better,
        value: f64,
        (baseline_name, baseline): (&'static str, f64),
    ) -> Self {
        let ratio = (baseline != 0.0).then(|| value / baseline);
        Figure {
            bench,
            metric: metric.into(),
            value,
            unit,
            baseline: Some(baseline),
            baseline_name,
            ratio,
            better,
            target: None,
        }
    }

    /// Sets a target for the ratio to the baseline.
    pub(crate) fn with_target(mut self, ratio: f64) -> Self {
        self.target = Some(Target::Ratio(ratio));
        self
    }

    /// Sets a target for the value itself, in the figure's unit.
    pub(crate) fn with_value_target(mut self, value: f64) -> Self {
        self.target = Some(Target::Value(value));
        self
    }

    /// Whether the figure meets its target; `None` without a target, or for
    /// a ratio target without a ratio.
    pub(crate) fn meets_target(&self) -> Option<bool> {
        let (measured, bound) = match self.target? {
            Target::Ratio(bound) => (self.ratio?, bound),
            Target::Value(bound) => (self.value, bound),
        };
        Some(match self.better {
            Better::Higher => measured >= bound,
            Better::Lower => measured <= bound,
        })
    }

    /// The target as the table shows it, with ✓ or ✗ when it can be judged:
    /// `≤1.20 ✓` for a ratio, `≤64 KiB ✗` for a value.
    fn target_cell(&self) -> String {
        let Some(target) = self.target else {
            return String::new();
        };
        let sign = match self.better {
            Better::Higher => '≥',
            Better::Lower => '≤',
        };
        let bound = match target {
            Target::Ratio(r) => format!("{r:.2}"),
            Target::Value(v) if v.fract() == 0.0 => format!("{v:.0} {}", self.unit),
            Target::Value(v) => format!("{} {}", format_value(v), self.unit),
        };
        let mark = match self.meets_target() {
            Some(true) => " ✓",
            Some(false) => " ✗",
            None => "",
        };
        format!("{sign}{bound}{mark}")
    }

    /// The figure as one JSON object on one line, keys in this order:
    /// `bench, metric, value, unit, baseline, ratio` (`null` when absent).
    pub(crate) fn json_line(&self) -> String {
        format!(
            r#"{{"bench":{},"metric":{},"value":{},"unit":{},"baseline":{},"ratio":{}}}"#,
            Value::from(self.bench),
            Value::from(self.metric.as_str()),
            json_number(Some(round_value(self.value))),
            Value::from(self.unit),
            json_number(self.baseline.map(round_value)),
            json_number(self.ratio.map(round_ratio)),
        )
    }
}

/// A JSON number, or `null` for `None` and for values JSON cannot hold.
fn json_number(x: Option<f64>) -> Value {
    x.map_or(Value::Null, Value::from)
}

/// Rounds a measured value to 3 significant digits, but never drops integer
/// digits: 31.234 → 31.2, 5.678 → 5.68, 412345.6 → 412346.
fn round_value(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(0, 12);
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Rounds a ratio to 3 decimals.
fn round_ratio(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Formats a value for the table: like [`round_value`], without trailing
/// noise, and with no decimals at all from 1000 up.
fn format_value(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let abs = x.abs();
    if abs >= 100.0 {
        format!("{x:.0}")
    } else if abs >= 10.0 {
        format!("{x:.1}")
    } else if abs >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Prints `figures` as JSON lines on stdout, one line per figure.
pub(crate) fn print_json(figures: &[Figure]) {
    for figure in figures {
        println!("{}", figure.json_line());
    }
}

/// Renders `figures` as an aligned table, one row per figure.
pub(crate) fn table(figures: &[Figure]) -> String {
    let header = [
        "bench", "metric", "meshwork", "baseline", "unit", "vs", "ratio", "better", "target",
    ];
    // Numeric columns are right-aligned.
    let right = [false, false, true, true, false, false, true, false, false];
    let rows: Vec<[String; 9]> = figures
        .iter()
        .map(|f| {
            [
                f.bench.to_string(),
                f.metric.clone(),
                format_value(f.value),
                f.baseline.map_or_else(|| "-".into(), format_value),
                f.unit.to_string(),
                // Without a baseline, the name may say why (e.g. not built).
                match f.baseline {
                    Some(_) => f.baseline_name.to_string(),
                    None if !f.baseline_name.is_empty() => f.baseline_name.to_string(),
                    None => "-".into(),
                },
                f.ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
                f.better.label().to_string(),
                f.target_cell(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let w = widths[i];
            // Writing to a String cannot fail.
            let _ = if right[i] {
                write!(text, "{cell:>w$}")
            } else {
                write!(text, "{cell:<w$}")
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    line(&widths.map(|w| "-".repeat(w)));
    for row in &rows {
        line(row);
    }
    out
}

/// Prints `figures` as a table on stdout.
pub(crate) fn print_table(figures: &[Figure]) {
    print!("{}", table(figures));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtt() -> Figure {
        Figure::compared(
            "transport",
            "rtt_seq_64B",
            "us",
            Better::Lower,
            31.2345,
            ("raw", 27.91),
        )
        .with_target(1.2)
    }

    #[test]
    fn json_line_has_the_documented_shape() {
        assert_eq!(
            rtt().json_line(),
            r#"{"bench":"transport","metric":"rtt_seq_64B","value":31.2,"unit":"us","baseline":27.9,"ratio":1.119}"#
        );
        let alone = Figure {
            baseline: None,
            ratio: None,
            ..rtt()
        };
        assert_eq!(
            alone.json_line(),
            r#"{"bench":"transport","metric":"rtt_seq_64B","value":31.2,"unit":"us","baseline":null,"ratio":null}"#
        );
    }

    #[test]
    fn rounding_keeps_integer_digits() {
        assert_eq!(round_value(412_345.6), 412_346.0);
        assert_eq!(round_value(5.678), 5.68);
        assert_eq!(round_value(0.012_34), 0.0123);
        assert_eq!(round_ratio(0.70049), 0.7);
    }

    #[test]
    fn targets_follow_the_better_direction() {
        assert_eq!(rtt().meets_target(), Some(true));
        let slow = Figure {
            ratio: Some(1.5),
            ..rtt()
        };
        assert_eq!(slow.meets_target(), Some(false));
        let tput = Figure::compared("t", "m", "msg/s", Better::Higher, 70.0, ("raw", 100.0))
            .with_target(0.7);
        assert_eq!(tput.meets_target(), Some(true));
        let none = Figure {
            target: None,
            ..rtt()
        };
        assert_eq!(none.meets_target(), None);
    }

    #[test]
    fn value_targets_ignore_the_ratio() {
        let mem = Figure::compared("t", "idle", "KiB", Better::Lower, 40.0, ("plaintext", 10.0))
            .with_value_target(64.0);
        assert_eq!(mem.meets_target(), Some(true));
        let big = Figure {
            value: 80.0,
            ..mem.clone()
        };
        assert_eq!(big.meets_target(), Some(false));
        let alone = Figure {
            baseline: None,
            ratio: None,
            ..mem
        };
        assert_eq!(alone.meets_target(), Some(true));
        assert!(table(&[big]).contains("≤64 KiB ✗"));
    }

    #[test]
    fn table_has_a_row_per_figure_and_marks_targets() {
        let text = table(&[rtt()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("bench"));
        assert!(lines[2].contains("≤1.20 ✓"), "{text}");
    }
}
