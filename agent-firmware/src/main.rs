//! Baton agent firmware: the agent-core state machine driven by embassy, on one board
//! chosen at build time ([`board`]; QEMU's `mps2-an385` by default).
//!
//! The agent-core state machine runs here unchanged, driven by a small embassy
//! driver ([`node`]). At boot the device
//!
//! 1. brings its board up ([`board`]: memory guards, time base, boot counter in
//!    flash, Ethernet, the flash store);
//! 2. decodes its provisioning block (identity seed, agent id, IPv4 settings,
//!    manager address and key, [`config`]); without one it derives its id from
//!    the MAC and cannot reach a manager;
//! 3. mounts the content partition (agent-core's `FlashStore` over the board's
//!    NOR flash), so verified chunks survive power cuts;
//! 4. starts embassy-net with a static IPv4 address, then runs the manager
//!    session, the peer listener and outgoing peer connections ([`node`]). A
//!    device provisioned for a serial link talks to the manager over the board's
//!    UART instead (COBS framing) and serves no peers.
//!
//! Logs go out as defmt frames over semihosting (QEMU's stdout); decode them
//! with `defmt-print -e target/thumbv7m-none-eabi/release/baton-firmware`.
//! The RAM budget is 64 KiB (statics, buffers and stack), see `memory.x.in`.

#![no_std]
#![no_main]
#![warn(missing_docs)]

mod board;
mod cobs_tx;
mod config;
mod entropy;
mod node;
mod stack;

use baton_agent_core::agent::AgentConfig;
use baton_agent_core::store::ContentStore as _;
use baton_protocol::AgentId;
use baton_protocol::identity::Identity;
use embassy_executor::Spawner;
use embassy_net::{Ipv4Address, Ipv4Cidr, StackResources, StaticConfigV4};
use sha2::{Digest as _, Sha256};
use static_cell::StaticCell;

use crate::config::Config;
use crate::node::{DeviceAgent, FrameBuf, Node, SocketBuffers};

// Every log line carries the device's uptime in milliseconds.
defmt::timestamp!("{=u64:ms}", embassy_time::Instant::now().as_millis());

/// Sockets in the network stack: the node's TCP connection slots.
const SOCKETS: usize = node::SLOTS;

// Everything large lives in statics, built in place: a 13 KB agent built on
// the stack and then moved would be the deepest stack use of the program.
static RESOURCES: StaticCell<StackResources<SOCKETS>> = StaticCell::new();
static AGENT: StaticCell<DeviceAgent> = StaticCell::new();
static FRAME: StaticCell<FrameBuf> = StaticCell::new();
static MANAGER_RX: StaticCell<[u8; node::BIG_RX]> = StaticCell::new();
static MANAGER_TX: StaticCell<[u8; node::MANAGER_TX]> = StaticCell::new();
static OUT_RX: StaticCell<[u8; node::BIG_RX]> = StaticCell::new();
static OUT_TX: StaticCell<[u8; node::OUT_TX]> = StaticCell::new();
static IN_RX: StaticCell<[u8; node::SMALL_RX]> = StaticCell::new();
static IN_TX: StaticCell<[u8; node::IN_TX]> = StaticCell::new();
static NODE: StaticCell<Node> = StaticCell::new();

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, board::Eth>) -> ! {
    stack::Measured::new(stack::Part::Net, runner.run()).await
}

#[embassy_executor::task]
async fn node_task(node: &'static mut Node) -> ! {
    stack::Measured::new(stack::Part::Node, node.run()).await
}

/// The id a device without a provisioning block uses: `fw-` and its MAC in hex.
fn id_from_mac(mac: [u8; 6]) -> AgentId {
    let mut text = [0u8; 12];
    let mut id = AgentId::new();
    let _ = id.push_str("fw-");
    let _ = id.push_str(node::hex(&mac, &mut text));
    id
}

#[cortex_m_rt::entry]
fn main() -> ! {
    // Boot in its own frame, so its stack is free again while the tasks run.
    let (runner, node) = boot();
    stack::measure(stack::Part::Boot);
    board::run_executor(move |spawner: Spawner| {
        spawner.spawn(net_task(runner).unwrap_or_else(|_| board::exit(false)));
        spawner.spawn(node_task(node).unwrap_or_else(|_| board::exit(false)));
    })
}

/// Builds the agent directly in its static cell and loads its records there.
///
/// The agent is about 16 KB: built as a value inside `boot`'s frame (and copied into the
/// cell) it made that frame 21.8 KB of a 23 KB stack, and the calls below it ran into
/// `.bss`. Here the constructor is inlined into the cell's write, so no copy of the agent
/// is on the stack (check: `llvm-objdump -d` shows this function's `sub sp` well under 1 KB).
#[inline(never)]
fn place_agent(config: AgentConfig, store: board::Store) -> &'static mut DeviceAgent {
    let agent = AGENT
        .uninit()
        .write(DeviceAgent::without_records(config, store));
    agent.load_records();
    agent
}

