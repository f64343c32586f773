//! A network lab in Linux network namespaces: segments, a router, shaped and delayed links.
//!
//! [`Lab::build`] turns a [`Topology`] into namespaces (it needs root):
//!
//! ```text
//!   manager ns ── eth0 ═ m0 ── router ns ── w0 ═ wan ─ segment 0 ns (bridge br0) ── a0 ═ eth0 ── agent ns
//!                                        └─ w1 ═ wan ─ segment 1 ns (bridge br0) ── a1 ═ eth0 ── agent ns …
//! ```
//!
//! Segment `s` is the subnet `10.200.<s+1>.0/24` with the router at `.1` and
//! agents from `.10`; the manager is `10.200.0.2` behind the router's
//! `10.200.0.1`. Every agent reaches the manager and every other agent through
//! the router, and UDP broadcast to `10.200.<s+1>.255` stays inside segment `s`.
//! Links are veth pairs, or, when a delay is asked for, two TAP devices joined
//! by a userspace [`delay::Forwarder`]. Rates are shaped with htb on each
//! link's transmit side; the router's side of segment `s`'s WAN link (`w<s>`)
//! carries everything forwarded into the segment, and
//! [`Lab::wan_tx_bytes`] reads its counter; [`Lab::set_agent_upload`] changes
//! one agent's upload rate while it runs.
//!
//! Everything the lab creates is owned by the [`Lab`] value: dropping it
//! (normally, or while unwinding from a panic) stops the forwarders, kills
//! what still runs in its namespaces and deletes them. Namespace names carry
//! the creating pid (`btl-<pid>-<n>-<role>`); [`Lab::build`] first removes
//! those of processes that no longer exist, so a killed run leaves nothing
//! behind for long.

pub mod delay;
pub mod netns;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Errors of building or using a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab creates namespaces and links: it must run as root.
    #[error("the network lab needs root (network namespaces, links, tc); run it as root")]
    NotRoot,
    /// A setup command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A setup command could not be started.
    #[error("cannot run {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    /// A system call or file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The topology cannot be built.
    #[error("bad topology: {0}")]
    Topology(String),
}

/// The MTU of every lab link: jumbo frames keep the userspace delay forwarder's frame rate low.
pub const MTU: u32 = 9000;

/// Every agent's device in its namespace: its side of its access link.
const AGENT_DEVICE: &str = "eth0";

/// Most agents in one segment (addresses `.10` to `.249`).
pub const MAX_AGENTS_PER_SEGMENT: usize = 240;

/// One node's link: rates in bytes per second (0 = not shaped) and an added one-way delay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkShape {
    /// What the node sends, shaped on its side of the link.
    pub up_bps: u64,
    /// What the node receives, shaped on the far side of the link.
    pub down_bps: u64,
    /// Added to each direction (so the round trip gains twice this); zero = a plain veth.
    pub delay: Duration,
}

/// One LAN segment: its agents' links and its WAN link to the router.
#[derive(Clone, Debug, Default)]
pub struct SegmentSpec {
    /// One link per agent in the segment.
    pub agents: Vec<LinkShape>,
    /// The WAN link: `down_bps` shapes what the router forwards into the segment,
    /// `up_bps` what leaves it; `delay` is added in each direction.
    pub wan: LinkShape,
}

/// What to build: a manager behind a router, and segments of agents.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    /// The manager's link to the router.
    pub manager: LinkShape,
    /// The segments, each behind its own WAN link.
    pub segments: Vec<SegmentSpec>,
}

impl Topology {
    /// `agents` agents spread evenly (the first segments take one more) over `segments` segments.
    pub fn spread(agents: &[LinkShape], segments: usize, wan: LinkShape) -> Topology {
        let segments = segments.max(1);
        let mut specs: Vec<SegmentSpec> = (0..segments)
            .map(|_| SegmentSpec {
                agents: Vec::new(),
                wan,
            })
            .collect();
        let per = agents.len() / segments;
        let extra = agents.len() % segments;
        let mut next = agents.iter();
        for (s, spec) in specs.iter_mut().enumerate() {
            let count = per + usize::from(s < extra);
            spec.agents.extend(next.by_ref().take(count).copied());
        }
        Topology {
            manager: LinkShape::default(),
            segments: specs,
        }
    }
}

/// A node of the lab: its namespace and address.
#[derive(Clone, Debug)]
pub struct Node {
    /// The network namespace it runs in.
    pub ns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The segment it sits in (`None` for the manager).
    pub segment: Option<usize>,
}

