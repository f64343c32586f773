//! Network namespaces through the `ip` and `tc` commands, and entering one from a thread.
//!
//! Every namespace the lab creates is named `btl-<pid>-<lab>-<role>`, so a
//! later run can tell which namespaces belong to a process that no longer
//! exists ([`remove_leftovers`]) and delete them.

use std::os::fd::AsFd as _;
use std::path::Path;
use std::process::{Command, Stdio};

use super::LabError;

/// The prefix of every namespace name the lab creates.
pub const PREFIX: &str = "btl-";

/// Runs a setup command; its failure (with stderr) is an error.
pub fn run(cmd: &mut Command) -> Result<String, LabError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Spawn(format!("{cmd:?}"), e))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n <ns> args…`.
pub fn ip(ns: &str, args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Runs `tc -n <ns> args…`.
pub fn tc(ns: &str, args: &[&str]) -> Result<String, LabError> {
    run(Command::new("tc").arg("-n").arg(ns).args(args))
}

/// Runs `ip netns exec <ns> program args…` to completion.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args))
}

/// Sets a sysctl inside a namespace.
pub fn sysctl(ns: &str, key_value: &str) -> Result<(), LabError> {
    exec(ns, "sysctl", &["-q", "-w", key_value]).map(drop)
}

/// Creates namespace `ns` with its loopback up.
pub fn add(ns: &str) -> Result<(), LabError> {
    run(Command::new("ip").args(["netns", "add", ns]))?;
    ip(ns, &["link", "set", "lo", "up"])?;
    // No IPv6 chatter (router solicitations, MLD) on the lab's links and counters.
    let _ = sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1");
    let _ = sysctl(ns, "net.ipv6.conf.default.disable_ipv6=1");
    Ok(())
}

/// Kills every process still inside `ns` and deletes it (with every link in it).
pub fn delete(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        let own = std::process::id().to_string();
        // A thread of this process may have entered the namespace (to reach a server in it).
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|pid| *pid != own)
        {
            let _ = Command::new("kill")
                .args(["-s", "KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The lab namespaces that exist now (names starting with [`PREFIX`]).
pub fn lab_namespaces() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_string)
        .collect()
}

/// The pid a lab namespace name was made by, if it is one of ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// The lab namespaces whose creating process no longer exists (left by a run that was killed).
pub fn leftovers() -> Vec<String> {
    lab_namespaces()
        .into_iter()
        .filter(|name| {
            owner_pid(name).is_some_and(|pid| {
                pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
            })
        })
        .collect()
}

/// Deletes lab namespaces whose creating process no longer exists (a run that was killed).
/// Returns how many were removed.
pub fn remove_leftovers() -> usize {
    let names = leftovers();
    for name in &names {
        tracing::info!(namespace = %name, "removing a namespace left by an earlier run");
        delete(name);
    }
    names.len()
}

/// Moves the calling thread into namespace `ns`: sockets it opens from now on live there.
/// Only this thread changes; the rest of the process stays where it was.
pub fn enter(ns: &str) -> Result<(), LabError> {
    let path = Path::new("/var/run/netns").join(ns);
    let file =
        std::fs::File::open(&path).map_err(|e| LabError::Io(path.display().to_string(), e))?;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| LabError::Io(format!("setns into {ns}"), e.into()))
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result.
pub fn within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, LabError> + Send + 'static,
) -> Result<T, LabError> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
    .join()
    .map_err(|_| LabError::Io("namespace thread".into(), std::io::Error::other("panicked")))?
}

/// A transmit counter (`/sys/class/net/<dev>/statistics/<counter>`) read inside `ns`.
pub fn counter(ns: &str, dev: &str, counter: &str) -> Result<u64, LabError> {
    let path = format!("/sys/class/net/{dev}/statistics/{counter}");
    let text = exec(ns, "cat", &[&path])?;
    text.trim().parse().map_err(|_| LabError::Command {
        command: format!("cat {path} in {ns}"),
        stderr: format!("not a number: {text:?}"),
    })
}

/// Shapes what `dev` in `ns` transmits to `bytes_per_second` with htb, a short byte FIFO below it.
pub fn shape(ns: &str, dev: &str, bytes_per_second: u64, mtu: u32) -> Result<(), LabError> {
    // About 100 ms of queue: deep enough for TCP, short enough to keep control traffic timely.
    let limit = (bytes_per_second / 10).max(256 * 1024).to_string();
    tc(
        ns,
        &[
            "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
        ],
    )?;
    htb_class(ns, dev, "add", bytes_per_second, mtu)?;
    tc(
        ns,
        &[
            "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "bfifo", "limit", &limit,
        ],
    )?;
    Ok(())
}

/// Changes the rate of what `dev` in `ns` transmits, shaped earlier by [`shape`], to
/// `bytes_per_second` while traffic flows (`tc class change`; the FIFO below keeps its limit).
pub fn reshape(ns: &str, dev: &str, bytes_per_second: u64, mtu: u32) -> Result<(), LabError> {
    htb_class(ns, dev, "change", bytes_per_second, mtu)
}

/// `tc class <verb>` (`add` or `change`) of the htb class `1:1` on `dev` at `bytes_per_second`.
fn htb_class(
    ns: &str,
    dev: &str,
    verb: &str,
    bytes_per_second: u64,
    mtu: u32,
) -> Result<(), LabError> {
    let bits = format!("{}bit", bytes_per_second.saturating_mul(8));
    // Bursts of about 10 ms, at least two frames (and GSO frames up to 64 KiB).
    let burst = (bytes_per_second / 100)
        .max(2 * u64::from(mtu) + 1514)
        .to_string();
    let quantum = (mtu + 100).to_string();
    tc(
        ns,
        &[
            "class", verb, "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &bits,
            "ceil", &bits, "burst", &burst, "cburst", &burst, "quantum", &quantum,
        ],
    )
    .map(drop)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn namespace_names_carry_their_owner() {
        assert_eq!(owner_pid("btl-4242-0-r"), Some(4242));
        assert_eq!(owner_pid("btl-x-0-r"), None);
        // Test namespaces share the scheme (`btl-<pid>-<tag><n>`), so one clean-up finds both.
        assert_eq!(owner_pid("btl-4242-hil0"), Some(4242));
        assert_eq!(owner_pid("other-4242-0"), None);
    }
}