/// Brings the board up and builds the network stack and the node.
#[inline(never)]
fn boot() -> (embassy_net::Runner<'static, board::Eth>, &'static mut Node) {
    let board::Parts {
        eth,
        mac,
        config_block,
        boot,
        mut store,
    } = board::bring_up();
    let cfg = match Config::decode(&config_block) {
        Ok(c) => Some(c),
        Err(e) => {
            defmt::warn!("provisioning block: {}", e);
            None
        }
    };

    let id = match cfg
        .as_ref()
        .and_then(|c| c.id.as_str())
        .filter(|s| !s.is_empty())
    {
        Some(s) => AgentId::try_from(s).unwrap_or_else(|_| id_from_mac(mac)),
        None => id_from_mac(mac),
    };
    // Without a provisioned seed the identity is derived from the MAC: unique
    // per device but not secret; only good for trying a device out.
    let seed = match &cfg {
        Some(c) => c.seed,
        None => Sha256::new()
            .chain_update(b"baton unprovisioned seed")
            .chain_update(mac)
            .finalize()
            .into(),
    };
    let identity = Identity::from_seed(seed);
    let mut entropy = entropy::Entropy::new(seed, boot);

    let ip = cfg.as_ref().map_or([10, 0, 2, 15], |c| c.ip);
    let prefix = cfg.as_ref().map_or(24, |c| c.prefix);
    let gateway = cfg
        .as_ref()
        .map(|c| c.gateway)
        .filter(|g| *g != [0; 4])
        .map(Ipv4Address::from);
    let net_config = embassy_net::Config::ipv4_static(StaticConfigV4 {
        address: Ipv4Cidr::new(Ipv4Address::from(ip), prefix),
        gateway,
        dns_servers: heapless::Vec::new(),
    });
    let seed64 = u64::from_le_bytes(entropy.ephemeral()[..8].try_into().unwrap_or([0; 8]));
    let resources = RESOURCES.init_with(StackResources::new);
    let (stack, runner) = embassy_net::new(eth, net_config, resources, seed64);

    match store.mount() {
        Ok(Some(m)) => {
            let (root, chunks) = (m.root, m.chunks());
            defmt::info!("flash holds {=str} v{}", m.name.as_str(), m.version);
            let verified = store.verified(&root).unwrap_or(0);
            defmt::info!("flash content: {} of {} chunks verified", verified, chunks);
        }
        Ok(None) => defmt::info!("flash holds no content"),
        Err(e) => defmt::error!("flash mount failed: {}", e),
    }
    let agent_config = node::agent_config(cfg.as_ref(), id.clone(), ip);
    let agent = place_agent(agent_config, store);

    let mut key_hex = [0u8; 64];
    defmt::info!(
        "ready id={=str} key={=str} ip={}.{}.{}.{} listen={} boot={}",
        id.as_str(),
        node::hex(&identity.public().0, &mut key_hex),
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        cfg.as_ref().map_or(0, |c| c.listen_port),
        boot
    );
    defmt::info!(
        "sizes: agent={} node={} handshake={} frame={}",
        core::mem::size_of::<DeviceAgent>(),
        core::mem::size_of::<Node>(),
        core::mem::size_of::<baton_protocol::session::Handshake>(),
        core::mem::size_of::<FrameBuf>()
    );

    // Test switches: show the memory guards on this very image (see the board's guard module).
    board::fault_demos(cfg.as_ref().map_or(0, |c| c.flags));

    // A serial device's manager session runs over UART0: the manager
    // socket's receive buffer then holds the serial line's COBS frames.
    let manager_rx: &'static mut [u8] = MANAGER_RX.init_with(|| [0; node::BIG_RX]);
    let serial = cfg.as_ref().is_some_and(|c| c.serial());
    let (manager_rx, serial_rx): (&'static mut [u8], _) = if serial {
        board::serial::init();
        (&mut [], Some(manager_rx))
    } else {
        (manager_rx, None)
    };
    let sockets = SocketBuffers {
        manager: (manager_rx, MANAGER_TX.init_with(|| [0; node::MANAGER_TX])),
        outgoing: (
            OUT_RX.init_with(|| [0; node::BIG_RX]),
            OUT_TX.init_with(|| [0; node::OUT_TX]),
        ),
        incoming: (
            IN_RX.init_with(|| [0; node::SMALL_RX]),
            IN_TX.init_with(|| [0; node::IN_TX]),
        ),
        serial: serial_rx,
    };
    let frame = FRAME.init_with(|| [0; core::mem::size_of::<FrameBuf>()]);
    let node = NODE.init_with(|| {
        Node::new(
            stack,
            cfg.as_ref(),
            identity,
            entropy,
            agent,
            frame,
            sockets,
        )
    });

    (runner, node)
}
