//! What the driver drains: records to persist, messages to send, events, timers and status.
//!
//! Messages are queued as small [`Out`] entries and built only when polled
//! ([`Engine::poll_transmit`]), from the state at that moment, so a large plan
//! never sits in memory as messages and a participant that left meanwhile is
//! skipped. Source lists longer than one message allows are split into a `Fetch`
//! and `Sources` messages.

use core::time::Duration;
use std::collections::HashMap;

use baton_protocol::message::{
    InstallState, MAX_SOURCES_PER_MESSAGE, Message, Source, SourceRange,
};
use baton_protocol::types::{AgentId, JobRef, Name};
use serde::Serialize;

use super::{Agent, Ctx, Engine, Job, JobOutcome, Out, ParticipantState};
use crate::planner::Holder;

/// A record the driver writes to the store, in order, before sending anything from
/// [`Engine::poll_transmit`].
#[derive(Clone, Debug, PartialEq)]
pub enum Persist {
    /// The job's plan starts (or, after [`Engine::resume_job`], restarts) under `epoch`;
    /// `order` is the prioritized list. The store upserts: a resumed job is emitted again.
    JobStarted {
        /// The job.
        job: u64,
        /// The engine's epoch.
        epoch: u32,
        /// The participants, in the order of the prioritized list.
        order: Vec<AgentId>,
    },
    /// A participant's state (upsert); `source_note` summarises its sources when it is instructed.
    Participant {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// Its state.
        state: ParticipantState,
        /// Human-readable summary of its current sources, if it was just (re)instructed.
        source_note: Option<String>,
    },
    /// Verified chunk counts, batched (at most one record per
    /// [`EngineConfig::progress_flush`](super::EngineConfig::progress_flush)).
    Progress {
        /// The job.
        job: u64,
        /// `(participant, chunks verified)` for those that progressed.
        updates: Vec<(AgentId, u32)>,
    },
    /// Bytes of verified chunks `agent` received from `from` since the previous record (a delta).
    SourceBytes {
        /// The job.
        job: u64,
        /// The receiver.
        agent: AgentId,
        /// The source; `None` = the manager.
        from: Option<AgentId>,
        /// Bytes received.
        bytes: u64,
    },
    /// The job ended (finished or cancelled).
    JobFinished {
        /// The job.
        job: u64,
        /// Participants that confirmed.
        confirmed: u32,
        /// Participants that failed or were given up.
        failed: u32,
    },
    /// A confirmed participant's install step (upsert onto its participant record):
    /// `state: None` while it waits for its agent's report, else the state with the deciding
    /// command's exit code and output tail (see the `install` module).
    Install {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// The state; `None`: waiting for the agent's report.
        state: Option<InstallState>,
        /// The deciding command's exit code.
        exit_code: Option<i32>,
        /// The end of its output, or the manager's note (deadline passed).
        output: String,
    },
    /// Where the job's staged rollout stands (upsert onto the job; an aborted rollout also
    /// marks the job cancelled).
    Rollout {
        /// The job.
        job: u64,
        /// The rollout's state.
        state: super::RolloutState,
    },
    /// The versions running on `agent`, per content name: with `whole`, the agent's whole
    /// set (its earlier rows are replaced, so it keeps at most `MAX_RUNNING`); else an
    /// upsert per name (the newest `MAX_RUNNING` rows of the agent are kept).
    Running {
        /// The agent.
        agent: AgentId,
        /// `(content name, version)`.
        versions: Vec<(String, u64)>,
        /// The agent's whole set (a `Running` message), not one install's outcome.
        whole: bool,
    },
    /// The upload rates (bytes/s) the job's plan was last adapted to, as measured from what
    /// each participant delivered (upsert per participant; given back to
    /// [`Engine::resume_job`] after a restart so the plan does not start blind again).
    MeasuredUpload {
        /// The job.
        job: u64,
        /// `(participant, upload in bytes/s)`.
        rates: Vec<(AgentId, u64)>,
    },
}

