//! The result table and the statistics it shows. A measurement adds [`Row`]s (and free-text
//! notes); `main` prints them once at the end, in the order they were added.

use std::time::Duration;

pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

pub fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub struct Row {
    id: &'static str,
    metric: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

pub fn row(id: &'static str, metric: impl Into<String>, ours: impl Into<String>) -> Row {
    Row {
        id,
        metric: metric.into(),
        ours: ours.into(),
        baseline: String::new(),
        ratio: String::new(),
        target: String::new(),
        met: None,
    }
}

impl Row {
    pub fn base(mut self, b: impl Into<String>) -> Self {
        self.baseline = b.into();
        self
    }
    pub fn ratio(mut self, r: f64) -> Self {
        self.ratio = format!("{r:.2}x");
        self
    }
    pub fn target(mut self, t: impl Into<String>, met: bool) -> Self {
        self.target = t.into();
        self.met = Some(met);
        self
    }
}

pub fn print_table(rows: &[Row]) {
    let headers = [
        "id", "metric", "handler", "baseline", "ratio", "target", "met",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.metric.clone(),
                r.ours.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                r.target.clone(),
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let mut width = headers.map(|h| h.chars().count());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            width[i] = width[i].max(s.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let parts: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = width[i]))
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(&headers.map(String::from));
    println!(
        "|{}|",
        width
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for c in &cells {
        line(c);
    }
}