/// A built segment.
#[derive(Clone, Debug)]
pub struct Segment {
    /// The namespace that hosts the segment's bridge.
    pub ns: String,
    /// The router's address in the segment (the agents' gateway).
    pub gateway: Ipv4Addr,
    /// The segment's broadcast address.
    pub broadcast: Ipv4Addr,
    /// The router's interface towards the segment (in [`Lab::router_ns`]).
    pub router_dev: String,
    /// Indexes into [`Lab::agents`].
    pub agents: Vec<usize>,
}

/// A built lab; dropping it removes everything it created.
pub struct Lab {
    /// The router's namespace.
    pub router_ns: String,
    /// The manager's node.
    pub manager: Node,
    /// The segments, in the topology's order.
    pub segments: Vec<Segment>,
    /// Every agent node, segment by segment.
    pub agents: Vec<Node>,
    namespaces: Vec<String>,
    forwarders: Vec<delay::Forwarder>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("router_ns", &self.router_ns)
            .field("manager", &self.manager)
            .field("segments", &self.segments.len())
            .field("agents", &self.agents.len())
            .finish_non_exhaustive()
    }
}

/// Labs built by this process so far (part of the namespace names).
static LABS: AtomicUsize = AtomicUsize::new(0);

/// Fails with [`LabError::NotRoot`] unless this process runs as root.
pub fn require_root() -> Result<(), LabError> {
    if !rustix::process::geteuid().is_root() {
        return Err(LabError::NotRoot);
    }
    Ok(())
}