/// A notification for the UI and the logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum EngineEvent {
    /// A participant progressed (batched like [`Persist::Progress`]).
    Progress {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// Chunks verified.
        verified: u32,
        /// Chunks in the content.
        total: u32,
    },
    /// A participant confirmed it holds the content.
    Confirmed {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
    },
    /// A participant failed or was given up.
    ParticipantFailed {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// Why, for people.
        reason: String,
    },
    /// The job ended (finished or cancelled).
    JobFinished {
        /// The job.
        job: u64,
        /// Participants that confirmed.
        confirmed: u32,
        /// Participants that failed or were given up.
        failed: u32,
    },
    /// A confirmed participant's install step moved (content-only participants: `Running`
    /// at once).
    Install {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// The new state.
        state: InstallState,
        /// The deciding command's exit code, if one ran to its end.
        exit_code: Option<i32>,
    },
    /// The job's staged rollout moved: paused, resumed, a wave succeeded, opened, waits for
    /// approval, or the rollout was aborted.
    Rollout {
        /// The job.
        job: u64,
        /// Where it stands now.
        state: super::RolloutState,
        /// What happened, for people.
        text: String,
    },
    /// A rule of the job's policy cannot be met as asked; `text` says which and what happens
    /// instead (for the job's stored warnings, the UI and the logs). Each text once per job.
    PolicyWarning {
        /// The job.
        job: u64,
        /// What cannot be met, for people.
        text: String,
    },
    /// A participant's `PeerTrouble` reports were found unreliable (contradicted by what
    /// others verified, or naming too many peers): they no longer count and it no longer
    /// relays in this job.
    ReporterDemoted {
        /// The job.
        job: u64,
        /// The demoted participant.
        agent: AgentId,
        /// Why, for people.
        reason: String,
    },
}

/// One participant in a [`JobStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParticipantStatus {
    /// The participant.
    pub agent: AgentId,
    /// Its state (with chunks verified while fetching).
    pub state: ParticipantState,
    /// Once confirmed: its install step (`None`: not confirmed, or waiting for the report).
    pub install: Option<InstallState>,
    /// Whether it is connected.
    pub online: bool,
    /// Its current distinct sources (`None` = the manager); empty when not fetching.
    pub sources: Vec<Option<AgentId>>,
    /// Its `PeerTrouble` reports that named a peer it was not assigned to (ignored).
    pub unfounded_reports: u32,
    /// Its trouble reports were found unreliable: they no longer count and it no longer relays.
    pub demoted: bool,
}

/// A snapshot of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus {
    /// The job.
    pub job: u64,
    /// The epoch it runs under.
    pub epoch: u32,
    /// Chunks in the content.
    pub chunks: u32,
    /// Running, finished or cancelled.
    pub outcome: JobOutcome,
    /// Participants that confirmed.
    pub confirmed: u32,
    /// Participants that failed or were given up.
    pub failed: u32,
    /// Every participant, in the order of the prioritized list (late joiners last).
    pub participants: Vec<ParticipantStatus>,
    /// Policy rules that cannot be met (see [`EngineEvent::PolicyWarning`]).
    pub warnings: Vec<String>,
    /// While the job waits for its policy's time window: when it opens (engine time).
    pub opens_at: Option<Duration>,
    /// While its policy's windows are open: when they close (engine time).
    pub closes_at: Option<Duration>,
    /// Where content enters each segment, best segment first (the list of segment leaders
    /// and entry nodes the plan was built from; empty for a plan without segments).
    pub segments: Vec<SegmentStatus>,
    /// Its staged rollout, if it has one.
    pub rollout: Option<super::RolloutState>,
}

/// Where content enters one segment in a job's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentStatus {
    /// The segment's name.
    pub segment: Name,
    /// The participants that fetch from outside the segment, best first (its leader first
    /// if it may serve).
    pub entries: Vec<AgentId>,
    /// Participants of the segment fetching when the plan was built.
    pub fetchers: u32,
    /// Of them, those allowed to relay.
    pub servers: u32,
}

impl Engine {
    /// The next record to persist, in order; drain until `None` before transmitting.
    pub fn poll_persist(&mut self) -> Option<Persist> {
        self.out.persist.pop_front()
    }

    /// The next message to send and to whom; `None` when there is nothing (or while records
    /// are still waiting in [`poll_persist`](Self::poll_persist)).
    pub fn poll_transmit(&mut self) -> Option<(AgentId, Message<'static>)> {
        if !self.out.persist.is_empty() {
            return None;
        }
        for job in self.jobs.values_mut() {
            job.settle_throttles(&mut self.out);
        }
        loop {
            if let Some(m) = self.out.staged.pop_front() {
                return Some(m);
            }
            let out = self.out.transmit.pop_front()?;
            self.materialize(out);
        }
    }

