//! workq's side of a comparison: `queue-cli bench -o json` against the coordinator,
//! so workq is measured by the same load generator users run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::peer::Measured;
use crate::sample::Percentiles;

/// The bench flags of one run (`--workload …` onward).
pub fn bench(bin_dir: &Path, url: &str, args: &[String], timeout: Duration) -> Result<Measured> {
    let cli = bin_dir.join("queue-cli");
    let output = Command::new("timeout")
        .arg(format!("{}", timeout.as_secs().max(1)))
        .arg(&cli)
        .args(["--server", url, "-o", "json", "bench"])
        .args(args)
        .output()
        .with_context(|| format!("run {}", cli.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = match serde_json::from_str(&stdout) {
        Ok(report) => report,
        Err(_) => bail!(
            "queue-cli bench {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    };
    Ok(measured(&report))
}

fn measured(report: &Value) -> Measured {
    let mut problems: Vec<String> = report["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if report["verified"] != true && problems.is_empty() {
        problems.push("queue-cli bench did not verify the run".into());
    }
    Measured {
        items: report["items"].as_u64().unwrap_or(0),
        seconds: report["seconds"].as_f64().unwrap_or(0.0),
        latency: Percentiles::from_json(&report["latency_us"]),
        cut_short: false,
        problems,
    }
}

/// `queue-cli stats QUEUE -o json`'s ready count, or None while it cannot answer.
pub fn ready(bin_dir: &Path, url: &str, queue: &str) -> Option<u64> {
    let output = Command::new(bin_dir.join("queue-cli"))
        .args(["--server", url, "-o", "json", "stats", queue])
        .output()
        .ok()?;
    let report: Value = serde_json::from_slice(&output.stdout).ok()?;
    report["stats"]["ready"].as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_queue_cli_bench_json() {
        let report = serde_json::json!({
            "workload": "drain", "items": 1000, "seconds": 0.5, "items_per_sec": 2000.0,
            "latency_us": {"p50": 100, "p99": 900, "p999": 1500, "max": 2000},
            "verified": true, "problems": []
        });
        let m = measured(&report);
        assert_eq!((m.items, m.latency.p99), (1000, 900));
        assert!(m.problems.is_empty());
        assert_eq!(m.items_per_sec(), 2000.0);
        let failed =
            measured(&serde_json::json!({"verified": false, "problems": ["3 items never acked"]}));
        assert_eq!(failed.problems, vec!["3 items never acked"]);
    }
}
