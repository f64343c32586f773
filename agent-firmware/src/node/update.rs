//! The A/B build's firmware updates, on the node (feature `ab`).
//!
//! - **Report**: every manager session's first `Report` is followed by `Running`
//!   (`install_step`, and the running image's version under the content name `firmware`),
//!   so the manager waits for an `InstallStatus` after each `Have`.
//! - **Refuse**: a firmware install is refused (`failed`, DFU untouched) while another waits
//!   for its reset or its confirmation (`busy`), below the version that runs (`downgrade`;
//!   agent-core's version record is not seeded from the image and can be erased), or at or
//!   below a version that was rolled back (`rolled back before`: the install record names a
//!   version other than the one that runs, and only an install of a higher version replaces
//!   it). The version that runs is reported `running` at once, without a swap.
//! - **Install**: content named `firmware` that completed (every chunk verified against the
//!   signed manifest's Merkle root on arrival) is copied chunk by chunk into DFU (erased
//!   whole first: the swap moves all of it into the executable ACTIVE); each chunk
//!   is read back *from DFU* and its leaf hash checked against the manifest's root with the
//!   stored proof, and the image must carry this board's vector table and a header of the
//!   manifest's version. Only then is the install recorded (job, version), the swap
//!   requested (embassy-boot `mark_updated`), `InstallStatus installed` sent, and the board
//!   reset half a second later. Other content has no install step: `running` at once.
//! - **Confirm**: a trial boot (the bootloader swapped the update in) marks itself booted
//!   only once the manager welcomed it — the answer to its `Report`, so the new image holds
//!   a session; `Running` went out after the `Report`, but the welcome does not prove it
//!   arrived — then reports the recorded job `running`. A boot after the bootloader
//!   reverted an update reports that job `rolled back`. That report goes out again at every
//!   welcome until the next install. An image that never gets there is reverted at the next
//!   reset: it panics or faults (both reset the board), hangs (the watchdog resets it), or
//!   finds no manager for [`TRIAL_DEADLINE`] (it resets itself).

use baton_agent_core::agent::ConnId;
use baton_protocol::message::{InstallState, Message, RunningVersion};
use baton_protocol::{Digest, JobRef, merkle};
use embassy_time::{Duration, Instant};
use embedded_storage::nor_flash::{NorFlash as _, ReadNorFlash as _};

use super::{H, Node};
use crate::board::ab::{self, Boot, FIRMWARE_NAME, PendingInstall};
use baton_agent_core::store::ContentStore as _;

/// How long a trial boot may take to be welcomed by the manager before it gives up (reset,
/// so the bootloader reverts it).
const TRIAL_DEADLINE: Duration = Duration::from_secs(60);
/// From the install report to the reset (the report and the `Have` reach the manager).
const RESET_DELAY: Duration = Duration::from_millis(500);

impl Node {
    /// Once per loop: feed the watchdog, end a trial that found no manager, reset for a swap.
    pub(super) fn ab_tick(&mut self) {
        ab::watchdog_feed();
        let now = Instant::now();
        let trial_over = self.ab.boot == Boot::Trial && now.as_ticks() > TRIAL_DEADLINE.as_ticks();
        if trial_over || self.ab.reset_at.is_some_and(|t| now >= t) {
            defmt::warn!("resetting for the bootloader (trial over: {})", trial_over);
            cortex_m::peripheral::SCB::sys_reset();
        }
    }

    /// Sends `Running`: this agent installs, and the image version that runs.
    pub(super) fn send_running(&mut self) {
        let mut versions = heapless::Vec::new();
        let _ = versions.push(RunningVersion {
            name: heapless::String::try_from(FIRMWARE_NAME).unwrap_or_default(),
            version: u64::from(ab::version()),
        });
        self.send(&Message::Running {
            install_step: true,
            versions,
        });
    }

    /// Encodes `msg` into the frame buffer and seals it for the manager.
    fn send(&mut self, msg: &Message<'_>) {
        let cap = self.buf.len() - baton_protocol::session::TAG_LEN;
        if let Ok(b) = msg.encode(&mut self.buf[H..cap]) {
            let n = b.len();
            self.seal(ConnId::MANAGER, n);
        }
    }

    /// Sends the install state of `job`'s content `name` v`version`.
    fn send_status(&mut self, job: JobRef, name: &str, version: u64, state: InstallState) {
        defmt::info!(
            "install of {=str} v{} (job {}): {}",
            name,
            version,
            job.id,
            state
        );
        self.send(&Message::InstallStatus {
            job,
            name: heapless::String::try_from(name).unwrap_or_default(),
            version,
            state,
            exit_code: None,
            output: "",
        });
    }