    /// The next notification for the UI and logs.
    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.out.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called: the earliest
    /// give-up deadline, progress flush or opening of a job's time window.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let deadline = self.out.deadlines.first().map(|d| d.0);
        let flush = self
            .jobs
            .values()
            .flat_map(|j| {
                let rates = j
                    .rates
                    .window_end()
                    .filter(|_| j.outcome == JobOutcome::Running);
                [
                    j.flush_at,
                    j.opens_at,
                    j.closes_at.filter(|_| j.outcome == JobOutcome::Running),
                    j.regroup_until,
                    rates,
                    j.rollout_timeout(),
                ]
            })
            .flatten()
            .min();
        match (deadline, flush) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A snapshot of `job`: every participant's state and sources, and the totals.
    pub fn job_status(&self, job: u64) -> Option<JobStatus> {
        let j = self.jobs.get(&job)?;
        Some(JobStatus {
            job,
            epoch: self.epoch,
            chunks: j.chunks,
            outcome: j.outcome,
            confirmed: j.confirmed,
            failed: j.failed,
            participants: j
                .parts
                .iter()
                .enumerate()
                .map(|(idx, p)| ParticipantStatus {
                    agent: p.id.clone(),
                    state: p.state,
                    install: p.install,
                    online: p.online,
                    sources: j.distinct_sources(idx as u32),
                    unfounded_reports: p.standing.unfounded,
                    demoted: p.standing.demoted,
                })
                .collect(),
            warnings: j.warnings.clone(),
            opens_at: j.opens_at,
            closes_at: j.closes_at,
            rollout: j.staging.as_ref().map(|st| st.state.clone()),
            segments: j
                .plan
                .as_ref()
                .map(|plan| {
                    plan.segment_entries()
                        .iter()
                        .map(|e| SegmentStatus {
                            segment: j.segments.name(e.segment).cloned().unwrap_or_default(),
                            entries: e
                                .entries
                                .iter()
                                .map(|&i| j.parts[i as usize].id.clone())
                                .collect(),
                            fetchers: e.fetchers,
                            servers: e.servers,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The root of `job`'s content, if the engine knows the job.
    pub fn job_root(&self, job: u64) -> Option<baton_protocol::types::Digest> {
        self.jobs.get(&job).map(|j| j.spec.manifest.root)
    }

    /// Whether `agent` is instructed to fetch the content `root` in a running job other
    /// than `except`: then its chunk answers must keep flowing when `except` stops.
    pub fn fetches_root_elsewhere(
        &self,
        agent: &AgentId,
        root: &baton_protocol::types::Digest,
        except: u64,
    ) -> bool {
        self.jobs.iter().any(|(&id, j)| {
            id != except
                && j.outcome == JobOutcome::Running
                && j.spec.manifest.root == *root
                && j.index.get(agent).is_some_and(|&i| {
                    let p = &j.parts[i as usize];
                    p.instructed && !p.state.is_terminal()
                })
        })
    }

    /// Ids of the jobs the engine knows (running or ended and not forgotten).
    pub fn jobs(&self) -> impl Iterator<Item = u64> + '_ {
        self.jobs.keys().copied()
    }

    /// Turns a queued output into messages in `staged`, from the current state.
    fn materialize(&mut self, out: Out) {
        let epoch = self.epoch;
        match out {
            Out::Fetch { job: job_id, part } | Out::Sources { job: job_id, part } => {
                let Some(job) = self.jobs.get_mut(&job_id) else {
                    return;
                };
                let p = &mut job.parts[part as usize];
                let is_fetch = matches!(out, Out::Fetch { .. });
                if !is_fetch {
                    p.sources_queued = false;
                }
                if job.outcome != JobOutcome::Running
                    || !p.online
                    || !p.instructed
                    || p.state.is_terminal()
                {
                    return;
                }
                let to = p.id.clone();
                let ranges = job.source_ranges(&self.agents, part);
                // What it is told is what its `PeerTrouble` reports may name.
                let told: Vec<(u32, u32, u32)> = ranges
                    .iter()
                    .filter_map(|r| match &r.source {
                        Source::Peer { id, .. } => Some((*job.index.get(id)?, r.first, r.end)),
                        Source::Manager => None,
                    })
                    .collect();
                job.parts[part as usize].standing.told(told);
                let jr = JobRef { id: job_id, epoch };
                let mut rest = ranges.as_slice();
                if is_fetch {
                    let n = rest.len().min(MAX_SOURCES_PER_MESSAGE);
                    self.out.staged.push_back((
                        to.clone(),
                        Message::Fetch {
                            job: jr,
                            manifest: job.spec.manifest.clone(),
                            sources: to_bounded(&rest[..n]),
                            next: job.parts.get(part as usize + 1).map(|n| n.id.clone()),
                        },
                    ));
                    rest = &rest[n..];
                }
                for chunk in rest.chunks(MAX_SOURCES_PER_MESSAGE) {
                    self.out.staged.push_back((
                        to.clone(),
                        Message::Sources {
                            job: jr,
                            sources: to_bounded(chunk),
                        },
                    ));
                }
            }
            Out::Throttle { job: job_id, part } => {
                let Some(job) = self.jobs.get(&job_id) else {
                    return;
                };
                let p = &job.parts[part as usize];
                if job.outcome != JobOutcome::Running
                    || !p.online
                    || !p.instructed
                    || p.state.is_terminal()
                {
                    return;
                }
                self.out.staged.push_back((
                    p.id.clone(),
                    Message::Throttle {
                        job: JobRef { id: job_id, epoch },
                        max_bytes_per_second: p.throttle,
                    },
                ));
            }
            Out::Reset { job: job_id, part } => {
                let Some(job) = self.jobs.get(&job_id) else {
                    return;
                };
                let p = &job.parts[part as usize];
                if job.outcome == JobOutcome::Running && p.online {
                    let jr = JobRef { id: job_id, epoch };
                    self.out
                        .staged
                        .push_back((p.id.clone(), Message::Cancel { job: jr }));
                }
            }
            Out::Pause { job: job_id, part } => {
                let Some(job) = self.jobs.get(&job_id) else {
                    return;
                };
                let p = &job.parts[part as usize];
                if job.outcome != JobOutcome::Running || !p.online || p.instructed {
                    return;
                }
                let jr = JobRef { id: job_id, epoch };
                self.out
                    .staged
                    .push_back((p.id.clone(), Message::Cancel { job: jr }));
            }
            Out::End { job: job_id, part } => {
                let Some(job) = self.jobs.get(&job_id) else {
                    return;
                };
                let p = &job.parts[part as usize];
                if !p.online {
                    return;
                }
                let jr = JobRef { id: job_id, epoch };
                let msg = match job.outcome {
                    JobOutcome::Cancelled => Message::Cancel { job: jr },
                    _ => Message::Done { job: jr },
                };
                self.out.staged.push_back((p.id.clone(), msg));
            }
        }
    }
}

/// Copies at most [`MAX_SOURCES_PER_MESSAGE`] ranges into a message's bounded list.
fn to_bounded<B: FromIterator<SourceRange>>(ranges: &[SourceRange]) -> B {
    ranges
        .iter()
        .take(MAX_SOURCES_PER_MESSAGE)
        .cloned()
        .collect()
}

impl Job {
    /// The participant's current sources as wire ranges.
    fn source_ranges(&self, agents: &HashMap<AgentId, Agent>, idx: u32) -> Vec<SourceRange> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let mut out: Vec<SourceRange> = Vec::new();
        for a in plan.sources(idx) {
            let source = match a.holder {
                Holder::Manager => Source::Manager,
                Holder::Peer(q) => {
                    let id = &self.parts[q as usize].id;
                    match agents
                        .get(id)
                        .and_then(|ag| ag.profile.listen.map(|l| (l, ag.key)))
                    {
                        Some((addr, key)) => Source::Peer {
                            id: id.clone(),
                            addr,
                            key,
                        },
                        None => Source::Manager,
                    }
                }
            };
            match out.last_mut() {
                Some(last) if last.source == source && last.end == a.first => last.end = a.end,
                _ => out.push(SourceRange {
                    source,
                    first: a.first,
                    end: a.end,
                }),
            }
        }
        out
    }

    /// Distinct sources of a participant (`None` = manager), for status and notes.
    fn distinct_sources(&self, idx: u32) -> Vec<Option<AgentId>> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let mut out: Vec<Option<AgentId>> = Vec::new();
        for a in plan.sources(idx) {
            let s = match a.holder {
                Holder::Manager => None,
                Holder::Peer(q) => Some(self.parts[q as usize].id.clone()),
            };
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// A short human-readable summary of a participant's sources.
    fn source_note(&self, idx: u32) -> String {
        let Some(plan) = &self.plan else {
            return String::new();
        };
        let sources = plan.sources(idx);
        let mut note = String::new();
        for (n, a) in sources.iter().enumerate() {
            if n == 6 {
                note.push_str(&format!(", +{} more", sources.len() - n));
                break;
            }
            if n > 0 {
                note.push_str(", ");
            }
            match a.holder {
                Holder::Manager => note.push_str("manager"),
                Holder::Peer(q) => note.push_str(&self.parts[q as usize].id),
            }
            note.push_str(&format!(" {}..{}", a.first, a.end));
        }
        note
    }

    pub(super) fn persist_part(&self, cx: &mut Ctx<'_>, job_id: u64, idx: u32, with_note: bool) {
        let p = &self.parts[idx as usize];
        cx.out.persist.push_back(Persist::Participant {
            job: job_id,
            agent: p.id.clone(),
            state: p.state,
            source_note: with_note.then(|| self.source_note(idx)),
        });
    }
}
