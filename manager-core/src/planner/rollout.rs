//! A staged rollout's rules: the waves a job's participants are split into, and when the
//! next wave opens (a policy's [`Policy::rollout`](super::Policy::rollout)).
//!
//! Waves are cumulative percentages of the participants in the order of the prioritized
//! list (`10, 50, 100`: the best-ranked tenth, then up to half, then everyone), or lists
//! of agents and content groups (a group is resolved to its members when the job is
//! created; participants listed in no wave go in the last). The engine carries the rules out (the `engine` module's
//! rollout part): a wave's participants are not instructed before it opens, the next
//! wave opens once enough of the current one runs the content (after a soak time and an
//! administrator's approval, if asked), and failures beyond a threshold pause or abort
//! the rollout.

use baton_protocol::types::AgentId;
use serde::{Deserialize, Serialize};

/// Most waves a rollout may have.
pub const MAX_WAVES: usize = 16;

/// Longest soak time between two waves: 7 days, in seconds.
pub const MAX_SOAK_SECS: u64 = 7 * 24 * 3600;

/// One wave of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wave {
    /// Up to this percentage (1..=100) of the participants, counted from the first wave on.
    Percent(u8),
    /// These agents.
    Agents(Vec<AgentId>),
    /// The members of this content group: the manager replaces it with their list
    /// ([`Wave::Agents`]) when a job is created (a policy may name groups); unresolved, it
    /// holds nobody.
    Group(String),
}

/// The rules of a staged rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rollout {
    /// The waves, in order (at least one, at most [`MAX_WAVES`]; all percentages or all
    /// agent lists).
    pub waves: Vec<Wave>,
    /// The next wave opens once this percentage (1..=100) of the current wave's
    /// participants that have not failed runs the content (default 100: all of them).
    pub success_percent: u8,
    /// Seconds to wait, once a wave has succeeded, before the next opens (default 0).
    pub soak_secs: u64,
    /// The next wave opens only once an administrator approves it (default: no).
    pub approval: bool,
    /// Pause the rollout when more than this many participants of a wave fail (delivery,
    /// install or rolled back); `None`: never.
    pub pause_after_failures: Option<u32>,
    /// Abort the rollout when more than this many participants of a wave fail; `None`: never.
    pub abort_after_failures: Option<u32>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            waves: Vec::new(),
            success_percent: 100,
            soak_secs: 0,
            approval: false,
            pause_after_failures: None,
            abort_after_failures: None,
        }
    }
}

