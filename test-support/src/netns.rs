//! Network namespaces for tests, named and removed the way the product's lab does it.
//!
//! The lab ([`baton::lab::netns`]) names every namespace `btl-<pid>-…` after the process
//! that created it, and removes those whose process no longer exists. A test's own
//! namespace ([`Namespace`]) follows the same scheme, `btl-<pid>-<tag><n>` (the lab's own
//! names continue with a digit, so the two never collide), so [`remove_stale`] and the
//! lab's clean-up each remove what killed runs of either left behind.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use baton::lab::netns;

static NAMESPACES: AtomicU32 = AtomicU32::new(0);

/// A name no other namespace of this process has: `btl-<pid>-<tag><n>` (`tag` starts with a letter).
pub fn unique_name(tag: &str) -> String {
    assert!(
        tag.starts_with(|c: char| c.is_ascii_alphabetic()),
        "a namespace tag starts with a letter (the lab's names continue with a digit)"
    );
    format!(
        "{}{}-{tag}{}",
        netns::PREFIX,
        std::process::id(),
        NAMESPACES.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace a test owns: created with its loopback up, deleted (with what runs
/// and every tap in it) when dropped.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Removes stale namespaces, then creates `btl-<pid>-<tag><n>`; panics if that fails.
    pub fn create(tag: &str) -> Namespace {
        remove_stale();
        let name = unique_name(tag);
        netns::add(&name).unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        Namespace { name }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args…`, panicking with its stderr on failure.
    pub fn ip(&self, args: &[&str]) {
        netns::ip(&self.name, args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `f` on a thread that joined the namespace's network (`setns`) and returns
    /// its result: sockets `f` opens live in the namespace, the rest of the process does not.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsFd as _;
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("join the network namespace {path}: {e}"));
                f()
            })
            .join()
            .expect("the thread inside the namespace panicked")
        })
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Deletes namespace `ns`: its taps first (persistent devices, deleted explicitly rather
/// than left to the namespace's teardown), then what runs in it and the namespace itself.
pub fn delete(ns: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "type", "tun"])
        .stderr(Stdio::null())
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split(':').nth(1) {
                let name = name.trim().split('@').next().unwrap_or("");
                let _ = Command::new("ip")
                    .args(["-n", ns, "link", "del", name])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    netns::delete(ns);
}

/// Deletes every `btl-` namespace whose creating process no longer exists: the lab's and
/// the tests' alike.
pub fn remove_stale() {
    for name in netns::leftovers() {
        delete(&name);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn names_follow_the_lab_scheme() {
        let a = unique_name("hil");
        let b = unique_name("hil");
        assert_ne!(a, b);
        assert!(
            a.starts_with(&format!("btl-{}-hil", std::process::id())),
            "{a}"
        );
        assert_eq!(netns::owner_pid(&a), Some(std::process::id()));
    }

    #[test]
    fn a_namespace_is_deleted_with_its_taps_and_stale_ones_are_removed() {
        assert!(
            baton::lab::require_root().is_ok(),
            "this test creates network namespaces and must run as root"
        );
        // Left by a killed run (a pid above pid_max), with a persistent tap in it.
        let stale = format!("{}99999998-t0", netns::PREFIX);
        netns::add(&stale).unwrap();
        netns::ip(&stale, &["tuntap", "add", "dev", "tap1", "mode", "tap"]).unwrap();
        let ns = Namespace::create("t");
        assert!(!netns::lab_namespaces().contains(&stale), "stale one left");
        ns.ip(&["tuntap", "add", "dev", "tap1", "mode", "tap"]);
        let name = ns.name().to_string();
        assert!(netns::lab_namespaces().contains(&name));
        drop(ns);
        assert!(!netns::lab_namespaces().contains(&name), "{name} survived");
    }
}