    /// Welcomed: confirm a trial boot, and report how the recorded install ended.
    #[inline(never)]
    pub(super) fn ab_welcomed(&mut self) {
        let running = ab::version();
        if self.ab.boot == Boot::Trial {
            if ab::flags() & ab::FLAG_NEVER_CONFIRM != 0 {
                defmt::warn!(
                    "test image v{}: never confirming (hangs until the watchdog resets the board)",
                    running
                );
                cortex_m::interrupt::disable();
                loop {
                    core::hint::spin_loop();
                }
            }
            if !ab::mark_booted() {
                defmt::error!("marking image v{} booted failed", running);
                return;
            }
            defmt::info!("image v{} confirmed: marked booted", running);
        } else if self.ab.boot == Boot::RolledBack {
            defmt::warn!("rolled back: image v{} runs again", running);
            ab::mark_booted();
        }
        self.ab.boot = Boot::Normal;
        // Sent at every welcome (a report lost with its session goes out again; the manager
        // takes a repeated state as nothing new), until the next install replaces the record.
        if let Some(p) = ab::pending() {
            let state = if p.version == running {
                InstallState::Running
            } else {
                InstallState::RolledBack
            };
            self.send_status(p.job, FIRMWARE_NAME, u64::from(p.version), state);
        }
    }

    /// A job's content is complete: install a firmware image (see the module docs); other
    /// content runs as delivered.
    #[inline(never)]
    pub(super) fn ab_install(&mut self, job: JobRef, root: &Digest) {
        let Some((name, version, chunks, chunk_size, length)) =
            self.agent.store().manifest(root).map(|m| {
                (
                    m.name.clone(),
                    m.version,
                    m.chunks(),
                    m.chunk_size as usize,
                    m.length as usize,
                )
            })
        else {
            return;
        };
        if name.as_str() != FIRMWARE_NAME {
            self.send_status(job, name.as_str(), version, InstallState::Running);
            return;
        }
        // Never older than what runs (agent-core's version record may have been erased, and
        // is not seeded from the running image); the version that runs is already installed.
        let running = u64::from(ab::version());
        let refusal = if self.ab.reset_at.is_some() || self.ab.boot == Boot::Trial {
            // DFU holds the update waiting for its reset, or the image a revert restores.
            defmt::intern!("busy")
        } else if version < running {
            defmt::intern!("downgrade")
        } else if version == running {
            self.send_status(job, FIRMWARE_NAME, version, InstallState::Running);
            return;
        } else if ab::pending().is_some_and(|p| {
            // A record of another version than the one that runs: that version was rolled
            // back. It stays the floor until the next install (always of a higher version)
            // replaces the record, so no version that was ever rolled back comes back.
            let v = u64::from(p.version);
            v != running && version <= v
        }) {
            defmt::intern!("rolled back before")
        } else if self.copy_to_dfu(root, chunks, chunk_size, length)
            && ab::dfu_image_ok(version)
            && ab::set_pending(PendingInstall {
                job,
                version: version as u32,
            })
            && ab::mark_updated()
        {
            defmt::info!("image v{} in DFU, verified, marked for update", version);
            self.ab.reset_at = Some(Instant::now() + RESET_DELAY);
            self.send_status(job, FIRMWARE_NAME, version, InstallState::Installed);
            return;
        } else {
            defmt::intern!("not installed")
        };
        defmt::error!("image v{} refused: {=istr}", version, refusal);
        self.send_status(job, FIRMWARE_NAME, version, InstallState::Failed);
    }

    /// Copies the content into DFU, each chunk checked again as read back from DFU.
    fn copy_to_dfu(
        &mut self,
        root: &Digest,
        chunks: u32,
        chunk_size: usize,
        length: usize,
    ) -> bool {
        let mut dfu = ab::dfu();
        // All of it, not only the image's pages: the swap moves DFU's first ACTIVE_SIZE bytes
        // into ACTIVE, which is executable.
        let size = crate::board::psram::ACTIVE_SIZE;
        if length > size || dfu.erase(0, size as u32).is_err() {
            return false;
        }
        let mut proof = merkle::Proof::new();
        for i in 0..chunks {
            ab::watchdog_feed();
            let Ok(n) = self
                .agent
                .store_mut()
                .read_chunk(root, i, &mut self.buf[..], &mut proof)
            else {
                return false;
            };
            // NOR writes whole words: pad the last chunk with erased bytes.
            let padded = n.next_multiple_of(4);
            self.buf[n..padded].fill(0xFF);
            let at = (i as usize * chunk_size) as u32;
            if dfu.write(at, &self.buf[..padded]).is_err()
                || dfu.read(at, &mut self.buf[..n]).is_err()
                || merkle::verify_leaf(root, chunks, i, &merkle::leaf_hash(&self.buf[..n]), &proof)
                    .is_err()
            {
                return false;
            }
        }
        true
    }
}