impl Rollout {
    /// Checks the rules; the error names the field at fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.waves.is_empty() || self.waves.len() > MAX_WAVES {
            return Err(("rollout.waves", format!("give 1 to {MAX_WAVES} waves")));
        }
        let percents = self
            .waves
            .iter()
            .filter(|w| matches!(w, Wave::Percent(_)))
            .count();
        if percents != 0 && percents != self.waves.len() {
            return Err((
                "rollout.waves",
                "waves are all percentages or all agent lists and groups".into(),
            ));
        }
        let mut last = 0;
        for w in &self.waves {
            match w {
                Wave::Percent(p) => {
                    if *p == 0 || *p > 100 || *p <= last {
                        return Err((
                            "rollout.waves",
                            "percentages are cumulative: rising, within 1..=100 (e.g. 10, 50, 100)"
                                .into(),
                        ));
                    }
                    last = *p;
                }
                Wave::Agents(list) if list.is_empty() => {
                    return Err(("rollout.waves", "a wave of agents lists some".into()));
                }
                Wave::Group(name) if name.is_empty() => {
                    return Err(("rollout.waves", "a wave of a group names it".into()));
                }
                Wave::Agents(_) | Wave::Group(_) => {}
            }
        }
        if self.success_percent == 0 || self.success_percent > 100 {
            return Err(("rollout.success_percent", "must be within 1..=100".into()));
        }
        if self.soak_secs > MAX_SOAK_SECS {
            return Err((
                "rollout.soak_secs",
                format!("at most {MAX_SOAK_SECS} (7 days)"),
            ));
        }
        Ok(())
    }

    /// Splits `order` (the participants in the order of the prioritized list) into waves:
    /// returns the order with each wave's participants together (in list order within a
    /// wave) and the cumulative end of each wave in it. A percentage wave takes at least
    /// one participant more than the wave before while any are left; the last wave takes
    /// every participant left over.
    pub fn split(&self, order: Vec<AgentId>) -> (Vec<AgentId>, Vec<u32>) {
        let n = order.len() as u32;
        let waves = self.waves.len().max(1);
        if self.waves.iter().all(|w| matches!(w, Wave::Percent(_))) {
            let mut ends = Vec::with_capacity(waves);
            let mut prev = 0u32;
            for (i, w) in self.waves.iter().enumerate() {
                let Wave::Percent(p) = w else { unreachable!() };
                let mut end = (u64::from(n) * u64::from(*p)).div_ceil(100) as u32;
                if end <= prev {
                    end = (prev + 1).min(n);
                }
                if i + 1 == waves {
                    end = n;
                }
                ends.push(end);
                prev = end;
            }
            if ends.is_empty() {
                ends.push(n);
            }
            return (order, ends);
        }
        let wave_of = |id: &AgentId| {
            self.waves
                .iter()
                .position(|w| matches!(w, Wave::Agents(list) if list.contains(id)))
                .unwrap_or(waves - 1)
        };
        let mut buckets: Vec<Vec<AgentId>> = vec![Vec::new(); waves];
        for id in order {
            let w = wave_of(&id);
            buckets[w].push(id);
        }
        let mut ends = Vec::with_capacity(waves);
        let mut out = Vec::new();
        for b in buckets {
            out.extend(b);
            ends.push(out.len() as u32);
        }
        (out, ends)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn ids(n: usize) -> Vec<AgentId> {
        (0..n)
            .map(|i| AgentId::try_from(format!("a{i:02}").as_str()).unwrap())
            .collect()
    }

    #[test]
    fn percentages_split_the_list_cumulatively() {
        let r = Rollout {
            waves: vec![Wave::Percent(10), Wave::Percent(50), Wave::Percent(100)],
            ..Rollout::default()
        };
        assert_eq!(r.validate(), Ok(()));
        assert_eq!(r.split(ids(20)).1, [2, 10, 20]);
        // Every wave gets someone while participants are left; the last takes the rest.
        assert_eq!(r.split(ids(3)).1, [1, 2, 3]);
        assert_eq!(r.split(ids(1)).1, [1, 1, 1]);
        let partial = Rollout {
            waves: vec![Wave::Percent(10), Wave::Percent(50)],
            ..Rollout::default()
        };
        assert_eq!(partial.split(ids(20)).1, [2, 20]);
    }

    #[test]
    fn agent_waves_group_the_list_and_the_unlisted_go_last() {
        let all = ids(5);
        let r = Rollout {
            waves: vec![
                Wave::Agents(vec![all[3].clone()]),
                Wave::Agents(vec![all[1].clone(), all[0].clone()]),
                Wave::Agents(vec![all[4].clone()]),
            ],
            ..Rollout::default()
        };
        assert_eq!(r.validate(), Ok(()));
        let (order, ends) = r.split(all.clone());
        assert_eq!(
            order,
            [&all[3], &all[0], &all[1], &all[2], &all[4]].map(Clone::clone)
        );
        assert_eq!(ends, [1, 3, 5]);
    }

    #[test]
    fn bad_rules_are_refused_with_their_field() {
        let mut r = Rollout::default();
        assert_eq!(r.validate().unwrap_err().0, "rollout.waves");
        r.waves = vec![Wave::Percent(50), Wave::Percent(10)];
        assert_eq!(r.validate().unwrap_err().0, "rollout.waves");
        r.waves = vec![Wave::Percent(50), Wave::Agents(ids(1))];
        assert_eq!(r.validate().unwrap_err().0, "rollout.waves");
        r.waves = vec![Wave::Percent(100)];
        r.success_percent = 0;
        assert_eq!(r.validate().unwrap_err().0, "rollout.success_percent");
        r.success_percent = 90;
        r.soak_secs = MAX_SOAK_SECS + 1;
        assert_eq!(r.validate().unwrap_err().0, "rollout.soak_secs");
    }
}
