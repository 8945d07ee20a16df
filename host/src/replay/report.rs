//! A sweep's rows as text tables (one per trace) or one JSON array.

use std::fmt::Write;

use super::sweep::Row;

/// Thousands separators: 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn gb(bytes: u64) -> String {
    let g = bytes as f64 / 1e9;
    if g >= 100.0 {
        format!("{g:.0}")
    } else if g >= 0.1 {
        format!("{g:.2}")
    } else {
        format!("{g:.4}")
    }
}

fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "inf".into()
    }
}

/// One table per trace, rows in sweep order.
pub fn text(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut traces: Vec<&str> = Vec::new();
    for r in rows {
        if !traces.contains(&r.trace.as_str()) {
            traces.push(&r.trace);
        }
    }
    for trace in traces {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.trace == trace).collect();
        let first = rs[0];
        let pool = first.pool_experts as u64;
        let _ = writeln!(
            out,
            "{trace}: {} tokens, {} accesses, {} pool of {} experts{}; expert {} bytes; link {}",
            group(first.tokens),
            group(first.accesses),
            if first.per_layer { "per-layer" } else { "one" },
            group(pool),
            match (first.host_capacity, first.per_layer) {
                (Some(h), false) => format!(", host tier {} experts", group(h as u64)),
                (Some(h), true) => format!(", host tier {} experts per layer", group(h as u64)),
                (None, _) => ", host tier holds every expert".into(),
            },
            group(first.expert_bytes),
            first.link,
        );
        let header = [
            "capacity",
            "policy",
            "hit rate",
            "vs Belady",
            "hits",
            "misses",
            "streamed",
            "moved GB",
            "stall ms/tok",
            "tok/s ceiling",
            "prefetch i/u/w",
            "fallbacks",
        ];
        let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for r in &rs {
            table.push(vec![
                format!("{} ({:.1}%)", r.capacity, r.resident_fraction * 100.0),
                r.policy.clone(),
                format!("{:.3}", r.hit_rate),
                num(r.vs_belady, 3),
                group(r.hits),
                group(r.misses),
                group(r.streamed),
                gb(r.bytes_moved),
                num(r.stall_ms_per_token, 3),
                num(r.tokens_per_s_ceiling, 1),
                if r.prefetch_issued > 0 || r.prefetch != "none" {
                    format!(
                        "{}/{}/{}",
                        group(r.prefetch_issued),
                        group(r.prefetch_used),
                        group(r.prefetch_wasted)
                    )
                } else {
                    "-".into()
                },
                group(r.policy_fallbacks),
            ]);
        }
        // Text (the policy) left-aligned, numbers right-aligned.
        out.push_str(&columns(&table, |c| c == 1));
        out.push('\n');
    }
    out
}

/// `table`'s rows as aligned columns, one line each: the columns `left` accepts left-aligned,
/// the others right-aligned.
pub fn columns(table: &[Vec<String>], left: impl Fn(usize) -> bool) -> String {
    let widths: Vec<usize> = (0..table.first().map_or(0, Vec::len))
        .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in table {
        let mut line = String::from(" ");
        for (c, cell) in row.iter().enumerate() {
            if left(c) {
                let _ = write!(line, " {cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, " {cell:>w$}", w = widths[c]);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// One JSON array of rows.
pub fn json(rows: &[Row]) -> String {
    serde_json::to_string_pretty(rows).expect("rows serialise")
}
