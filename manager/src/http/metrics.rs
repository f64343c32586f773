//! Prometheus `/metrics` in the text exposition format, written by hand.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `baton_connected_agents` | gauge | agents connected now |
//! | `baton_enrolled_agents` | gauge | agents enrolled |
//! | `baton_jobs{state}` | gauge | jobs per state |
//! | `baton_participant_installs{state}` | gauge | confirmed participants per install state (`pending`, `installing`, `installed`, `running`, `failed`, `rolled_back`), all jobs |
//! | `baton_served_bytes_total{source="manager"\|"relays"}` | counter | verified content bytes agents received from the manager and from relaying peers (all jobs, from the database) |
//! | `baton_agent_port_sent_bytes_total` | counter | wire bytes the agent port sent since start |
//! | `baton_agent_port_received_bytes_total` | counter | wire bytes the agent port received since start |
//! | `baton_chunk_verification_failures_total` | counter | chunks agents reported failing verification (`PeerTrouble::BadChunk`) since start |
//! | `baton_password_verifications_total` | counter | administrator password verifications (argon2) since start, for unknown names too |
//! | `baton_segment_report_refusals_total{what}` | counter | segment report checks against agent placements since start: `what="pages"` refused (leader placed in another segment), `"members"`/`"delays"` dropped (placed in another segment) |

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::http::web::Web;
use crate::registry::lock;
use crate::service::{ApiError, Manager};
use crate::store::{InstallPhase, JobState, StoreTotals};

/// Every install state, so each has a sample (0 when none).
const INSTALL_PHASES: [InstallPhase; 6] = [
    InstallPhase::Pending,
    InstallPhase::Installing,
    InstallPhase::Installed,
    InstallPhase::Running,
    InstallPhase::Failed,
    InstallPhase::RolledBack,
];

/// What one scrape reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Agents connected now.
    pub connected_agents: u64,
    /// Agents enrolled.
    pub enrolled_agents: u64,
    /// Totals read from the database.
    pub totals: StoreTotals,
    /// Agent port wire bytes sent.
    pub wire_sent: u64,
    /// Agent port wire bytes received.
    pub wire_received: u64,
    /// Serial line bytes (sent, received), COBS framing included.
    pub serial_bytes: [u64; 2],
    /// Chunk verification failures reported.
    pub chunk_failures: u64,
    /// Administrator password verifications.
    pub password_verifications: u64,
    /// Segment report pages refused, members and delays dropped (placement checks).
    pub segment_refusals: [u64; 3],
}

const JOB_STATES: [JobState; 5] = [
    JobState::Pending,
    JobState::Running,
    JobState::Finished,
    JobState::Cancelled,
    JobState::Refused,
];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders a sample in the Prometheus text format (every job state appears, zero or not).
pub fn render(s: &Sample) -> String {
    let mut out = String::with_capacity(1024);
    family(
        &mut out,
        "baton_connected_agents",
        "gauge",
        "Agents connected to the manager now.",
    );
    let _ = writeln!(out, "baton_connected_agents {}", s.connected_agents);
    family(
        &mut out,
        "baton_enrolled_agents",
        "gauge",
        "Agents enrolled at the manager.",
    );
    let _ = writeln!(out, "baton_enrolled_agents {}", s.enrolled_agents);
    family(&mut out, "baton_jobs", "gauge", "Jobs by state.");
    for state in JOB_STATES {
        let n = s
            .totals
            .jobs_by_state
            .iter()
            .filter(|(name, _)| name == state.as_str())
            .map(|(_, n)| *n)
            .sum::<u64>();
        let _ = writeln!(out, "baton_jobs{{state=\"{}\"}} {n}", state.as_str());
    }
    family(
        &mut out,
        "baton_participant_installs",
        "gauge",
        "Confirmed participants by install state, all jobs.",
    );
    for phase in INSTALL_PHASES {
        let n = s
            .totals
            .installs_by_state
            .iter()
            .filter(|(name, _)| name == phase.as_str())
            .map(|(_, n)| *n)
            .sum::<u64>();
        let _ = writeln!(
            out,
            "baton_participant_installs{{state=\"{}\"}} {n}",
            phase.as_str()
        );
    }
    family(
        &mut out,
        "baton_served_bytes_total",
        "counter",
        "Verified content bytes agents received, by who served them (the manager or relaying peers).",
    );
    let _ = writeln!(
        out,
        "baton_served_bytes_total{{source=\"manager\"}} {}",
        s.totals.bytes_from_manager
    );
    let _ = writeln!(
        out,
        "baton_served_bytes_total{{source=\"relays\"}} {}",
        s.totals.bytes_from_relays
    );
    family(
        &mut out,
        "baton_agent_port_sent_bytes_total",
        "counter",
        "Wire bytes the manager's agent port sent since start.",
    );
    let _ = writeln!(out, "baton_agent_port_sent_bytes_total {}", s.wire_sent);
    family(
        &mut out,
        "baton_agent_port_received_bytes_total",
        "counter",
        "Wire bytes the manager's agent port received since start.",
    );
    let _ = writeln!(
        out,
        "baton_agent_port_received_bytes_total {}",
        s.wire_received
    );
    family(
        &mut out,
        "baton_serial_line_bytes_total",
        "counter",
        "Bytes on the serial lines since start, COBS framing included.",
    );
    for (direction, n) in ["sent", "received"].iter().zip(s.serial_bytes) {
        let _ = writeln!(
            out,
            "baton_serial_line_bytes_total{{direction=\"{direction}\"}} {n}"
        );
    }
    family(
        &mut out,
        "baton_chunk_verification_failures_total",
        "counter",
        "Chunks that agents reported failing verification since start.",
    );
    let _ = writeln!(
        out,
        "baton_chunk_verification_failures_total {}",
        s.chunk_failures
    );
    family(
        &mut out,
        "baton_password_verifications_total",
        "counter",
        "Administrator password verifications (argon2) since start.",
    );
    let _ = writeln!(
        out,
        "baton_password_verifications_total {}",
        s.password_verifications
    );
    family(
        &mut out,
        "baton_segment_report_refusals_total",
        "counter",
        "Segment report pages refused (leader placed elsewhere) and members and delays dropped (placed elsewhere) since start.",
    );
    for (what, n) in ["pages", "members", "delays"]
        .iter()
        .zip(s.segment_refusals)
    {
        let _ = writeln!(
            out,
            "baton_segment_report_refusals_total{{what=\"{what}\"}} {n}"
        );
    }
    out
}

