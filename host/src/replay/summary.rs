//! Across traces: each policy's geometric mean of its hit rate over Belady's, per resident
//! share and over all of them, kept apart for the traces a policy was tuned on and the held-out
//! ones (`--held-out`), so a policy that only fits its own traces shows it.

use serde::Serialize;

use super::sweep::Row;

/// One policy's geometric mean over one set of traces at one capacity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// As in the rows (`belady` excluded; `oracle-prefetch` included).
    pub policy: String,
    /// `tuned` (`--trace`) or `held-out` (`--held-out`).
    pub set: &'static str,
    /// The capacity as given (`10%`: the same share of each trace's pool); `null`: every
    /// capacity together.
    pub capacity: Option<String>,
    /// Rows averaged (one per trace at a capacity).
    pub rows: usize,
    /// Geometric mean of `vs_belady`; `null` when no row has a Belady hit rate above 0.
    pub geomean_vs_belady: Option<f64>,
    /// Rows left out because Belady hits nothing there (the pool is smaller than a layer
    /// step's experts): no ratio exists.
    pub left_out: usize,
}

fn set_of(r: &Row) -> &'static str {
    if r.held_out {
        "held-out"
    } else {
        "tuned"
    }
}

/// The summaries of `rows`: policies in order of appearance, then sets (tuned first), then
/// capacities in order of appearance, then all capacities together.
pub fn summarize(rows: &[Row]) -> Vec<Summary> {
    let mut policies: Vec<&str> = Vec::new();
    let mut capacities: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.policy != "belady") {
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
        if !capacities.contains(&r.capacity_given.as_str()) {
            capacities.push(&r.capacity_given);
        }
    }
    let mut out = Vec::new();
    for policy in policies {
        for set in ["tuned", "held-out"] {
            let of: Vec<&Row> = rows
                .iter()
                .filter(|r| r.policy == policy && set_of(r) == set)
                .collect();
            if of.is_empty() {
                continue;
            }
            let mut one = |capacity: Option<&str>| {
                let at: Vec<&&Row> = of
                    .iter()
                    .filter(|r| capacity.is_none_or(|c| r.capacity_given == c))
                    .collect();
                if at.is_empty() {
                    return;
                }
                let ratios: Vec<f64> = at
                    .iter()
                    .filter(|r| r.belady_hit_rate > 0.0)
                    .map(|r| r.vs_belady)
                    .collect();
                let geomean = (!ratios.is_empty()).then(|| {
                    (ratios.iter().map(|x| x.ln()).sum::<f64>() / ratios.len() as f64).exp()
                });
                out.push(Summary {
                    policy: policy.to_owned(),
                    set,
                    capacity: capacity.map(str::to_owned),
                    rows: ratios.len(),
                    geomean_vs_belady: geomean,
                    left_out: at.len() - ratios.len(),
                });
            };
            for &c in &capacities {
                one(Some(c));
            }
            one(None);
        }
    }
    out
}

/// One table: a line per (policy, set), a column per capacity and one for all of them; a cell
/// is the geometric mean and, in brackets, the rows it averages.
pub fn text(summaries: &[Summary]) -> String {
    let mut capacities: Vec<&str> = Vec::new();
    for c in summaries.iter().filter_map(|s| s.capacity.as_deref()) {
        if !capacities.contains(&c) {
            capacities.push(c);
        }
    }
    let mut header = vec!["policy".to_owned(), "traces".to_owned()];
    header.extend(capacities.iter().map(|c| c.to_string()));
    header.push("all".to_owned());
    let mut table = vec![header];
    let mut lines: Vec<(&str, &str)> = Vec::new();
    for s in summaries {
        if !lines.contains(&(s.policy.as_str(), s.set)) {
            lines.push((&s.policy, s.set));
        }
    }
    for (policy, set) in lines {
        let mut row = vec![policy.to_owned(), set.to_owned()];
        let cells = capacities.iter().copied().map(Some).chain([None]);
        for capacity in cells {
            let cell = summaries
                .iter()
                .find(|s| s.policy == policy && s.set == set && s.capacity.as_deref() == capacity);
            row.push(match cell {
                Some(Summary {
                    geomean_vs_belady: Some(g),
                    rows,
                    ..
                }) => format!("{g:.3} ({rows})"),
                _ => "-".to_owned(),
            });
        }
        table.push(row);
    }
    let mut out = String::from(
        "Across traces: geometric mean of hit rate / Belady's (rows averaged; a trace and capacity \
         where Belady hits nothing is left out)\n",
    );
    // Policy and set left-aligned, numbers right-aligned.
    out.push_str(&super::report::columns(&table, |c| c < 2));
    out
}