impl Lab {
    /// Builds `topology` in fresh namespaces (root only), after removing leftovers of dead runs.
    pub fn build(topology: &Topology) -> Result<Lab, LabError> {
        require_root()?;
        if topology.segments.is_empty() || topology.segments.len() > 250 {
            return Err(LabError::Topology("1 to 250 segments".into()));
        }
        if let Some(s) = topology
            .segments
            .iter()
            .position(|s| s.agents.len() > MAX_AGENTS_PER_SEGMENT)
        {
            return Err(LabError::Topology(format!(
                "segment {s} has more than {MAX_AGENTS_PER_SEGMENT} agents"
            )));
        }
        netns::remove_leftovers();
        let prefix = format!(
            "{}{}-{}",
            netns::PREFIX,
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            router_ns: format!("{prefix}-r"),
            manager: Node {
                ns: format!("{prefix}-m"),
                ip: Ipv4Addr::new(10, 200, 0, 2),
                segment: None,
            },
            segments: Vec::new(),
            agents: Vec::new(),
            namespaces: Vec::new(),
            forwarders: Vec::new(),
        };
        // From here on a failure unwinds through Drop, which removes what exists.
        let router = lab.router_ns.clone();
        lab.add_namespace(&router)?;
        netns::sysctl(&router, "net.ipv4.ip_forward=1")?;

        let manager_ns = lab.manager.ns.clone();
        lab.add_namespace(&manager_ns)?;
        lab.link(&manager_ns, "eth0", &router, "m0", topology.manager, "m")?;
        netns::ip(&router, &["addr", "add", "10.200.0.1/24", "dev", "m0"])?;
        netns::ip(
            &manager_ns,
            &["addr", "add", "10.200.0.2/24", "dev", "eth0"],
        )?;
        netns::ip(
            &manager_ns,
            &["route", "add", "default", "via", "10.200.0.1"],
        )?;

        for (s, spec) in topology.segments.iter().enumerate() {
            let octet = (s + 1) as u8;
            let seg_ns = format!("{prefix}-s{s}");
            lab.add_namespace(&seg_ns)?;
            netns::ip(&seg_ns, &["link", "add", "br0", "type", "bridge"])?;
            netns::ip(
                &seg_ns,
                &["link", "set", "dev", "br0", "mtu", &MTU.to_string(), "up"],
            )?;
            let router_dev = format!("w{s}");
            // The WAN link: the segment's side is `wan`, the router's side `w<s>`.
            lab.link(
                &seg_ns,
                "wan",
                &router,
                &router_dev,
                spec.wan,
                &format!("w{s}"),
            )?;
            netns::ip(&seg_ns, &["link", "set", "dev", "wan", "master", "br0"])?;
            let gateway = Ipv4Addr::new(10, 200, octet, 1);
            netns::ip(
                &router,
                &["addr", "add", &format!("{gateway}/24"), "dev", &router_dev],
            )?;
            let mut members = Vec::new();
            for (j, shape) in spec.agents.iter().enumerate() {
                let index = lab.agents.len();
                let agent_ns = format!("{prefix}-a{index}");
                lab.add_namespace(&agent_ns)?;
                let port = format!("a{index}");
                lab.link(&agent_ns, AGENT_DEVICE, &seg_ns, &port, *shape, &port)?;
                netns::ip(&seg_ns, &["link", "set", "dev", &port, "master", "br0"])?;
                let ip = Ipv4Addr::new(10, 200, octet, 10 + j as u8);
                netns::ip(
                    &agent_ns,
                    &["addr", "add", &format!("{ip}/24"), "dev", AGENT_DEVICE],
                )?;
                netns::ip(
                    &agent_ns,
                    &["route", "add", "default", "via", &gateway.to_string()],
                )?;
                lab.agents.push(Node {
                    ns: agent_ns,
                    ip,
                    segment: Some(s),
                });
                members.push(index);
            }
            lab.segments.push(Segment {
                ns: seg_ns,
                gateway,
                broadcast: Ipv4Addr::new(10, 200, octet, 255),
                router_dev,
                agents: members,
            });
        }
        Ok(lab)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<(), LabError> {
        // Recorded first: a half-made namespace is removed too.
        self.namespaces.push(ns.to_string());
        netns::add(ns)
    }

    /// Joins `dev_a` in `ns_a` (the node's side: it shapes `up_bps`) and `dev_b` in `ns_b`
    /// (shapes `down_bps`), both up with the lab MTU: a veth pair, or two taps and a
    /// forwarder when `shape.delay` is not zero.
    fn link(
        &mut self,
        ns_a: &str,
        dev_a: &str,
        ns_b: &str,
        dev_b: &str,
        shape: LinkShape,
        label: &str,
    ) -> Result<(), LabError> {
        if shape.delay.is_zero() {
            netns::ip(
                ns_a,
                &[
                    "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b,
                ],
            )?;
        } else {
            let a = delay::open_tap(ns_a, dev_a)?;
            let b = delay::open_tap(ns_b, dev_b)?;
            self.forwarders
                .push(delay::Forwarder::start(a, b, shape.delay, label)?);
        }
        let mtu = MTU.to_string();
        for (ns, dev, rate) in [(ns_a, dev_a, shape.up_bps), (ns_b, dev_b, shape.down_bps)] {
            netns::ip(ns, &["link", "set", "dev", dev, "mtu", &mtu, "up"])?;
            if rate > 0 {
                netns::shape(ns, dev, rate, MTU)?;
            }
        }
        Ok(())
    }

    /// A command that runs `program` inside namespace `ns` (`ip netns exec`, which then
    /// execs the program: the child's pid is the program's).
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Bytes the router has transmitted into segment `s` (frames, headers included).
    pub fn wan_tx_bytes(&self, s: usize) -> Result<u64, LabError> {
        let seg = self
            .segments
            .get(s)
            .ok_or_else(|| LabError::Topology(format!("no segment {s}")))?;
        netns::counter(&self.router_ns, &seg.router_dev, "tx_bytes")
    }

    /// [`Lab::wan_tx_bytes`] of every segment.
    pub fn wan_tx_bytes_all(&self) -> Result<Vec<u64>, LabError> {
        (0..self.segments.len())
            .map(|s| self.wan_tx_bytes(s))
            .collect()
    }

    /// Changes agent `i`'s upload rate (the htb class on its side of its access link) to
    /// `bytes_per_second` while it runs. The link must have been built with an upload rate.
    pub fn set_agent_upload(&self, i: usize, bytes_per_second: u64) -> Result<(), LabError> {
        let node = self
            .agents
            .get(i)
            .ok_or_else(|| LabError::Topology(format!("no agent {i}")))?;
        netns::reshape(&node.ns, AGENT_DEVICE, bytes_per_second, MTU)
    }

    /// Frames the delay forwarders dropped because a queue was full.
    pub fn forwarder_drops(&self) -> u64 {
        self.forwarders
            .iter()
            .map(|f| {
                f.a_to_b.dropped.load(Ordering::Relaxed) + f.b_to_a.dropped.load(Ordering::Relaxed)
            })
            .sum()
    }

    /// The names of every namespace this lab created.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Taps first (their names are reachable only while the namespaces exist).
        self.forwarders.clear();
        for ns in self.namespaces.iter().rev() {
            netns::delete(ns);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn agents_spread_evenly_over_segments() {
        let agents = vec![LinkShape::default(); 10];
        let t = Topology::spread(&agents, 3, LinkShape::default());
        let sizes: Vec<usize> = t.segments.iter().map(|s| s.agents.len()).collect();
        assert_eq!(sizes, [4, 3, 3]);
        let t = Topology::spread(&agents, 1, LinkShape::default());
        assert_eq!(t.segments[0].agents.len(), 10);
    }
}