/// `GET /metrics`.
pub async fn metrics(
    State(m): State<Arc<Manager>>,
    Extension(web): Extension<Arc<Web>>,
) -> Result<impl IntoResponse, ApiError> {
    let (totals, enrolled) = {
        let store = lock(&m.store);
        let totals = store
            .totals()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        (totals, store.agents()?.len() as u64)
    };
    let sample = Sample {
        connected_agents: m.registry.connected().len() as u64,
        enrolled_agents: enrolled,
        totals,
        wire_sent: m.bytes_sent(),
        wire_received: m.bytes_received(),
        serial_bytes: [
            crate::serial::LINE_BYTES.sent.load(Ordering::Relaxed),
            crate::serial::LINE_BYTES.received.load(Ordering::Relaxed),
        ],
        chunk_failures: m.stats.chunk_verification_failures.load(Ordering::Relaxed),
        password_verifications: web.password_verifications.load(Ordering::Relaxed),
        segment_refusals: {
            let c = &m.registry.segment_checks;
            [
                c.pages_refused.load(Ordering::Relaxed),
                c.members_dropped.load(Ordering::Relaxed),
                c.delays_dropped.load(Ordering::Relaxed),
            ]
        },
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&sample),
    ))
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn text_format() {
        let text = render(&Sample {
            connected_agents: 3,
            enrolled_agents: 4,
            totals: StoreTotals {
                jobs_by_state: vec![("finished".into(), 2), ("running".into(), 1)],
                bytes_from_manager: 100,
                bytes_from_relays: 250,
                installs_by_state: vec![("running".into(), 5), ("rolled_back".into(), 1)],
            },
            wire_sent: 7,
            wire_received: 8,
            serial_bytes: [5, 6],
            chunk_failures: 1,
            password_verifications: 9,
            segment_refusals: [2, 3, 4],
        });
        for line in [
            "baton_connected_agents 3",
            "baton_jobs{state=\"finished\"} 2",
            "baton_jobs{state=\"running\"} 1",
            "baton_jobs{state=\"pending\"} 0",
            "baton_participant_installs{state=\"running\"} 5",
            "baton_participant_installs{state=\"rolled_back\"} 1",
            "baton_participant_installs{state=\"failed\"} 0",
            "baton_served_bytes_total{source=\"manager\"} 100",
            "baton_served_bytes_total{source=\"relays\"} 250",
            "baton_chunk_verification_failures_total 1",
            "baton_serial_line_bytes_total{direction=\"sent\"} 5",
            "baton_serial_line_bytes_total{direction=\"received\"} 6",
            "baton_segment_report_refusals_total{what=\"pages\"} 2",
            "baton_segment_report_refusals_total{what=\"delays\"} 4",
            "# TYPE baton_served_bytes_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Every sample line is `name{labels} value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').unwrap();
            value.parse::<u64>().unwrap();
        }
    }
}
