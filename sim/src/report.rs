//! Metrics of a run and the summary the command line prints.
//!
//! Completion times are measured from the job's start to the moment an agent
//! holds every verified chunk. The makespan is the last agent's; percentiles
//! use the nearest-rank method over all agents (an agent that never completed
//! counts as infinitely late). Ratios divide by the Kumar–Ross lower bound
//! `T* = max(S/u_s, S/d_min, N·S/(u_s + Σu_i))`; when some uploads change
//! mid-job, the summary also gives the piecewise bound after the change
//! ([`lower_bound_after_change`](crate::scenario::lower_bound_after_change))
//! and Baton's ratio against it.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The nearest-rank `p`-quantile (`0.0..=1.0`) of `values` (sorted ascending); `NaN` if empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Completion times of all agents, sorted; agents that never completed are `+∞`.
pub fn sorted_completions(completion: &[Option<f64>]) -> Vec<f64> {
    let mut v: Vec<f64> = completion
        .iter()
        .map(|c| c.unwrap_or(f64::INFINITY))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// One strategy's result on a scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct StrategyResult {
    /// The strategy's name (`baton`, `unicast`, `chain_whole_file`, `binomial`).
    pub name: String,
    /// Agents that got the whole content.
    pub completed: usize,
    /// Last agent's completion, seconds.
    pub makespan: f64,
    /// Median completion, seconds.
    pub p50: f64,
    /// 99th percentile completion, seconds.
    pub p99: f64,
    /// Content bytes the manager sent (virtual).
    pub origin_bytes: u64,
    /// The strategy's closed-form makespan on this scenario, where there is one.
    pub closed_form: Option<f64>,
}

impl StrategyResult {
    /// From per-agent completion times (seconds, `None` = never).
    pub fn new(name: &str, completion: &[Option<f64>], origin_bytes: u64) -> Self {
        let sorted = sorted_completions(completion);
        StrategyResult {
            name: name.to_string(),
            completed: completion.iter().flatten().count(),
            makespan: sorted.last().copied().unwrap_or(f64::NAN),
            p50: percentile(&sorted, 0.50),
            p99: percentile(&sorted, 0.99),
            origin_bytes,
            closed_form: None,
        }
    }
}

/// The summary of one `baton-sim` invocation.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Agents in the fleet.
    pub agents: usize,
    /// Agents the engine confirmed in the Baton run.
    pub confirmed: usize,
    /// Kumar–Ross lower bound, seconds.
    pub lower_bound: f64,
    /// Which term of the bound binds.
    pub binding: &'static str,
    /// What the agents declared of their rates (`declared`, `blind` or `wrong`).
    pub rates: &'static str,
    /// The piecewise lower bound when uploads changed mid-job, seconds.
    pub lower_bound_after_change: Option<f64>,
    /// Virtual content size, bytes.
    pub content_bytes: u64,
    /// The Baton run and the baselines, in the order run.
    pub strategies: Vec<StrategyResult>,
    /// Extra fields for the JSON line (events, wall time, stripes…).
    pub extra: BTreeMap<String, Value>,
}

impl Summary {
    /// The Baton run's result, if it was run.
    pub fn baton(&self) -> Option<&StrategyResult> {
        self.strategies.iter().find(|s| s.name == "baton")
    }

    /// The JSON object of the last output line.
    pub fn to_json(&self) -> Value {
        let t = self.lower_bound;
        let b = self.baton();
        let ratio = |x: f64| {
            if x.is_finite() {
                json!(x / t)
            } else {
                Value::Null
            }
        };
        let mut strategies = serde_json::Map::new();
        let mut detail = serde_json::Map::new();
        for s in &self.strategies {
            strategies.insert(s.name.clone(), ratio(s.makespan));
            detail.insert(
                s.name.clone(),
                json!({
                    "completed": s.completed,
                    "makespan_seconds": finite(s.makespan),
                    "p50_ratio": ratio(s.p50),
                    "p99_ratio": ratio(s.p99),
                    "origin_bytes": s.origin_bytes,
                    "closed_form_seconds": s.closed_form,
                }),
            );
        }
        let mut v = json!({
            "agents": self.agents,
            "confirmed": self.confirmed,
            "makespan_seconds": b.map(|b| finite(b.makespan)),
            "lower_bound_seconds": t,
            "ratio": b.map_or(Value::Null, |b| ratio(b.makespan)),
            "p50_ratio": b.map_or(Value::Null, |b| ratio(b.p50)),
            "p99_ratio": b.map_or(Value::Null, |b| ratio(b.p99)),
            "origin_bytes": b.map(|b| b.origin_bytes),
            "strategies": strategies,
            "strategy_detail": detail,
            "binding_term": self.binding,
            "content_bytes": self.content_bytes,
            "rates": self.rates,
        });
        if let (Some(after), Value::Object(m)) = (self.lower_bound_after_change, &mut v) {
            m.insert("lower_bound_after_change_seconds".into(), json!(after));
            m.insert(
                "ratio_after_change".into(),
                b.map_or(Value::Null, |b| finite(b.makespan / after)),
            );
        }
        if let Value::Object(m) = &mut v {
            for (k, x) in &self.extra {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    }

    /// A few lines for people.
    pub fn text(&self) -> String {
        let t = self.lower_bound;
        let mut out = format!(
            "{} agents, {} content, lower bound T* = {:.3} s ({} term binds), {} rates\n",
            self.agents,
            crate::units::format_bytes(self.content_bytes),
            t,
            self.binding,
            self.rates
        );
        if let Some(after) = self.lower_bound_after_change {
            out.push_str(&format!(
                "uploads change mid-job: lower bound after the change {after:.3} s\n"
            ));
        }
        out.push_str(&format!(
            "{:<18} {:>9} {:>11} {:>8} {:>9} {:>9} {:>12}\n",
            "strategy", "complete", "makespan s", "ratio", "p50/T*", "p99/T*", "origin"
        ));
        for s in &self.strategies {
            out.push_str(&format!(
                "{:<18} {:>9} {:>11.3} {:>8.3} {:>9.3} {:>9.3} {:>12}\n",
                s.name,
                s.completed,
                s.makespan,
                s.makespan / t,
                s.p50 / t,
                s.p99 / t,
                crate::units::format_bytes(s.origin_bytes),
            ));
        }
        if let Some(b) = self.baton() {
            out.push_str(&format!(
                "baton: {} of {} confirmed, ratio {:.3}",
                self.confirmed,
                self.agents,
                b.makespan / t
            ));
            if let Some(after) = self.lower_bound_after_change {
                out.push_str(&format!(
                    ", {:.3} against the bound after the change",
                    b.makespan / after
                ));
            }
            out.push('\n');
        }
        out
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0], 0.5), 3.0);
        assert!(percentile(&[], 0.5).is_nan());
        let s = sorted_completions(&[Some(2.0), None, Some(1.0)]);
        assert_eq!(s[..2], [1.0, 2.0]);
        assert!(s[2].is_infinite());
    }

    #[test]
    fn json_has_the_keys() {
        let s = Summary {
            agents: 3,
            confirmed: 3,
            lower_bound: 2.0,
            binding: "aggregate",
            rates: "declared",
            lower_bound_after_change: None,
            content_bytes: 100,
            strategies: vec![
                StrategyResult::new("baton", &[Some(2.0), Some(2.2), Some(2.1)], 100),
                StrategyResult::new("unicast", &[Some(3.0), Some(4.0), Some(6.0)], 300),
            ],
            extra: BTreeMap::new(),
        };
        let v = s.to_json();
        for k in [
            "agents",
            "confirmed",
            "makespan_seconds",
            "lower_bound_seconds",
            "ratio",
            "p50_ratio",
            "p99_ratio",
            "origin_bytes",
            "strategies",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["ratio"], v["strategies"]["baton"]);
        assert!((v["ratio"].as_f64().unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(v["strategies"]["unicast"], json!(3.0));
        assert_eq!(v["rates"], json!("declared"));
        assert!(v.get("lower_bound_after_change_seconds").is_none());
    }

    #[test]
    fn a_rate_change_reports_its_bound_and_ratio() {
        let s = Summary {
            agents: 2,
            confirmed: 2,
            lower_bound: 2.0,
            binding: "aggregate",
            rates: "blind",
            lower_bound_after_change: Some(2.5),
            content_bytes: 100,
            strategies: vec![StrategyResult::new("baton", &[Some(2.0), Some(3.0)], 100)],
            extra: BTreeMap::new(),
        };
        let v = s.to_json();
        assert_eq!(v["rates"], json!("blind"));
        assert_eq!(v["lower_bound_after_change_seconds"], json!(2.5));
        assert!((v["ratio_after_change"].as_f64().unwrap() - 1.2).abs() < 1e-9);
        assert!((v["ratio"].as_f64().unwrap() - 1.5).abs() < 1e-9);
        let text = s.text();
        assert!(text.contains("blind rates"), "{text}");
        assert!(
            text.contains("1.200 against the bound after the change"),
            "{text}"
        );
    }
}
