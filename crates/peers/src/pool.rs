//! The pool: every decision of the peer manager, as a plain struct.
//!
//! The [`Pool`] owns the address book, the state of every peer, heartbeat
//! timers, quality counters and the dial plan. It does no I/O and reads no
//! clock: each input carries `now`, and each call queues [`Action`]s that the
//! driver ([`crate::manager`]) performs: dial, ping, send, close, publish an
//! event. This is what the unit tests below drive with explicit time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use meshwork_transport::{Address, CloseReason, Direction};
use meshwork_wire::proto::{Disconnect, DisconnectReason, Discovered, PeerCount, PeerInfo};
use meshwork_wire::{Message, NodeId};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::PeersConfig;
use crate::event::{PeerEvent, PeerSnapshot, PeerState, SeedSnapshot};
use crate::heartbeat::{Heartbeat, Liveness};
use crate::score::{score, weighted_choice};

/// A transport connection id (unique in the process).
pub(crate) type ConnId = u64;
/// A dial the pool asked for.
pub(crate) type DialId = u64;

/// How long "blocked" lasts at the transport: until unblocked.
pub(crate) const BLOCK_FOREVER: Duration = crate::FOREVER;

/// Entries read from one Discovered (or one refusal's alternatives).
const MAX_DISCOVERED_READ: usize = 32;
/// `Discovered` messages read from one peer: a burst of this many, then one
/// per [`DISCOVERED_EVERY`]; the rest are dropped unread. Honest peers send
/// one per discovery interval (30 s by default), one on connecting, one in
/// answer to each of our asks and, while short of peers, asks of their own
/// (0.5 to 1 s after each new link, then further apart); each message read
/// costs a pass over the address book (to read it, or to answer an ask) and
/// a wake-up of the pool.
const DISCOVERED_BURST: u32 = 8;
const DISCOVERED_EVERY: Duration = Duration::from_secs(1);
/// A node id connected from two places at once (see
/// [`Action::TwinSuspected`]) is reported at most once per this long.
const TWIN_WARN_EVERY: Duration = Duration::from_secs(600);
/// The first wait before a node below `min_peers` asks its peers for
/// addresses, jittered into its upper half (0.5 to 1 s after the last new
/// link); it doubles at each ask up to the discovery interval.
const ASK_FIRST: Duration = Duration::from_secs(1);

/// What the handshake told us about a new connection.
#[derive(Debug, Clone)]
pub(crate) struct LinkInfo {
    pub(crate) node: NodeId,
    pub(crate) direction: Direction,
    pub(crate) remote_addr: Address,
    pub(crate) listen_addrs: Vec<String>,
    pub(crate) metadata: HashMap<String, String>,
    /// The round trip the transport measured in the handshake, if any:
    /// the link's first RTT sample, so a new peer has one at once.
    pub(crate) rtt: Option<Duration>,
    /// The peer's count of its peers, as its Hello gave it (none from an
    /// implementation that does not send one).
    pub(crate) count: Option<PeerCount>,
}

/// Why a dial failed, as far as the pool cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DialFailure {
    /// The address is this node.
    SelfConnection,
    /// The node can never be ours: another network, version or security
    /// mode, or it does not allow us.
    Incompatible,
    /// Unreachable, refused, timed out: try again later.
    Transient,
    /// The node is there but has no room for us: try again later, and
    /// never forget it for that.
    Full,
    /// The manager is stopping.
    Shutdown,
}

/// How long a slot the gate let an incoming handshake through for is held
/// for it: from the gate to the connection being taken is one write and a
/// queue, well under this. A handshake that fails after the gate (or a
/// peer that gives up then) holds its slot no longer.
const GATE_HOLD: Duration = Duration::from_secs(2);

/// Work for the driver.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Dial {
        dial: DialId,
        addr: Address,
    },
    Ping {
        conn: ConnId,
    },
    Send {
        conn: ConnId,
        message: Message,
    },
    Close {
        conn: ConnId,
        disconnect: Disconnect,
    },
    /// Refuse the node at the transport (ban or block).
    Ban {
        node: NodeId,
        duration: Duration,
    },
    Unban {
        node: NodeId,
    },
    /// Where messages to `peer` go: `None` when it has no connection;
    /// `usable` is false while it is unresponsive.
    Route {
        peer: NodeId,
        conn: Option<ConnId>,
        usable: bool,
    },
    Event(PeerEvent),
    /// `peer` connected while already linked, the new connection's Hello
    /// advertising listen addresses that share none with the link's: most
    /// likely two nodes sharing one key file (one node id). For a warning
    /// to the operator, at most once per [`TWIN_WARN_EVERY`] per node.
    TwinSuspected {
        peer: NodeId,
        /// The usable addresses the existing link advertised.
        existing: Vec<Address>,
        /// Those the new connection advertises.
        new: Vec<Address>,
    },
}

#[derive(Debug)]
struct Link {
    conn: ConnId,
    /// More connections from the same initiator, waiting for it to close
    /// them (at most one is kept), with the addresses each advertised.
    extra: Vec<(ConnId, Vec<Address>)>,
    /// The usable listen addresses `conn`'s Hello advertised.
    listen_addrs: Vec<Address>,
    direction: Direction,
    remote_addr: Address,
    connected_at: Instant,
    last_heard: Instant,
    rtt: Option<Duration>,
    srtt: Option<Duration>,
    heartbeat: Heartbeat,
    /// When its next `Discovered` message is due under the rate limit (a
    /// generic cell rate: the message is read if this is at most the burst
    /// ahead of now).
    discovered_due: Instant,
    /// The peer asked who we know when we knew nobody else: it gets a
    /// sample as soon as we link to someone (see [`Pool::answer_ask`]).
    owed_answer: bool,
    /// Set when the peer closed `conn` as a duplicate while the connection
    /// it keeps had not reached us yet: the link is held for that survivor
    /// (see [`Pool::on_closed`]). `conn` is then closed: nothing is sent on
    /// it, and the peer has no route.
    held: Option<Held>,
    /// The peer's count of its own peers as it last told it (its Hello,
    /// then its Pongs), and when we heard it: what says whether it can
    /// spare its link to us (see [`Pool::handover_victim`]).
    count: Option<(PeerCount, Instant)>,
    /// The slot was handed to the peer as a node with no peer (see
    /// [`Pool::handover_victim`]): a peer known longer does not take it
    /// back while the peer is not known to have peers to spare (see
    /// [`Pool::room_victim`]). Otherwise a node dialling to refill its
    /// outbound share and one left alone took it from each other in turn,
    /// one eviction budget apart, for good (nodes of `max_peers` 1, in
    /// `old_identities_do_not_eclipse_a_full_node_through_swaps`).
    handed: bool,
}

impl Link {
    /// Whether the peer said, within `fresh` before `now`, that it has
    /// more peers than its `min_peers` and at least one besides us: losing
    /// its link to us leaves it with what it needs.
    fn can_spare(&self, fresh: Duration, now: Instant) -> bool {
        self.count.is_some_and(|(c, at)| {
            now.saturating_duration_since(at) < fresh && c.linked > c.min_peers.max(1)
        })
    }
}

/// Why [`Pool::make_room_for`] closed a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eviction {
    /// A slot our own dials borrowed from the inbound share, given back.
    Reclaim,
    /// The slot of a peer younger than the one taking it.
    KnownLonger,
    /// The slot of a peer with peers to spare, for one with none.
    Handover,
}

/// Whether a dialler's Hello said it has no peer at all, and wants some.
fn alone(count: Option<PeerCount>) -> bool {
    count.is_some_and(|c| c.linked == 0 && c.min_peers > 0)
}

/// A link waiting for the survivor of a duplicate: the peer closed our only
/// connection with `Disconnect(DUPLICATE_CONNECTION)`, which it sends only
/// while it keeps another connection with us.
#[derive(Debug)]
struct Held {
    /// When to stop waiting: the peer is lost then, as if at the close.
    until: Instant,
    /// How the connection ended (the reason of that late Disconnected).
    reason: CloseReason,
}

/// A link lost without our doing, replaced by a link to one of the lost
/// peer's own peers (see [`Pool::poll_replacements`]).
#[derive(Debug)]
struct Replacing {
    lost: NodeId,
    /// Given up then.
    until: Instant,
    /// Dials left to try.
    tries: u8,
    /// The dial in flight, and whom it dials.
    dial: Option<(DialId, NodeId)>,
}

/// How many of our peers that said they are linked to a node are kept in
/// its entry ([`Entry::linked_to`]).
const LINKED_TO_KEPT: usize = 4;

/// Dials tried for one replacement ([`Pool::poll_replacements`]).
const REPLACEMENT_TRIES: u8 = 3;

/// How long after a loss its replacement is tried.
const REPLACEMENT_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Entry {
    id: NodeId,
    addrs: Vec<Address>,
    state: PeerState,
    seen: Instant,
    /// The latest instant some node was linked to it, as far as we know:
    /// our own last link (while linked, [`age`](Self::age) is zero), or
    /// the latest `now - age` discovery told us, whoever told it. Hearsay
    /// that nobody has vouched for within the lost-peer window is neither
    /// passed on nor kept (see [`Pool::poll_forget`]): before, the old ids
    /// of nodes restarted with fresh keys went round for good.
    vouched: Instant,
    backoff: Backoff,
    next_attempt: Instant,
    dial_failures: u32,
    ever_connected: bool,
    /// Its addresses came from its own Hello, as a dialler the gate refused:
    /// hearsay does not replace them (as for `ever_connected`).
    addrs_from_hello: bool,
    /// When its first link in this run was made.
    first_linked: Option<Instant>,
    /// Whether we ever dialled it and got through, in this run: only such
    /// peers are dialled by a swap (see [`Pool::poll_swap`]), so a node
    /// cannot draw a full pool's swaps (and its slots) to itself by
    /// having dialled in once.
    chosen: bool,
    lost_at: Option<Instant>,
    /// When it said it shut down (`Disconnect(SHUTDOWN)`), until it links
    /// again: not passed on in discovery, and forgotten after
    /// `lost_peer_retry` (a node restarted with a fresh key never comes
    /// back under this id).
    goodbye_at: Option<Instant>,
    banned_until: Option<Instant>,
    /// When errors and timeouts were reported, oldest first; those older
    /// than `failure_memory` no longer count (at most `max_error_count` of
    /// each are kept).
    errors: VecDeque<Instant>,
    timeouts: VecDeque<Instant>,
    metadata: HashMap<String, String>,
    link: Option<Link>,
    dialing: Option<DialId>,
    /// When a connection from two places at once was last reported for
    /// this node id ([`Action::TwinSuspected`]).
    twin_warned: Option<Instant>,
    /// Peers of ours that told us they were linked to it (an entry of age
    /// zero in their `Discovered`), latest last, at most
    /// [`LINKED_TO_KEPT`]: whom to dial when one of them is lost (see
    /// [`Pool::poll_replacements`]).
    linked_to: Vec<NodeId>,
    /// How long its last link lasted, if it broke without our doing (see
    /// [`Pool::readmits`]).
    lost_link_lasted: Option<Duration>,
    /// When a link of ours last gave way to it outside the eviction budget
    /// (see [`Pool::readmits`]).
    readmitted_at: Option<Instant>,
}

impl Entry {
    fn new(id: NodeId, cfg: &PeersConfig, now: Instant) -> Self {
        Entry {
            id,
            addrs: Vec::new(),
            state: PeerState::Known,
            seen: now,
            vouched: now,
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
            next_attempt: now,
            dial_failures: 0,
            ever_connected: false,
            first_linked: None,
            chosen: false,
            addrs_from_hello: false,
            lost_at: None,
            goodbye_at: None,
            banned_until: None,
            errors: VecDeque::new(),
            timeouts: VecDeque::new(),
            metadata: HashMap::new(),
            link: None,
            dialing: None,
            twin_warned: None,
            linked_to: Vec::new(),
            lost_link_lasted: None,
            readmitted_at: None,
        }
    }

    /// How long ago some node was last linked to it, as far as we know:
    /// zero while we are (see [`vouched`](Self::vouched)).
    fn age(&self, now: Instant) -> Duration {
        match self.link {
            Some(_) => Duration::ZERO,
            None => now.saturating_duration_since(self.vouched),
        }
    }

    /// The state of an entry with neither a link nor a dial.
    fn idle_state(&self) -> PeerState {
        if self.banned_until.is_some() {
            PeerState::Banned
        } else if self.ever_connected {
            PeerState::Disconnected
        } else {
            PeerState::Known
        }
    }

    fn set_state(&mut self, to: PeerState, actions: &mut Vec<Action>) {
        if self.state != to {
            actions.push(Action::Event(PeerEvent::StateChanged {
                peer: self.id.clone(),
                from: self.state,
                to,
            }));
            self.state = to;
        }
    }

    fn route(&self) -> Action {
        Action::Route {
            peer: self.id.clone(),
            conn: self.live_link().map(|l| l.conn),
            usable: self.state == PeerState::Connected,
        }
    }

    /// The link, unless it is held for a survivor (its connection closed).
    fn live_link(&self) -> Option<&Link> {
        self.link.as_ref().filter(|l| l.held.is_none())
    }

    /// True while the link is held for the survivor of a duplicate.
    fn is_held(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.held.is_some())
    }

    fn dialable(&self, now: Instant, blocked: &HashSet<NodeId>) -> bool {
        self.link.is_none()
            && self.dialing.is_none()
            && self.banned_until.is_none()
            && !self.addrs.is_empty()
            && self.next_attempt <= now
            && !blocked.contains(&self.id)
    }

    /// The errors and timeouts reported within the last `memory` at `now`.
    fn failures(&self, now: Instant, memory: Duration) -> (u32, u32) {
        let recent = |q: &VecDeque<Instant>| {
            let n = q
                .iter()
                .filter(|at| now.saturating_duration_since(**at) < memory)
                .count();
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        (recent(&self.errors), recent(&self.timeouts))
    }

    fn snapshot(&self, now: Instant, memory: Duration) -> PeerSnapshot {
        let link = self.link.as_ref();
        let connected_for = link.map(|l| now.saturating_duration_since(l.connected_at));
        let (errors, timeouts) = self.failures(now, memory);
        PeerSnapshot {
            node_id: self.id.clone(),
            state: self.state,
            direction: link.map(|l| l.direction),
            addrs: self.addrs.clone(),
            remote_addr: link.map(|l| l.remote_addr.clone()),
            metadata: self.metadata.clone(),
            rtt: link.and_then(|l| l.rtt),
            smoothed_rtt: link.and_then(|l| l.srtt),
            errors,
            timeouts,
            score: match connected_for {
                Some(up) => score(link.and_then(|l| l.srtt), errors, timeouts, up),
                None => 0.0,
            },
            connected_for,
            idle_for: link.map(|l| now.saturating_duration_since(l.last_heard)),
            dial_failures: self.dial_failures,
            peer_count: link.and_then(|l| l.count.map(|(c, _)| c)),
        }
    }
}

#[derive(Debug)]
struct Seed {
    addr: Address,
    node: Option<NodeId>,
    backoff: Backoff,
    next_attempt: Instant,
    dialing: Option<DialId>,
    /// Dials that failed in a row, and why the last one did.
    failures: u32,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Dial {
    addr: Address,
    node: Option<NodeId>,
    seed: Option<Address>,
    /// Whether the dial's connection, if it finds the pool full, may close
    /// a link to make room for itself: only for the dials a full pool makes
    /// to take a link's place, a swap ([`poll_swap`](Pool::poll_swap)) or
    /// the redial of a lost seed ([`poll_lost_seeds`](Pool::poll_lost_seeds)).
    /// Every other dial is started into free room; the gate does not count
    /// our dials, so inbound peers may take that room while the dial is in
    /// flight, and its connection is then refused rather than given an
    /// honest link's slot (an attacker's old identity, redialled as a lost
    /// peer, stalled its handshake while another dialled in).
    may_evict: bool,
}

/// Counts for status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) linked: usize,
    pub(crate) inbound: usize,
    pub(crate) outbound: usize,
    pub(crate) pending_dials: usize,
    pub(crate) known: usize,
    pub(crate) refused: u64,
    pub(crate) ignored_discovered: u64,
    pub(crate) suspected_twins: u64,
    pub(crate) swaps: u64,
    pub(crate) reclaims: u64,
    pub(crate) handovers: u64,
}

/// The peer manager's state machine.
#[derive(Debug)]
pub(crate) struct Pool {
    cfg: PeersConfig,
    local: NodeId,
    local_addrs: HashSet<Address>,
    entries: HashMap<NodeId, Entry>,
    conns: HashMap<ConnId, NodeId>,
    seeds: Vec<Seed>,
    dials: HashMap<DialId, Dial>,
    next_dial: DialId,
    next_discovery: Instant,
    next_feeler: Instant,
    /// When a full pool next dials a lost peer it knew before its youngest
    /// link, to take that link's place (see [`poll_swap`](Pool::poll_swap)).
    next_swap: Instant,
    /// Links lost without our doing, for which a peer of the lost one is
    /// dialled (see [`poll_replacements`](Self::poll_replacements)).
    replacing: Vec<Replacing>,
    /// When the pool may next close a link to make room for an inbound
    /// peer (a slot taken back, or a peer known longer): at most one such
    /// eviction per feeler interval, so that a peer reconnecting in a loop,
    /// or nodes short of peers taking slots from one another, cannot churn
    /// the pool.
    next_eviction: Instant,
    /// When a node below `min_peers` with no dial in flight next asks its
    /// peers for addresses (an empty `Discovered`); see
    /// [`poll_ask`](Pool::poll_ask).
    next_ask: Instant,
    /// The waits between asks: from [`ASK_FIRST`] doubling up to the
    /// discovery interval, reset by every new link.
    ask_backoff: Backoff,
    blocked: HashSet<NodeId>,
    refused: u64,
    /// Dials of a full pool to a lost peer (see `poll_swap`), since start.
    swaps: u64,
    /// Outbound links closed to give their slot back to an inbound dialler
    /// (see `reclaim_victim`), since start.
    reclaims: u64,
    /// Inbound links closed to hand their slot to a dialler with no peer
    /// (see `handover_victim`), since start.
    handovers: u64,
    ignored_discovered: u64,
    /// Connections from a node id already linked whose advertised
    /// addresses share none with the link's (see [`Action::TwinSuspected`]).
    suspected_twins: u64,
    /// How long a link closed by the peer as a duplicate is held for the
    /// survivor: the transport's handshake timeout.
    survivor_grace: Duration,
    /// Incoming handshakes the gate let through, by node, not yet taken
    /// (`on_connection`): each holds an inbound slot until it is taken or
    /// until the time given, so that many diallers at once are not all let
    /// through to be refused when taken. See [`GATE_HOLD`].
    gated: HashMap<NodeId, (Instant, u32)>,
    shutting_down: bool,
    rng: StdRng,
    actions: Vec<Action>,
}

/// Parses announced addresses, dropping what we cannot use and our own.
fn usable_addrs<'a>(
    raw: impl IntoIterator<Item = &'a String>,
    local: &HashSet<Address>,
) -> Vec<Address> {
    let mut out: Vec<Address> = Vec::new();
    for s in raw {
        if let Ok(a) = s.parse::<Address>() {
            if !local.contains(&a) && !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// `e` as discovery names it, with its age in whole milliseconds rounded up
/// (rounded down, every relay would make an entry up to a millisecond
/// younger).
fn peer_info(e: &Entry, now: Instant) -> PeerInfo {
    let age = e.age(now).as_nanos().div_ceil(1_000_000);
    PeerInfo {
        node_id: e.id.as_bytes().clone(),
        addrs: e.addrs.iter().map(|a| a.to_string()).collect(),
        age_ms: Some(u64::try_from(age).unwrap_or(u64::MAX)),
    }
}

fn ewma(old: Option<Duration>, sample: Duration) -> Duration {
    match old {
        None => sample,
        Some(old) => (old * 7 + sample) / 8,
    }
}

impl Pool {
    /// A pool for node `local` listening on `local_addrs`; `handshake_timeout`
    /// is the transport's (how long a handshake may take at our end).
    pub(crate) fn new(
        cfg: PeersConfig,
        local: NodeId,
        local_addrs: Vec<Address>,
        handshake_timeout: Duration,
        now: Instant,
    ) -> Self {
        let rng = match cfg.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let local_addrs: HashSet<Address> = local_addrs.into_iter().collect();
        let mut seeds: Vec<Seed> = Vec::new();
        for addr in &cfg.seeds {
            if local_addrs.contains(addr) || seeds.iter().any(|s| &s.addr == addr) {
                continue;
            }
            seeds.push(Seed {
                addr: addr.clone(),
                node: None,
                backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
                next_attempt: now,
                dialing: None,
                failures: 0,
                last_error: None,
            });
        }
        Pool {
            next_discovery: now + cfg.discovery_interval,
            next_feeler: now + cfg.feeler_interval,
            next_swap: now + cfg.feeler_interval,
            replacing: Vec::new(),
            next_eviction: now,
            next_ask: now,
            ask_backoff: Backoff::new(
                ASK_FIRST.min(cfg.discovery_interval),
                cfg.discovery_interval,
            ),
            cfg,
            local,
            local_addrs,
            entries: HashMap::new(),
            conns: HashMap::new(),
            seeds,
            dials: HashMap::new(),
            next_dial: 1,
            blocked: HashSet::new(),
            refused: 0,
            swaps: 0,
            reclaims: 0,
            handovers: 0,
            ignored_discovered: 0,
            suspected_twins: 0,
            survivor_grace: handshake_timeout,
            gated: HashMap::new(),
            shutting_down: false,
            rng,
            actions: Vec::new(),
        }
    }

    /// The actions queued by the calls since the last take.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn jitter(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    pub(crate) fn counts(&self) -> Counts {
        let mut c = Counts {
            pending_dials: self.dials.len(),
            refused: self.refused,
            ignored_discovered: self.ignored_discovered,
            suspected_twins: self.suspected_twins,
            swaps: self.swaps,
            reclaims: self.reclaims,
            handovers: self.handovers,
            ..Counts::default()
        };
        for e in self.entries.values() {
            match &e.link {
                Some(l) => {
                    c.linked += 1;
                    match l.direction {
                        Direction::Inbound => c.inbound += 1,
                        Direction::Outbound => c.outbound += 1,
                    }
                }
                None => c.known += 1,
            }
        }
        c
    }

    /// Makes sure `id` has an entry, forgetting the stalest idle entry when
    /// the book is full. False for our own id, or when nothing can make room.
    fn ensure_entry(&mut self, id: &NodeId, now: Instant) -> bool {
        if *id == self.local {
            return false;
        }
        if self.entries.contains_key(id) {
            return true;
        }
        let idle = self.entries.values().filter(|e| e.link.is_none()).count();
        if idle >= self.cfg.address_book_capacity {
            let stalest = self
                .entries
                .values()
                .filter(|e| e.link.is_none() && e.dialing.is_none())
                // Hearsay goes before peers we have been connected to, so a
                // flood of gossip cannot push out the peers a healed
                // partition needs.
                .min_by_key(|e| (e.ever_connected, e.seen))
                .map(|e| e.id.clone());
            match stalest {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => return false,
            }
        }
        self.entries
            .insert(id.clone(), Entry::new(id.clone(), &self.cfg, now));
        true
    }

    // ----- connections -------------------------------------------------

    /// A dial we asked for completed its handshake. Its connection closes
    /// a link to make room for itself only if the dial was made for that
    /// (see [`Dial::may_evict`]).
    pub(crate) fn on_dial_ok(&mut self, dial: DialId, conn: ConnId, info: LinkInfo, now: Instant) {
        let mut may_evict = false;
        if let Some(d) = self.dials.remove(&dial) {
            may_evict = d.may_evict;
            if let Some(seed_addr) = &d.seed {
                if let Some(seed) = self.seeds.iter_mut().find(|s| &s.addr == seed_addr) {
                    seed.dialing = None;
                    seed.node = Some(info.node.clone());
                    seed.backoff.reset();
                    seed.failures = 0;
                    seed.last_error = None;
                }
            }
            if let Some(expected) = &d.node {
                let mut gone = false;
                if let Some(e) = self.entries.get_mut(expected) {
                    e.dialing = None;
                    if *expected != info.node {
                        // Another node answers at that address now.
                        e.addrs.retain(|a| *a != d.addr);
                        if e.link.is_none() {
                            let to = e.idle_state();
                            e.set_state(to, &mut self.actions);
                            // Nowhere left to find it (a node restarted
                            // with a fresh key, say): forgotten, as a node
                            // whose last address failed is, rather than
                            // listed as known for good.
                            gone = e.addrs.is_empty();
                        }
                    }
                }
                if *expected != info.node {
                    self.survivor_failed(expected, now);
                }
                if gone && self.entries.get(expected).is_some_and(|e| e.link.is_none()) {
                    self.entries.remove(expected);
                }
            }
        }
        self.take_connection(conn, info, may_evict, now);
    }

    /// Whether `node` is a neighbour (has a link, perhaps held).
    pub(crate) fn is_linked(&self, node: &NodeId) -> bool {
        self.entries.get(node).is_some_and(|e| e.link.is_some())
    }

    /// An incoming handshake from `node` is about to end (see
    /// [`meshwork_transport::Gate`]): refused now, with some of our peers as
    /// alternatives, if [`on_connection`](Self::on_connection) would refuse
    /// it for want of room (or because we are stopping, or it is blocked or
    /// banned), so that the dialler never holds a connection that closes as
    /// it opens.
    /// A peer let through holds its slot for [`GATE_HOLD`] (in `gated`,
    /// counted by the gate, the dial plan and `on_connection`);
    /// `on_connection` decides again once the connection is taken (the hold
    /// may have lapsed). A peer refused for want of room is learnt, with
    /// the addresses its Hello gave (`listen_addrs`), as `on_connection`
    /// learns one it refuses, if the address book has room for it without
    /// forgetting anyone: a node with a free outbound slot may then dial
    /// it. (Without that, a newcomer refused by every node of a saturated
    /// mesh stayed alone: nobody knew it, though some had room to dial.)
    pub(crate) fn gate(
        &mut self,
        node: &NodeId,
        listen_addrs: &[String],
        count: Option<PeerCount>,
        now: Instant,
    ) -> Result<(), Disconnect> {
        if self.shutting_down {
            return Err(Disconnect::new(
                DisconnectReason::Shutdown,
                "node shutting down".to_string(),
            ));
        }
        if self.blocked.contains(node) {
            return Err(Disconnect::new(
                DisconnectReason::NotAllowed,
                "blocked".to_string(),
            ));
        }
        if self
            .entries
            .get(node)
            .is_some_and(|e| e.banned_until.is_some())
        {
            return Err(Disconnect::new(
                DisconnectReason::Banned,
                "banned".to_string(),
            ));
        }
        let linked = self.entries.get(node).is_some_and(|e| e.link.is_some());
        self.gated.retain(|_, (until, _)| *until > now);
        // One slot per identity, however many of its handshakes are in
        // flight; each of them releases its own share of the hold.
        let handshakes = self.gated.get(node).map_or(0, |(_, n)| *n);
        let held = self.gated.len() - usize::from(handshakes > 0);
        let counts = self.counts();
        // Our own dials in flight are not counted: one may be to this very
        // node (crossed dials, settled as duplicates once both are taken),
        // or to a node that will refuse it. When one takes the last slot
        // first, the peer let through here is refused when taken.
        let full = counts.inbound + held >= self.cfg.inbound_limit()
            || counts.linked + held >= self.cfg.max_peers;
        if !full || linked || self.may_make_room(node, count, held, now) {
            if !linked {
                self.gated
                    .insert(node.clone(), (now + GATE_HOLD, handshakes + 1));
            }
            return Ok(());
        }
        self.refused += 1;
        let mut d = Disconnect::new(DisconnectReason::TooManyPeers, "too many peers".to_string());
        d.alternatives = self.alternatives(node, now);
        // Learnt only into room in the book: a host minting identities
        // refused at handshake rate must not push out what gossip taught.
        let idle = self.entries.values().filter(|e| e.link.is_none()).count();
        let room = self.entries.contains_key(node) || idle < self.cfg.address_book_capacity;
        if room && self.ensure_entry(node, now) {
            let addrs = usable_addrs(listen_addrs, &self.local_addrs);
            self.note_refused(node, addrs, now);
        }
        Err(d)
    }

    /// The handshake of `node`, let through by the gate, came to nothing:
    /// the slot held for it is free again at once rather than when the hold
    /// lapses (a peer stopping after the gate would otherwise keep a slot
    /// for 2 s per handshake, and a few of them every inbound slot).
    pub(crate) fn release_gate(&mut self, node: &NodeId) {
        if let Some((_, n)) = self.gated.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                self.gated.remove(node);
            }
        }
    }

    /// `node` (with an entry) was refused for want of room: its addresses,
    /// as it gave them, and when it was seen, so that a node with room to
    /// dial may dial it; it stays idle.
    fn note_refused(&mut self, node: &NodeId, addrs: Vec<Address>, now: Instant) {
        if let Some(e) = self.entries.get_mut(node) {
            if !addrs.is_empty() {
                e.addrs = addrs;
                e.addrs_from_hello = true;
            }
            e.seen = now;
            // It dialled us: alive now, whatever hearsay says.
            e.vouched = now;
            let to = e.idle_state();
            e.set_state(to, &mut self.actions);
        }
    }

    /// A connection completed its handshake (inbound, or the end of a dial).
    pub(crate) fn on_connection(&mut self, conn: ConnId, info: LinkInfo, now: Instant) {
        self.take_connection(conn, info, true, now);
    }

    /// [`on_connection`](Self::on_connection); a connection that finds the
    /// pool full closes a link to make room for it only if `may_evict`.
    fn take_connection(&mut self, conn: ConnId, info: LinkInfo, may_evict: bool, now: Instant) {
        let refuse = |reason, message: &str| Disconnect::new(reason, message.to_string());
        if self.shutting_down {
            let d = refuse(DisconnectReason::Shutdown, "node shutting down");
            self.actions.push(Action::Close {
                conn,
                disconnect: d,
            });
            return;
        }
        if info.node == self.local {
            let d = refuse(DisconnectReason::SelfConnection, "connected to itself");
            self.actions.push(Action::Close {
                conn,
                disconnect: d,
            });
            return;
        }
        if self.blocked.contains(&info.node) {
            let d = refuse(DisconnectReason::NotAllowed, "blocked");
            self.actions.push(Action::Close {
                conn,
                disconnect: d,
            });
            return;
        }
        let addrs = usable_addrs(&info.listen_addrs, &self.local_addrs);
        // The slots the gate holds for other incoming handshakes count
        // against an incoming connection too (not against our own dials,
        // which the pool started with room for them).
        self.gated
            .retain(|n, (until, _)| *until > now && *n != info.node);
        let held = match info.direction {
            Direction::Inbound => self.gated.len(),
            Direction::Outbound => 0,
        };
        let counts = self.counts();
        let limit_in = self.cfg.inbound_limit();
        let max = self.cfg.max_peers;
        let local = self.local.clone();
        if !self.ensure_entry(&info.node, now) {
            let d = refuse(DisconnectReason::TooManyPeers, "address book full");
            self.actions.push(Action::Close {
                conn,
                disconnect: d,
            });
            return;
        }
        // Full by the links alone, and counting the held slots too.
        let full_with = |held: usize| match info.direction {
            Direction::Inbound => counts.inbound + held >= limit_in || counts.linked + held >= max,
            Direction::Outbound => counts.linked >= max,
        };
        let (really_full, held_full) = (full_with(0), full_with(held));
        let (linked, banned) = self.entries.get(&info.node).map_or((false, false), |e| {
            (e.link.is_some(), e.banned_until.is_some())
        });
        // A peer known longer takes a slot from the youngest one only when
        // the links fill every slot; a slot merely held for another
        // handshake it takes as it is (that handshake, if it ever ends, may
        // find no room). A banned peer takes nothing: it is refused below.
        let mut handed = false;
        let full = held_full
            && !linked
            && !banned
            && (!may_evict
                || !(if really_full {
                    let made = self.make_room_for(&info, now);
                    handed = made == Some(Eviction::Handover);
                    made.is_some()
                } else {
                    match info.direction {
                        Direction::Inbound => self.may_make_room(&info.node, info.count, held, now),
                        Direction::Outbound => {
                            self.room_victim(&info.node, info.direction, now).is_some()
                        }
                    }
                }));
        if full {
            self.refused += 1;
            let id = info.node.clone();
            let mut d = refuse(DisconnectReason::TooManyPeers, "too many peers");
            d.alternatives = self.alternatives(&id, now);
            self.actions.push(Action::Close {
                conn,
                disconnect: d,
            });
            self.note_refused(&id, addrs, now);
            return;
        }
        let Pool {
            entries,
            conns,
            actions,
            cfg,
            suspected_twins,
            ..
        } = self;
        let Some(entry) = entries.get_mut(&info.node) else {
            return;
        };
        if !addrs.is_empty() {
            entry.addrs = addrs.clone();
        }
        entry.metadata = info.metadata.clone();
        entry.seen = now;
        if entry.banned_until.is_some() {
            let d = refuse(DisconnectReason::Banned, "banned");
            actions.push(Action::Close {
                conn,
                disconnect: d,
            });
            return;
        }
        if let Some(link) = entry.link.as_mut() {
            // One process advertises the same listen addresses on all its
            // connections (crossed dials, redials): a second connection
            // whose addresses share none with the link's comes from
            // another place with the same node id, most likely another
            // node started with a copy of this one's key file. The rules
            // below then keep both (the second as a duplicate its sender
            // never closes) or replace one with the other, and messages
            // for the id take one of them; nothing else would tell the
            // operator.
            if !link.listen_addrs.is_empty()
                && !addrs.is_empty()
                && !addrs.iter().any(|a| link.listen_addrs.contains(a))
            {
                *suspected_twins += 1;
                let due = entry
                    .twin_warned
                    .is_none_or(|t| now.saturating_duration_since(t) >= TWIN_WARN_EVERY);
                if due {
                    entry.twin_warned = Some(now);
                    actions.push(Action::TwinSuspected {
                        peer: info.node.clone(),
                        existing: link.listen_addrs.clone(),
                        new: addrs.clone(),
                    });
                }
            }
            if link.held.take().is_some() {
                // The survivor of the connection the peer closed as a
                // duplicate: it takes the link over, and the peer, never
                // lost, gets no event.
                link.conn = conn;
                link.direction = info.direction;
                link.remote_addr = info.remote_addr;
                link.listen_addrs = addrs;
                link.last_heard = now;
                link.heartbeat = Heartbeat::new(&cfg.heartbeat);
                if let Some(c) = info.count {
                    link.count = Some((c, now));
                }
                conns.insert(conn, info.node.clone());
                let route = entry.route();
                actions.push(route);
                return;
            }
            // A second connection between the same two nodes.
            let initiator = |d: Direction, remote: &NodeId| match d {
                Direction::Outbound => local.clone(),
                Direction::Inbound => remote.clone(),
            };
            let old_by = initiator(link.direction, &info.node);
            let new_by = initiator(info.direction, &info.node);
            let dup = refuse(
                DisconnectReason::DuplicateConnection,
                "duplicate connection",
            );
            if old_by != new_by {
                // Crossed dials: both ends keep the one opened by the smaller
                // node id, so they agree without talking.
                let smaller = if local < info.node {
                    &local
                } else {
                    &info.node
                };
                if new_by == *smaller {
                    let old = std::mem::replace(&mut link.conn, conn);
                    if let Some(c) = info.count {
                        link.count = Some((c, now));
                    }
                    link.direction = info.direction;
                    link.remote_addr = info.remote_addr;
                    link.listen_addrs = addrs;
                    conns.remove(&old);
                    conns.insert(conn, info.node.clone());
                    let route = entry.route();
                    actions.push(route);
                    actions.push(Action::Close {
                        conn: old,
                        disconnect: dup,
                    });
                } else {
                    actions.push(Action::Close {
                        conn,
                        disconnect: dup,
                    });
                }
            } else if new_by == local {
                // We dialled twice (e.g. two addresses of one node): keep the first.
                actions.push(Action::Close {
                    conn,
                    disconnect: dup,
                });
            } else if link.extra.is_empty() {
                // The peer dialled twice; it closes one, we keep both until then.
                link.extra.push((conn, addrs));
                conns.insert(conn, info.node.clone());
            } else {
                actions.push(Action::Close {
                    conn,
                    disconnect: dup,
                });
            }
            return;
        }
        entry.link = Some(Link {
            conn,
            extra: Vec::new(),
            listen_addrs: addrs,
            direction: info.direction,
            remote_addr: info.remote_addr.clone(),
            connected_at: now,
            last_heard: now,
            rtt: info.rtt,
            srtt: info.rtt,
            heartbeat: Heartbeat::new(&cfg.heartbeat),
            discovered_due: now,
            owed_answer: false,
            held: None,
            count: info.count.map(|c| (c, now)),
            handed,
        });
        entry.ever_connected = true;
        entry.first_linked.get_or_insert(now);
        entry.chosen |= info.direction == Direction::Outbound;
        entry.dial_failures = 0;
        entry.backoff.reset();
        entry.lost_at = None;
        entry.goodbye_at = None;
        entry.set_state(PeerState::Connected, actions);
        let route = entry.route();
        conns.insert(conn, info.node.clone());
        actions.push(route);
        actions.push(Action::Event(PeerEvent::Connected {
            peer: info.node.clone(),
            direction: info.direction,
            addr: info.remote_addr,
        }));
        let sample = self.sample(&info.node, self.cfg.discovery_sample, now);
        if !sample.is_empty() {
            let message = Message::Discovered(Discovered { peers: sample });
            self.actions.push(Action::Send { conn, message });
        }
        self.pay_owed_answers(now);
        // The new peer's own sample may not name anyone new: if we are
        // still short of peers, ask again soon.
        self.ask_backoff.reset();
        let jitter = self.jitter();
        self.next_ask = now + self.ask_backoff.fail(jitter);
    }

    /// A dial failed before or during the handshake.
    #[cfg(test)]
    pub(crate) fn on_dial_failed(&mut self, dial: DialId, failure: DialFailure, now: Instant) {
        self.on_dial_failed_with(dial, failure, None, now);
    }

    /// A dial failed, with the error's text (kept for a seed's status).
    pub(crate) fn on_dial_failed_with(
        &mut self,
        dial: DialId,
        failure: DialFailure,
        error: Option<String>,
        now: Instant,
    ) {
        let Some(d) = self.dials.remove(&dial) else {
            return;
        };
        if failure == DialFailure::SelfConnection {
            self.local_addrs.insert(d.addr.clone());
            self.seeds.retain(|s| s.addr != d.addr);
            for e in self.entries.values_mut() {
                e.addrs.retain(|a| *a != d.addr);
            }
        }
        let jitter = self.jitter();
        // A seed whose node is known follows that node's schedule too (see
        // `poll_dials`): both are capped alike.
        let seed_known = d.seed.as_ref().and_then(|a| {
            let seed = self.seeds.iter().find(|s| &s.addr == a)?;
            seed.node.clone()
        });
        let capped = self.lost_redial_cap(d.node.as_ref().or(seed_known.as_ref()), &failure, now);
        let mut seed_node = None;
        if let Some(seed_addr) = &d.seed {
            if let Some(seed) = self.seeds.iter_mut().find(|s| &s.addr == seed_addr) {
                seed.dialing = None;
                seed.next_attempt = now + seed.backoff.fail(jitter).min(capped);
                seed.failures += 1;
                seed.last_error = error;
                seed_node = seed.node.clone();
            }
        }
        let Some(id) = d.node else {
            // A seed dial to a node held for its survivor may have been
            // that survivor.
            if let Some(n) = seed_node {
                self.survivor_failed(&n, now);
            }
            return;
        };
        let max_failures = self.cfg.max_dial_failures;
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        e.dialing = None;
        if e.link.is_some() {
            // The peer dialled us meanwhile: its link is what counts, and
            // it stays as it is (a held link loses its survivor).
            self.survivor_failed(&id, now);
            return;
        }
        if failure != DialFailure::Shutdown {
            if failure != DialFailure::Full {
                e.dial_failures += 1;
            }
            e.next_attempt = now + e.backoff.fail(jitter).min(capped);
        }
        let forget = e.addrs.is_empty()
            || (!e.ever_connected
                && (failure == DialFailure::Incompatible || e.dial_failures >= max_failures));
        let to = e.idle_state();
        e.set_state(to, &mut self.actions);
        if forget && e.link.is_none() {
            self.entries.remove(&id);
        }
    }

    /// The longest wait before redialling `id` after a dial that failed
    /// with `failure`: for a peer lost within the lost-peer window that did
    /// not answer (not one that refused us as full), the lost-peer backoff,
    /// jittered into its upper half; no cap (`Duration::MAX`) otherwise.
    /// Nodes restarted together with fresh ids that know only each other
    /// (their seeds restarted with them) are found again only by the nodes
    /// that redial their addresses: at a backoff grown while they were
    /// down, that took 30 s to minutes (see
    /// [`PeersConfig::with_lost_peer_backoff`]).
    fn lost_redial_cap(
        &mut self,
        id: Option<&NodeId>,
        failure: &DialFailure,
        now: Instant,
    ) -> Duration {
        let window = self.cfg.lost_peer_retry;
        let lost = id
            .and_then(|id| self.entries.get(id))
            .and_then(|e| e.lost_at)
            .is_some_and(|t| now.saturating_duration_since(t) < window);
        if !lost || *failure != DialFailure::Transient {
            return Duration::MAX;
        }
        self.lost_peer_wait()
    }

    /// The lost-peer backoff, jittered into its upper half (and at most
    /// the longest backoff).
    fn lost_peer_wait(&mut self) -> Duration {
        let cap = self.cfg.lost_peer_backoff.min(self.cfg.backoff_max);
        let jitter = self.jitter();
        cap / 2 + (cap / 2).mul_f64(jitter)
    }

    /// A connection ended (either side, any reason).
    pub(crate) fn on_closed(&mut self, conn: ConnId, reason: CloseReason, now: Instant) {
        let Some(id) = self.conns.remove(&conn) else {
            return;
        };
        let jitter = self.jitter();
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let Some(link) = e.link.as_mut() else {
            return;
        };
        if link.conn != conn {
            link.extra.retain(|(c, _)| *c != conn);
            return;
        }
        if let Some((next, addrs)) = link.extra.pop() {
            link.conn = next;
            link.listen_addrs = addrs;
            let route = e.route();
            self.actions.push(route);
            return;
        }
        if matches!(
            reason,
            CloseReason::Remote {
                reason: DisconnectReason::DuplicateConnection,
                ..
            }
        ) {
            // The peer closed our only connection as a duplicate, which it
            // does only while it keeps another one with us: that survivor's
            // handshake has not ended at our end yet (our own dial, or an
            // inbound one), e.g. after crossed dials. The peer is not lost:
            // the link is held, without a route, until the survivor takes it
            // over (on_connection) or fails (our dial to the peer fails, or
            // the grace ends: the handshake timeout), and only then is the
            // peer disconnected.
            link.held = Some(Held {
                until: now + self.survivor_grace,
                reason,
            });
            let route = e.route();
            self.actions.push(route);
            return;
        }
        self.unlink(&id, reason, jitter, now);
    }

    /// `id` lost its link, which ended with `reason`: it is disconnected,
    /// and redialled after its backoff.
    fn unlink(&mut self, id: &NodeId, reason: CloseReason, jitter: f64, now: Instant) {
        let seed = self.seeds.iter().any(|s| s.node.as_ref() == Some(id));
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        let since = e.link.take().map(|l| l.connected_at);
        e.vouched = now;
        let (lost, wait) = match &reason {
            // A node that shut down is likely gone for a while, unless it
            // is a seed: those are restarted, and others wait on them. A
            // seed's goodbye is a lost link (redialled for the lost-peer
            // window, even above min_peers): the nodes joining through the
            // restarted seed know nobody else, and if none of its former
            // peers dialled it again, they would stay a mesh of their own.
            CloseReason::Remote {
                reason: DisconnectReason::Shutdown,
                ..
            } => {
                let wait = if seed {
                    e.backoff.fail(jitter)
                } else {
                    e.backoff.penalty(jitter)
                };
                e.goodbye_at = Some(now);
                (seed, wait)
            }
            CloseReason::Remote {
                reason: DisconnectReason::TooManyPeers | DisconnectReason::Banned,
                ..
            } => (false, e.backoff.fail(jitter)),
            _ => (true, e.backoff.fail(jitter)),
        };
        e.next_attempt = now + wait;
        e.lost_at = lost.then_some(now);
        let to = e.idle_state();
        e.set_state(to, &mut self.actions);
        let route = e.route();
        self.actions.push(route);
        // Refused or banned by the peer: our doing as much as its. A
        // goodbye leaves the same hole as a crash.
        let replace = !matches!(
            reason,
            CloseReason::Remote {
                reason: DisconnectReason::TooManyPeers | DisconnectReason::Banned,
                ..
            }
        );
        self.actions.push(Action::Event(PeerEvent::Disconnected {
            peer: id.clone(),
            reason,
        }));
        if replace {
            self.note_lost_link(id, since, now);
        }
    }

    /// `id`'s link, made at `since`, was lost without our doing (it
    /// crashed, left, or the network between us broke): how long it lasted
    /// is kept (see [`readmits`](Self::readmits)), and one of its own peers
    /// is dialled in its place, while there is room (see
    /// [`poll_replacements`](Self::poll_replacements)). Only for a link
    /// that lasted a discovery interval: a peer must hold a link that long
    /// to steer one dial of ours to nodes it names.
    fn note_lost_link(&mut self, id: &NodeId, since: Option<Instant>, now: Instant) {
        let Some(since) = since else {
            return;
        };
        let lasted = now.saturating_duration_since(since);
        if let Some(e) = self.entries.get_mut(id) {
            e.lost_link_lasted = Some(lasted);
        }
        if lasted < self.cfg.discovery_interval {
            return;
        }
        // Only a pool the loss left at `min_peers` or below: one content
        // with more needs no new link (replacing every loss grew pools
        // under churn, the links of restarted nodes coming on top: 40
        // processes at 4/16 went from a median of 4 links to 9 over three
        // waves, against 6 without replacements).
        if self.counts().linked > self.cfg.target() {
            return;
        }
        self.replacing.retain(|r| r.lost != *id);
        if self.replacing.len() >= self.cfg.max_peers {
            self.replacing.remove(0);
        }
        self.replacing.push(Replacing {
            lost: id.clone(),
            until: now + REPLACEMENT_WINDOW,
            tries: REPLACEMENT_TRIES,
            dial: None,
        });
    }

    /// The links lost without our doing are replaced while there is room,
    /// when the loss left the pool at `min_peers` or below (so even at
    /// `min_peers`, where nothing else dials): by a link to one of the lost peer's own
    /// peers (as its `Discovered` named them), first those none of our
    /// other peers said it is linked to. A crash can split a sparse mesh
    /// into parts where every node keeps `min_peers`: nobody dialled, and
    /// the parts stayed apart for good (a 2/3 chain of 40 processes, a
    /// quarter killed: parts of 14 and 16, and of 5 and 25). The nodes
    /// that lost a link to a crashed node dial its other peers, which are
    /// across the cut if it was a bridge. In a partition those are out of
    /// reach, so the dials fail and leave the room that redials of the
    /// lost peers need to heal it. At most [`REPLACEMENT_TRIES`] dials per
    /// lost link, within [`REPLACEMENT_WINDOW`]; over when a dial links, or
    /// the lost peer is back. The dials take free room only, as all but a
    /// full pool's do: a connection of theirs that finds the pool full
    /// (inbound peers took the room while it was in flight) is refused
    /// rather than given a link's slot (see [`Dial::may_evict`]). Returns
    /// the dials started.
    fn poll_replacements(&mut self, now: Instant, room: usize) -> usize {
        let mut started = 0;
        let mut i = 0;
        while i < self.replacing.len() {
            if let Some((dial, target)) = self.replacing[i].dial.clone() {
                if self.dials.contains_key(&dial) {
                    i += 1;
                    continue;
                }
                if self.is_linked(&target) {
                    self.replacing.remove(i);
                    continue;
                }
                self.replacing[i].dial = None;
            }
            let r = &self.replacing[i];
            if r.until <= now || r.tries == 0 || self.is_linked(&r.lost) {
                self.replacing.remove(i);
                continue;
            }
            if started >= room {
                i += 1;
                continue;
            }
            let lost = r.lost.clone();
            let mut cands: Vec<(bool, NodeId)> = self
                .entries
                .values()
                .filter(|e| {
                    e.id != lost && e.linked_to.contains(&lost) && e.dialable(now, &self.blocked)
                })
                .map(|e| {
                    let near = e.linked_to.iter().any(|n| *n != lost && self.is_linked(n));
                    (near, e.id.clone())
                })
                .collect();
            cands.sort();
            cands.shuffle(&mut self.rng);
            // Stable: in random order within each kind, far ones first.
            cands.sort_by_key(|c| c.0);
            if let Some((_, id)) = cands.into_iter().next() {
                if self.dial_entry(&id, false) {
                    let dial = self.entries.get(&id).and_then(|e| e.dialing);
                    let r = &mut self.replacing[i];
                    r.tries -= 1;
                    r.dial = dial.map(|d| (d, id));
                    started += 1;
                }
            }
            i += 1;
        }
        started
    }

    /// The survivor `id`'s held link was waiting for will not come (our
    /// dial to it failed or reached another node): the peer is lost now,
    /// for the reason its connection closed. Nothing if the link is not held.
    fn survivor_failed(&mut self, id: &NodeId, now: Instant) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        let Some(held) = e.link.as_mut().and_then(|l| l.held.take()) else {
            return;
        };
        let jitter = self.jitter();
        self.unlink(id, held.reason, jitter, now);
    }

    /// Held links whose survivor did not come within the grace: lost.
    fn poll_held(&mut self, now: Instant) {
        let expired: Vec<NodeId> = self
            .entries
            .values()
            .filter(|e| {
                e.link
                    .as_ref()
                    .and_then(|l| l.held.as_ref())
                    .is_some_and(|h| h.until <= now)
            })
            .map(|e| e.id.clone())
            .collect();
        for id in expired {
            self.survivor_failed(&id, now);
        }
    }

    /// A peer sent `Discovered`: read if the peer is within its rate
    /// ([`DISCOVERED_BURST`]); `false` if dropped unread. An empty one is
    /// an ask (see [`poll_ask`](Self::poll_ask)), answered with a sample of
    /// the address book like the periodic gossip; asks and lists share the
    /// rate, so asks cannot make us sample the book more often than lists
    /// make us read into it.
    pub(crate) fn on_discovered_from(
        &mut self,
        from: &NodeId,
        peers: &[PeerInfo],
        now: Instant,
    ) -> bool {
        let Some(link) = self.entries.get_mut(from).and_then(|e| e.link.as_mut()) else {
            return false;
        };
        let due = link.discovered_due.max(now) + DISCOVERED_EVERY;
        if due.saturating_duration_since(now) > DISCOVERED_EVERY * DISCOVERED_BURST {
            self.ignored_discovered += 1;
            return false;
        }
        link.discovered_due = due;
        let conn = link.conn;
        if peers.is_empty() {
            self.answer_ask(from, conn, now);
        } else {
            self.read_discovered(peers, Some(from), now);
        }
        true
    }

    /// `from` asked who we know: a sample of the book, as the gossip sends.
    /// Nothing when we know nobody else: an empty answer would be an ask
    /// back, and two nodes that know only each other would ask each other
    /// for ever.
    fn answer_ask(&mut self, from: &NodeId, conn: ConnId, now: Instant) {
        let sample = self.sample(from, self.cfg.discovery_sample, now);
        if sample.is_empty() {
            // Owed, and sent at our next new link: two nodes restarted
            // together that knew only each other asked each other in vain,
            // and the asker's waits grew meanwhile (to 8-16 s), so it heard
            // of the node that found its peer only seconds after that.
            if let Some(link) = self.entries.get_mut(from).and_then(|e| e.link.as_mut()) {
                link.owed_answer = true;
            }
        } else {
            let message = Message::Discovered(Discovered { peers: sample });
            self.actions.push(Action::Send { conn, message });
        }
    }

    /// Sends the peers that asked in vain (see [`answer_ask`](Self::answer_ask))
    /// a sample now that we have more to tell.
    fn pay_owed_answers(&mut self, now: Instant) {
        let owed: Vec<(NodeId, ConnId)> = self
            .entries
            .values_mut()
            .filter_map(|e| {
                let link = e
                    .link
                    .as_mut()
                    .filter(|l| l.owed_answer && l.held.is_none())?;
                link.owed_answer = false;
                Some((e.id.clone(), link.conn))
            })
            .collect();
        for (id, conn) in owed {
            self.answer_ask(&id, conn, now);
        }
    }

    /// A node told us about other nodes: the alternatives of a refusal.
    pub(crate) fn on_discovered(&mut self, peers: &[PeerInfo], now: Instant) {
        self.read_discovered(peers, None, now);
    }

    /// Reads the entries a node told us of, `from` a peer of ours in a
    /// `Discovered` (its own peers come with age zero), or from another
    /// node's refusal.
    fn read_discovered(&mut self, peers: &[PeerInfo], from: Option<&NodeId>, now: Instant) {
        // We send 16; the protocol allows 256. A peer sending more gets the
        // first few read, so one message cannot rewrite the whole book.
        for p in peers.iter().take(MAX_DISCOVERED_READ) {
            let Ok(id) = NodeId::from_bytes(p.node_id.clone()) else {
                continue;
            };
            let addrs = usable_addrs(&p.addrs, &self.local_addrs);
            if addrs.is_empty() || id == self.local {
                continue;
            }
            // Nobody vouched for it within the window: not worth keeping
            // (an instant before our clock's origin is as good as that).
            let Some(vouched) = self.vouched_at(p.age_ms, now) else {
                continue;
            };
            let known = self.entries.contains_key(&id);
            if !self.ensure_entry(&id, now) {
                continue;
            }
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            e.seen = now;
            // The latest vouch wins, whoever relayed it: no relay makes an
            // entry younger than the last link someone really had.
            e.vouched = if known {
                e.vouched.max(vouched)
            } else {
                vouched
            };
            if let Some(peer) = from.filter(|_| p.age_ms == Some(0)) {
                e.linked_to.retain(|n| n != peer);
                if e.linked_to.len() == LINKED_TO_KEPT {
                    e.linked_to.remove(0);
                }
                e.linked_to.push(peer.clone());
            }
            // The addresses of a node we were connected to came from its
            // own Hello: hearsay does not replace them (a hostile peer
            // pointing the nodes we know at its own listeners was how it
            // captured a pool's outbound dials).
            if e.link.is_none()
                && e.dialing.is_none()
                && !e.ever_connected
                && !e.addrs_from_hello
                && e.addrs != addrs
            {
                e.addrs = addrs.clone();
            }
            if !known {
                self.actions
                    .push(Action::Event(PeerEvent::Discovered { peer: id, addrs }));
            }
        }
    }

    /// When an entry heard of now with `age_ms` was last vouched for;
    /// `None` when that is the lost-peer window ago or more. An entry
    /// without an age (from an implementation that does not send one) is
    /// taken as half the window old: usable, and passed on for a while,
    /// but never as fresh as one a node linked to it names.
    fn vouched_at(&self, age_ms: Option<u64>, now: Instant) -> Option<Instant> {
        let window = self.cfg.lost_peer_retry;
        let age = age_ms.map_or(window / 2, Duration::from_millis);
        if age >= window {
            return None;
        }
        now.checked_sub(age)
    }

    /// The Pong of a heartbeat came back, with the peer's count of its
    /// peers if it sent one.
    pub(crate) fn on_pong(
        &mut self,
        conn: ConnId,
        rtt: Duration,
        count: Option<PeerCount>,
        now: Instant,
    ) {
        if let Some(link) = self.link_of(conn) {
            link.heartbeat.ping_done();
            link.rtt = Some(rtt);
            link.srtt = Some(ewma(link.srtt, rtt));
            link.last_heard = link.last_heard.max(now);
            if let Some(c) = count {
                link.count = Some((c, now));
            }
        }
    }

    /// A heartbeat got no Pong in time (the silence thresholds decide what
    /// that means).
    pub(crate) fn on_ping_failed(&mut self, conn: ConnId) {
        if let Some(link) = self.link_of(conn) {
            link.heartbeat.ping_done();
        }
    }

    fn link_of(&mut self, conn: ConnId) -> Option<&mut Link> {
        let id = self.conns.get(&conn)?;
        let link = self.entries.get_mut(id)?.link.as_mut()?;
        (link.conn == conn).then_some(link)
    }

    // ----- quality -----------------------------------------------------

    /// Counts an error (`timeout == false`) or a timeout against `peer`;
    /// at the maximum the peer is disconnected and kept away for the
    /// longest backoff. Returns the new count, `None` for an unknown peer.
    pub(crate) fn report(&mut self, peer: &NodeId, timeout: bool, now: Instant) -> Option<u32> {
        let max = self.cfg.max_error_count;
        let timing = self.cfg.heartbeat;
        let memory = self.cfg.failure_memory;
        let e = self.entries.get_mut(peer)?;
        let q = if timeout {
            &mut e.timeouts
        } else {
            &mut e.errors
        };
        // Only the failures within the memory count; no more than the
        // maximum are ever needed.
        while q
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= memory)
            || q.len() >= max as usize
        {
            q.pop_front();
        }
        q.push_back(now);
        let count = u32::try_from(q.len()).unwrap_or(u32::MAX);
        if let Some(link) = e.link.as_mut() {
            link.heartbeat.reset(&timing);
        }
        if count >= max {
            // Disconnected, and refused both ways for the longest backoff:
            // otherwise the peer would just dial back in.
            let what = if timeout { "timeouts" } else { "errors" };
            let jitter = self.jitter();
            let mut penalty = Duration::ZERO;
            if let Some(e) = self.entries.get_mut(peer) {
                penalty = e.backoff.penalty(jitter);
                e.next_attempt = now + penalty;
                e.errors.clear();
                e.timeouts.clear();
            }
            let d = Disconnect::new(DisconnectReason::Banned, format!("too many {what}"));
            self.ban_with(peer, penalty, d, now);
        }
        Some(count)
    }

    /// A node we have known longer than one of our inbound peers dials in
    /// while the inbound slots are full: the inbound peer known the shortest
    /// time gives up its slot to it. Why, when a slot was freed. Without
    /// this, whoever filled the inbound slots (one host can mint identities
    /// and reconnect each as soon as it is refused) kept out every node we
    /// were connected to before, for good. Failing that, a dialler with no
    /// peer gets the slot of an inbound peer that can spare its link (see
    /// [`handover_victim`](Self::handover_victim)).
    fn make_room_for(&mut self, info: &LinkInfo, now: Instant) -> Option<Eviction> {
        let (victim, why) = match info.direction {
            // Outside the budget: a peer lost without our doing, back once
            // per window (see `readmits`).
            Direction::Inbound if now < self.next_eviction => {
                if !self.readmits(&info.node, now) {
                    return None;
                }
                let victim = self.room_victim(&info.node, info.direction, now)?;
                if let Some(e) = self.entries.get_mut(&info.node) {
                    e.readmitted_at = Some(now);
                }
                (victim, Eviction::KnownLonger)
            }
            Direction::Inbound => {
                let victim = if let Some(victim) = self.reclaim_victim(0) {
                    self.reclaims += 1;
                    (victim, Eviction::Reclaim)
                } else if let Some(victim) = self.room_victim(&info.node, info.direction, now) {
                    (victim, Eviction::KnownLonger)
                } else if let Some(victim) = self.handover_victim(info.count, now) {
                    self.handovers += 1;
                    (victim, Eviction::Handover)
                } else {
                    return None;
                };
                let jitter = self.jitter();
                self.next_eviction = now + self.eviction_interval().mul_f64(1.0 + jitter);
                victim
            }
            Direction::Outbound => (
                self.room_victim(&info.node, info.direction, now)?,
                Eviction::KnownLonger,
            ),
        };
        let message = match why {
            Eviction::Reclaim => "slot given back to an inbound peer",
            Eviction::KnownLonger => "slot given to a peer known longer",
            Eviction::Handover => "slot handed to a node with no peer",
        };
        let d = Disconnect::new(DisconnectReason::TooManyPeers, message);
        self.close_link(&victim, d, false, now);
        Some(why)
    }

    /// Whether `node`, dialling in while the pool is full, takes the slot
    /// of a peer first linked after it even though the eviction budget (one
    /// a feeler interval) is spent: it is a peer whose link of at least a
    /// discovery interval broke without our doing within the lost-peer
    /// window, not readmitted so within the window. After a heal, the
    /// half whose pools had all filled refused the other half's redials
    /// until their budgets came back (spent on the heal before): the sync
    /// chaos test took 40-52 s to be one graph in 4 runs of 8, and
    /// `meshscale.py all 40 --min 2 --max 4` 19 s for its second heal. An
    /// identity must hold a link a discovery interval, lose it, and wait
    /// for the window to pass between two such evictions. Identities that
    /// were once our peers, dropping their links and dialling back
    /// together, each take a slot at once: with our own swaps to two more
    /// of them they left a node of four no honest peer
    /// (`old_identities_do_not_eclipse_a_full_node_through_swaps`, 1 run
    /// in 8) until the longest-held link was kept from giving way
    /// ([`longest_held`](Self::longest_held)). (Once per window for the
    /// whole pool instead made some heals slow again: one seed of the
    /// chaos test 40-53 s in 3 runs of 8, against 0.85 s.)
    fn readmits(&self, node: &NodeId, now: Instant) -> bool {
        let window = self.cfg.lost_peer_retry;
        let within =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < window);
        self.entries.get(node).is_some_and(|e| {
            within(e.lost_at)
                && e.lost_link_lasted
                    .is_some_and(|d| d >= self.cfg.discovery_interval)
                && !within(e.readmitted_at)
        })
    }

    /// Whether [`make_room_for`](Self::make_room_for) would close a link
    /// for an inbound `node` (whose Hello gave `count`, with `held` slots
    /// held for other handshakes): the eviction budget allows it, and a
    /// slot can be given back, a younger inbound peer gives way, or one that
    /// can spare its link does for a node with no peer. What the gate and
    /// a connection taken into a slot merely held ask.
    fn may_make_room(
        &self,
        node: &NodeId,
        count: Option<PeerCount>,
        held: usize,
        now: Instant,
    ) -> bool {
        (now >= self.next_eviction || self.readmits(node, now))
            && (self.reclaim_victim(held).is_some()
                || self.room_victim(node, Direction::Inbound, now).is_some()
                || self.handover_victim(count, now).is_some())
    }

    /// The inbound peer whose slot a dialler with no peer takes when the
    /// pool is full, has no borrowed slot to give back, and the dialler is
    /// no peer known longer than one of ours: the dialler's Hello (`dialler`) said it has no peer and
    /// wants some, and this peer said lately (a Pong or its Hello within
    /// `unresponsive_after`) that it has more than its own `min_peers` and
    /// at least one besides us, so losing us leaves it what it needs. The
    /// youngest such peer goes. Without this, a node new to a mesh whose
    /// pools are all full (at 2/4 every node's two dials and two diallers
    /// fill every slot) found every pool full and nobody with a borrowed
    /// slot to give back, and stayed alone until a slot freed by chance
    /// (`tools/restarts.py`: 5 restarts of 18 alone for 20 s and more).
    /// Its next peers come as they come to any node short of peers: the
    /// peer that gave way, if it dials to refill its outbound share, is
    /// told of it in our refusal's alternatives, and the newcomer has
    /// room. (Handing slots to every dialler below its `min_peers` filled
    /// the halves of a split mesh more: the chaos test of meshwork-sync
    /// took 40-60 s to be one graph after its final heal, through swaps,
    /// in 10 runs of 20, against 6 of 22 without handovers and 7 of 22
    /// with them for nodes alone.) Counts are claims: a dialler that lies
    /// costs each pool it dials one link per eviction interval (the budget
    /// every eviction shares), a peer that lies about its own count only
    /// puts its own link at stake, and an honest peer is never left below
    /// its `min_peers`. The peer closed is not alone afterwards, so it
    /// takes nobody's slot in turn.
    fn handover_victim(&self, dialler: Option<PeerCount>, now: Instant) -> Option<NodeId> {
        if !alone(dialler) {
            return None;
        }
        let fresh = self.cfg.heartbeat.unresponsive_after;
        let kept = self.longest_held();
        self.entries
            .values()
            .filter(|e| Some(&e.id) != kept)
            .filter(|e| {
                e.live_link()
                    .is_some_and(|l| l.direction == Direction::Inbound && l.can_spare(fresh, now))
            })
            .filter_map(|e| e.first_linked.map(|t| (t, e.id.clone())))
            .max_by_key(|(t, _)| *t)
            .map(|(_, victim)| victim)
    }

    /// The least time between two links closed to make room for inbound
    /// peers: the feeler interval (the wait after each eviction is jittered
    /// from one to two of it), or a minute if feelers are off.
    fn eviction_interval(&self) -> Duration {
        match self.cfg.feeler_interval {
            d if d.is_zero() => Duration::from_secs(60),
            d => d,
        }
    }

    /// The outbound peer whose slot an inbound dialler takes back when the
    /// pool is full only because our own dials borrowed slots of the inbound
    /// share: fewer than `inbound_limit` links (with the `held` slots the
    /// gate holds for handshakes) are inbound, more than the reserved number
    /// are outbound. The outbound link made most recently goes; the
    /// reserved ones always stay. Without this, pools whose `min_peers` is
    /// close to `max_peers` get stuck: a node short of peers finds every
    /// other node full, some of them with more outbound links than they
    /// reserve and room in their inbound share that nobody can use.
    /// With three links or more, the peer whose current link has lasted
    /// longest: it gives way neither to a peer known longer
    /// ([`room_victim`](Self::room_victim)) nor to a dialler with no peer
    /// ([`handover_victim`](Self::handover_victim)). Peers known longer
    /// are the identities an attacker may have got in early: those that
    /// dialled back took inbound slots, our swaps to those that listened
    /// took the rest (a pool whose inbound peers had borrowed every slot
    /// had no outbound link to keep), and one saying it had no peer was
    /// handed the last; four such identities took every slot of a node of
    /// four in 1 run of 8 of
    /// `old_identities_do_not_eclipse_a_full_node_through_swaps` (0 of 150
    /// since). The link
    /// that lasted longest is the one an attacker cannot make by coming
    /// back: it must have held it, unbroken, longer than any other peer,
    /// as Bitcoin Core keeps its longest-connected peers from eviction. A
    /// give-back ([`reclaim_victim`](Self::reclaim_victim)) takes the
    /// outbound link made last, never this one while two are outbound.
    fn longest_held(&self) -> Option<&NodeId> {
        // One pass over the book (it runs at the gate of a full pool).
        let mut links = 0;
        let mut oldest: Option<(Instant, &NodeId)> = None;
        for e in self.entries.values() {
            if let Some(l) = &e.link {
                links += 1;
                let this = (l.connected_at, &e.id);
                if oldest.is_none_or(|o| this < o) {
                    oldest = Some(this);
                }
            }
        }
        oldest.filter(|_| links >= 3).map(|(_, id)| id)
    }

    fn reclaim_victim(&self, held: usize) -> Option<NodeId> {
        let c = self.counts();
        let reserved = self.cfg.reserved_outbound();
        // With no slot reserved (`outbound_reserved` 0, or `max_peers` 1)
        // the pool has no shares: nothing was borrowed, nothing goes back.
        // A link held for its survivor is not counted as outbound: the
        // survivor may come in either direction. With `min_peers` equal to
        // `max_peers` every slot of every node is wanted: a slot given back
        // only moves a shortage from node to node (a review measured 118
        // give-backs in 30 minutes among 7 nodes of 3 peers, with no end).
        if reserved == 0
            || self.cfg.target() >= self.cfg.max_peers
            || c.inbound + held >= self.cfg.inbound_limit()
            || self.live_outbound() <= reserved
        {
            return None;
        }
        // The link made most recently goes (not the peer first linked
        // most recently): that is the slot borrowed last, and a swap to a
        // peer known long ago must not push an older link out of the
        // reserve.
        self.entries
            .values()
            .filter_map(|e| {
                e.live_link()
                    .filter(|l| l.direction == Direction::Outbound)
                    .map(|l| (l.connected_at, e.id.clone()))
            })
            .max_by_key(|(t, _)| *t)
            .map(|(_, victim)| victim)
    }

    /// Outbound links, not counting those held for a survivor.
    fn live_outbound(&self) -> usize {
        self.entries
            .values()
            .filter(|e| {
                e.live_link()
                    .is_some_and(|l| l.direction == Direction::Outbound)
            })
            .count()
    }

    /// The peer whose slot [`make_room_for`](Self::make_room_for) would
    /// give to `node`, if any: the one first linked most recently, after
    /// `node` was; among the inbound peers, and for an outbound `node` among
    /// the outbound ones if no inbound peer is younger and more than the
    /// reserved number are outbound (the slots we chose ourselves are what
    /// keeps a node from being surrounded, so they go last, and the reserved
    /// ones never). An outbound connection asks for a slot only after a
    /// dial of a full pool (a swap, see [`poll_swap`](Self::poll_swap), or
    /// the redial of a lost seed); one whose dial was made into free room
    /// and inbound peers took it while the dial was in flight is refused
    /// (see [`Dial::may_evict`]). An inbound peer handed
    /// its slot as a node with no peer keeps it while it is not known to
    /// have peers to spare (see [`Link::handed`]).
    /// The [`longest_held`](Self::longest_held) link never gives way.
    fn room_victim(&self, node: &NodeId, direction: Direction, now: Instant) -> Option<NodeId> {
        let since = self.entries.get(node).and_then(|e| e.first_linked)?;
        let fresh = self.cfg.heartbeat.unresponsive_after;
        let kept = self.longest_held();
        let youngest = |dir: Direction| {
            self.entries
                .values()
                .filter(|e| Some(&e.id) != kept)
                .filter(|e| match dir {
                    Direction::Inbound => e.link.as_ref().is_some_and(|l| {
                        l.direction == Direction::Inbound && (!l.handed || l.can_spare(fresh, now))
                    }),
                    Direction::Outbound => e
                        .live_link()
                        .is_some_and(|l| l.direction == Direction::Outbound),
                })
                .filter_map(|e| e.first_linked.map(|t| (t, e.id.clone())))
                .filter(|(t, _)| *t > since)
                .max_by_key(|(t, _)| *t)
                .map(|(_, victim)| victim)
        };
        // Inbound links go first, then outbound ones beyond the reserved:
        // those are never given up, or whoever could make us dial it (a
        // swap), or dials in as a peer known longer, would take them one by
        // one. (Inbound dialers used to find only inbound links to take:
        // halves of a saturated mesh whose young links were all dialled by
        // the nodes their old peers swapped back to stayed apart for good,
        // 1 heal in about 30 under load.)
        let _ = direction;
        youngest(Direction::Inbound).or_else(|| {
            (self.live_outbound() > self.cfg.reserved_outbound())
                .then(|| youngest(Direction::Outbound))
                .flatten()
        })
    }

    /// Closes `peer`'s connections on our initiative and records it as
    /// disconnected at once.
    fn close_link(&mut self, peer: &NodeId, d: Disconnect, lost: bool, now: Instant) {
        let Some(e) = self.entries.get_mut(peer) else {
            return;
        };
        let Some(link) = e.link.take() else {
            return;
        };
        let since = link.connected_at;
        e.vouched = now;
        for conn in std::iter::once(link.conn).chain(link.extra.into_iter().map(|(c, _)| c)) {
            self.conns.remove(&conn);
            self.actions.push(Action::Close {
                conn,
                disconnect: d.clone(),
            });
        }
        e.lost_at = lost.then_some(now);
        let to = e.idle_state();
        e.set_state(to, &mut self.actions);
        let route = e.route();
        self.actions.push(route);
        self.actions.push(Action::Event(PeerEvent::Disconnected {
            peer: peer.clone(),
            reason: CloseReason::Local {
                reason: d.reason_or_unspecified(),
                message: d.message,
            },
        }));
        if lost {
            self.note_lost_link(peer, Some(since), now);
        }
    }

    /// Disconnects `peer` on the operator's request. False if not connected.
    pub(crate) fn disconnect(&mut self, peer: &NodeId, now: Instant) -> bool {
        let jitter = self.jitter();
        let Some(e) = self.entries.get_mut(peer) else {
            return false;
        };
        if e.link.is_none() {
            return false;
        }
        e.next_attempt = now + e.backoff.fail(jitter);
        let d = Disconnect::new(DisconnectReason::Other, "disconnected by operator");
        self.close_link(peer, d, false, now);
        true
    }

    /// Refuses `peer` for `duration` and disconnects it.
    pub(crate) fn ban(&mut self, peer: &NodeId, duration: Duration, now: Instant) {
        let d = Disconnect::new(DisconnectReason::Banned, "banned");
        self.ban_with(peer, duration, d, now);
    }

    fn ban_with(&mut self, peer: &NodeId, duration: Duration, d: Disconnect, now: Instant) {
        let until = now + duration.min(crate::FOREVER);
        if !self.ensure_entry(peer, now) {
            return;
        }
        if let Some(e) = self.entries.get_mut(peer) {
            e.banned_until = Some(until);
        }
        self.close_link(peer, d, false, now);
        if let Some(e) = self.entries.get_mut(peer) {
            e.set_state(PeerState::Banned, &mut self.actions);
        }
        self.actions.push(Action::Ban {
            node: peer.clone(),
            duration,
        });
    }

    /// Lifts a ban.
    pub(crate) fn unban(&mut self, peer: &NodeId) {
        if let Some(e) = self.entries.get_mut(peer) {
            e.banned_until = None;
            let to = e.idle_state();
            e.set_state(to, &mut self.actions);
        }
        if !self.blocked.contains(peer) {
            self.actions.push(Action::Unban { node: peer.clone() });
        }
    }

    /// Fault injection: drops the link to `peer` as if the network broke,
    /// and refuses it until [`unblock`](Self::unblock).
    pub(crate) fn block(&mut self, peer: &NodeId, now: Instant) {
        self.blocked.insert(peer.clone());
        let d = Disconnect::new(DisconnectReason::NotAllowed, "blocked");
        self.close_link(peer, d, true, now);
        self.actions.push(Action::Ban {
            node: peer.clone(),
            duration: BLOCK_FOREVER,
        });
    }

    /// Ends a [`block`](Self::block); the peer may be redialled at once.
    pub(crate) fn unblock(&mut self, peer: &NodeId, now: Instant) {
        if !self.blocked.remove(peer) {
            return;
        }
        if let Some(e) = self.entries.get_mut(peer) {
            e.next_attempt = now;
            e.backoff.reset();
            if e.ever_connected && e.link.is_none() {
                e.lost_at = Some(now);
            }
        }
        if self
            .entries
            .get(peer)
            .is_none_or(|e| e.banned_until.is_none())
        {
            self.actions.push(Action::Unban { node: peer.clone() });
        }
    }

    /// Peers blocked by [`block`](Self::block).
    pub(crate) fn blocked(&self) -> Vec<NodeId> {
        self.blocked.iter().cloned().collect()
    }

    /// Stops dialling and accepting.
    pub(crate) fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    // ----- time --------------------------------------------------------

    /// Advances time: heartbeats and liveness, bans, discovery, dials.
    /// `heard` gives, per connection, when the transport last received
    /// anything on it.
    pub(crate) fn poll(&mut self, now: Instant, heard: &HashMap<ConnId, Instant>) {
        if self.shutting_down {
            return;
        }
        self.poll_held(now);
        self.poll_liveness(now, heard);
        self.poll_bans(now);
        self.poll_forget(now);
        if now >= self.next_discovery {
            self.next_discovery = now + self.cfg.discovery_interval;
            self.gossip(now);
        }
        self.poll_dials(now);
        self.poll_ask(now);
    }

    /// Forgets, unless linked or being dialled: peers that said they shut
    /// down `lost_peer_retry` ago and have not linked since (unless a
    /// seed's node), and entries nobody has vouched for within
    /// `lost_peer_retry` (no node linked to them since, as far as discovery
    /// told us), save the peers we lost ourselves (redialled, then felt
    /// for, to rejoin healed partitions; a seed's node lost so among them)
    /// and banned ones. An operator's run found the old ids of nodes
    /// restarted with fresh keys listed, and passed around, for good. One
    /// that comes back dials in, or is heard of again. A seed's node we
    /// never linked to (its answer found the pool full) goes too: its seed
    /// is dialled by address as before, and such a seed restarted with a
    /// fresh id left its old one `known` for good.
    fn poll_forget(&mut self, now: Instant) {
        let after = self.cfg.lost_peer_retry;
        let seeds: HashSet<&NodeId> = self.seeds.iter().filter_map(|s| s.node.as_ref()).collect();
        let gone: Vec<NodeId> = self
            .entries
            .values()
            .filter(|e| {
                let said_goodbye = !seeds.contains(&e.id)
                    && e.goodbye_at
                        .is_some_and(|t| now.saturating_duration_since(t) >= after);
                let unvouched =
                    e.lost_at.is_none() && e.banned_until.is_none() && e.age(now) >= after;
                e.link.is_none() && e.dialing.is_none() && (said_goodbye || unvouched)
            })
            .map(|e| e.id.clone())
            .collect();
        for id in gone {
            self.entries.remove(&id);
        }
    }

    fn poll_liveness(&mut self, now: Instant, heard: &HashMap<ConnId, Instant>) {
        let timing = self.cfg.heartbeat;
        let mut dead = Vec::new();
        for e in self.entries.values_mut() {
            let Some(link) = e.link.as_mut().filter(|l| l.held.is_none()) else {
                continue;
            };
            if let Some(t) = heard.get(&link.conn) {
                link.last_heard = link.last_heard.max(*t);
            }
            let last_heard = link.last_heard;
            let conn = link.conn;
            // A peer that tells its count is asked for it (a Ping) when
            // its last word is older than the slowest heartbeat of a quiet
            // link: on a busy link no heartbeat goes out, and a count
            // heard long ago says nothing of whether it can spare the link.
            let count_due = link
                .count
                .is_some_and(|(_, at)| now.saturating_duration_since(at) >= timing.max_interval);
            let ping = link.heartbeat.poll_ping(&timing, last_heard, now)
                || (count_due && link.heartbeat.poll_every(timing.max_interval, now));
            match Heartbeat::liveness(&timing, last_heard, now) {
                Liveness::Alive => {
                    if e.state == PeerState::Unresponsive {
                        e.set_state(PeerState::Connected, &mut self.actions);
                        self.actions.push(e.route());
                    }
                }
                Liveness::Unresponsive => {
                    if e.state == PeerState::Connected {
                        if let Some(link) = e.link.as_mut() {
                            link.heartbeat.reset(&timing);
                        }
                        e.set_state(PeerState::Unresponsive, &mut self.actions);
                        self.actions.push(e.route());
                    }
                }
                Liveness::Dead => {
                    dead.push(e.id.clone());
                    continue;
                }
            }
            if ping {
                self.actions.push(Action::Ping { conn });
            }
        }
        for id in dead {
            let jitter = self.jitter();
            if let Some(e) = self.entries.get_mut(&id) {
                e.next_attempt = now + e.backoff.fail(jitter);
            }
            let silence = timing.dead_after;
            let d = Disconnect::new(
                DisconnectReason::Timeout,
                format!("nothing received for {silence:?}"),
            );
            self.close_link(&id, d, true, now);
        }
    }

    fn poll_bans(&mut self, now: Instant) {
        for e in self.entries.values_mut() {
            if e.banned_until.is_some_and(|t| t <= now) {
                e.banned_until = None;
                let to = e.idle_state();
                e.set_state(to, &mut self.actions);
            }
        }
    }

    /// Sends every peer a sample of the address book.
    fn gossip(&mut self, now: Instant) {
        let linked: Vec<(NodeId, ConnId)> = self
            .entries
            .values()
            .filter_map(|e| e.link.as_ref().map(|l| (e.id.clone(), l.conn)))
            .collect();
        for (id, conn) in linked {
            let sample = self.sample(&id, self.cfg.discovery_sample, now);
            if !sample.is_empty() {
                let message = Message::Discovered(Discovered { peers: sample });
                self.actions.push(Action::Send { conn, message });
            }
        }
    }

    /// A node below `min_peers` with no dial in flight has no one left to
    /// dial: it asks its peers who they know (an empty `Discovered`, which
    /// they answer with a sample of their books) rather than wait for their
    /// gossip. Otherwise a node whose seed knew nobody when it joined heard
    /// of those who joined after it only at the seed's next gossip, a
    /// discovery interval (30 s) later. The first ask goes 0.5 to 1 s after
    /// the last new link, the next ones twice as far apart each time, up to
    /// the discovery interval; a new link starts the schedule again. An ask
    /// that falls due while a dial is in flight (or at `min_peers`) waits
    /// until there is none (or the node is below again).
    fn poll_ask(&mut self, now: Instant) {
        if now < self.next_ask || !self.dials.is_empty() {
            return;
        }
        let linked: Vec<ConnId> = self
            .entries
            .values()
            .filter_map(|e| e.link.as_ref().map(|l| l.conn))
            .collect();
        if linked.is_empty() || linked.len() >= self.cfg.target() {
            return;
        }
        let jitter = self.jitter();
        self.next_ask = now + self.ask_backoff.fail(jitter);
        for conn in linked {
            let message = Message::Discovered(Discovered::default());
            self.actions.push(Action::Send { conn, message });
        }
    }

    /// Up to `n` random entries worth telling `to` about: connected peers and
    /// book entries that have not failed, vouched for within the lost-peer
    /// window, each with its age.
    fn sample(&mut self, to: &NodeId, n: usize, now: Instant) -> Vec<PeerInfo> {
        let window = self.cfg.lost_peer_retry;
        let mut pick: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| {
                e.id != *to
                    && !e.addrs.is_empty()
                    && e.banned_until.is_none()
                    && e.goodbye_at.is_none()
                    && (e.link.is_some() || (e.dial_failures == 0 && e.age(now) < window))
            })
            .collect();
        pick.shuffle(&mut self.rng);
        pick.truncate(n);
        pick.into_iter().map(|e| peer_info(e, now)).collect()
    }

    /// Other peers to suggest to a node we refuse: connected ones first.
    fn alternatives(&mut self, refused: &NodeId, now: Instant) -> Vec<PeerInfo> {
        let n = self.cfg.alternatives;
        let mut linked: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| e.id != *refused && e.link.is_some() && !e.addrs.is_empty())
            .collect();
        linked.shuffle(&mut self.rng);
        linked.truncate(n);
        let mut out: Vec<PeerInfo> = linked.into_iter().map(|e| peer_info(e, now)).collect();
        if out.len() < n {
            let more = self.sample(refused, n, now);
            for p in more {
                if out.len() < n && !out.iter().any(|o| o.node_id == p.node_id) {
                    out.push(p);
                }
            }
        }
        out
    }

    fn poll_dials(&mut self, now: Instant) {
        self.poll_lost_seeds(now);
        let c = self.counts();
        // Slots the gate holds for incoming handshakes are not ours to dial,
        // as far as the inbound share has room (a peer let through to take
        // a slot from someone needs none, and must not stop our dials).
        self.gated.retain(|_, (until, _)| *until > now);
        let held = self
            .gated
            .len()
            .min(self.cfg.inbound_limit().saturating_sub(c.inbound));
        let busy = c.linked + c.pending_dials + held;
        let room = self
            .cfg
            .max_peers
            .saturating_sub(busy)
            .min(self.cfg.max_pending_dials.saturating_sub(c.pending_dials));
        if room == 0 {
            if c.pending_dials == 0 && c.linked >= self.cfg.max_peers {
                self.poll_swap(now);
            }
            return;
        }
        let mut want = self.cfg.target().saturating_sub(busy);
        let outbound = c.outbound + c.pending_dials;
        want = want.max(self.cfg.reserved_outbound().saturating_sub(outbound));
        // Replacements of lost links first (see `poll_replacements`): a
        // dial to one of the lost peer's own peers is one the pool wanted
        // anyway when the loss left it short, not one more on top.
        let replaced = self.poll_replacements(now, room);
        let want = want.min(room).saturating_sub(replaced);

        let linked_or_dialing: HashSet<NodeId> = self
            .entries
            .values()
            .filter(|e| e.link.is_some() || e.dialing.is_some())
            .map(|e| e.id.clone())
            .collect();
        // Candidates: book entries and seeds whose node we are not linked to.
        let mut entries: Vec<NodeId> = self
            .entries
            .values()
            .filter(|e| e.dialable(now, &self.blocked))
            .map(|e| e.id.clone())
            .collect();
        let mut seeds: Vec<usize> = (0..self.seeds.len())
            .filter(|&i| {
                let s = &self.seeds[i];
                s.dialing.is_none()
                    && s.next_attempt <= now
                    && s.node.as_ref().is_none_or(|n| {
                        // A seed whose node we know follows that node's backoff.
                        !linked_or_dialing.contains(n)
                            && !self.blocked.contains(n)
                            && self
                                .entries
                                .get(n)
                                .is_none_or(|e| e.next_attempt <= now && e.banned_until.is_none())
                    })
            })
            .collect();
        entries.shuffle(&mut self.rng);
        seeds.shuffle(&mut self.rng);

        let mut started = 0;
        if want > 0 {
            // With no peer at all, seeds come first; otherwise a random mix,
            // so that a mesh seeded by one node does not all pile onto it.
            // Either way, nodes we were connected to before come before
            // nodes only heard of (the book can be filled with hearsay; a
            // pool whose outbound dials go to hearsay alone can be captured
            // by whoever tells the most), as long as their dials have not
            // failed since. Entries whose dials fail come last, fewest
            // failures first: departed peers are kept (to rejoin healed
            // partitions) and, retried at every backoff, they would
            // otherwise keep the pool from ever dialling a live node.
            let failures = |id: &NodeId| self.entries.get(id).map_or(0, |e| e.dial_failures);
            let (fresh, mut failing): (Vec<NodeId>, Vec<NodeId>) =
                entries.iter().cloned().partition(|id| failures(id) == 0);
            // A stable sort of a shuffled list: ties stay in random order.
            failing.sort_by_key(|id| failures(id));
            let (tried, heard): (Vec<NodeId>, Vec<NodeId>) = fresh
                .into_iter()
                .partition(|id| self.entries.get(id).is_some_and(|e| e.ever_connected));
            let mut order: Vec<Result<usize, NodeId>> = Vec::new();
            if c.linked == 0 {
                order.extend(seeds.iter().map(|&i| Ok(i)));
                order.extend(tried.into_iter().map(Err));
                order.extend(heard.into_iter().map(Err));
            } else {
                let mut rest: Vec<Result<usize, NodeId>> = heard.into_iter().map(Err).collect();
                rest.extend(seeds.iter().map(|&i| Ok(i)));
                rest.shuffle(&mut self.rng);
                order.extend(tried.into_iter().map(Err));
                order.extend(rest);
            }
            order.extend(failing.into_iter().map(Err));
            for pick in order {
                if started == want {
                    break;
                }
                let ok = match pick {
                    Ok(i) => self.dial_seed(i, false),
                    Err(id) => self.dial_entry(&id, false),
                };
                if ok {
                    started += 1;
                }
            }
        }
        started += replaced;
        // Peers whose link broke recently are redialled while there is room,
        // even above min_peers: that is what rejoins a healed partition.
        let window = self.cfg.lost_peer_retry;
        let lost_for = |e: &Entry| {
            (e.dialing.is_none() && e.link.is_none())
                .then_some(e.lost_at?)
                .map(|t| now.saturating_duration_since(t))
        };
        for id in &entries {
            if started >= room {
                break;
            }
            let lost = self
                .entries
                .get(id)
                .and_then(lost_for)
                .is_some_and(|d| d < window);
            if lost && self.dial_entry(id, false) {
                started += 1;
            }
        }
        // Past the window, a feeler: one of those peers is redialled per
        // interval, so that the halves of a longer partition meet again too
        // (at the cost of one dial per interval to a peer that is gone).
        let every = self.cfg.feeler_interval;
        if !every.is_zero() && started < room && now >= self.next_feeler {
            self.next_feeler = now + every;
            let old = entries.iter().find(|id| {
                self.entries
                    .get(*id)
                    .and_then(lost_for)
                    .is_some_and(|d| d >= window)
            });
            if let Some(id) = old.cloned() {
                self.dial_entry(&id, false);
            }
        }
    }

    /// Seeds whose node was lost within the lost-peer window are redialled
    /// when due (at most every lost-peer backoff, see
    /// [`lost_redial_cap`](Self::lost_redial_cap)) even by a full pool, as
    /// long as dials may be started. Nodes that restart together with
    /// fresh ids and whose own seeds restarted with them know only each
    /// other: the nodes that seed them are who join them to the mesh again,
    /// and a full pool never dialled (a 2/3 chain of `meshwork node`
    /// processes: nodes 0 and 1 stayed a mesh of their own for 30 s to
    /// over 3 minutes, their only seeder full). A restarted seed answering
    /// with a fresh id finds the full pool refusing it, with alternatives:
    /// those it dials. One answering with its old id takes the youngest
    /// link's place, as a swap's peer does ([`room_victim`](Self::room_victim)).
    /// The cost is bounded by the seeds: one dial per seed per lost-peer
    /// backoff, for the window.
    fn poll_lost_seeds(&mut self, now: Instant) {
        let window = self.cfg.lost_peer_retry;
        let due: Vec<usize> = (0..self.seeds.len())
            .filter(|&i| {
                let s = &self.seeds[i];
                s.dialing.is_none()
                    && s.next_attempt <= now
                    && s.node.as_ref().is_some_and(|n| {
                        !self.blocked.contains(n)
                            && self.entries.get(n).is_some_and(|e| {
                                e.link.is_none()
                                    && e.dialing.is_none()
                                    && e.banned_until.is_none()
                                    && e.next_attempt <= now
                                    && e.lost_at
                                        .is_some_and(|t| now.saturating_duration_since(t) < window)
                            })
                    })
            })
            .collect();
        for i in due {
            let c = self.counts();
            if c.pending_dials >= self.cfg.max_pending_dials {
                break;
            }
            // Only a full pool's redial may take a link's place: one made
            // with room is a dial into free room like any other.
            let full = c.linked >= self.cfg.max_peers;
            if !self.dial_seed(i, full) {
                continue;
            }
            // The next redial is scheduled now, whatever this one's end: a
            // dial that connects but finds no slot to swap ends without a
            // failure to back off from, and the seed would be due again at
            // once (a busy loop: the 52-node sync chaos test, on a paused
            // clock, never got past its second round).
            let wait = self.lost_peer_wait();
            self.seeds[i].next_attempt = now + wait;
            if full {
                self.swaps += 1;
            }
        }
    }

    /// A full pool dials nobody, so once the halves of a saturated mesh
    /// have refilled their pools inside themselves, a heal alone would not
    /// join them again. Once per feeler interval, a full pool dials one
    /// peer it lost (at any age) that it had dialled itself and was linked
    /// to before its youngest link was made; if the dial succeeds, the peer takes that link's slot
    /// (`on_connection`, [`room_victim`](Self::room_victim)), and the peer
    /// takes ours the same way if it is full. A dial that fails changes
    /// nothing.
    fn poll_swap(&mut self, now: Instant) {
        let every = self.cfg.feeler_interval;
        if every.is_zero() || now < self.next_swap {
            return;
        }
        // Jittered (half to one and a half intervals), so that nodes that
        // started together do not dial each other in step.
        let jitter = self.jitter();
        self.next_swap = now + every.mul_f64(0.5 + jitter);
        let Some(youngest) = self
            .entries
            .values()
            .filter(|e| e.live_link().is_some())
            .filter_map(|e| e.first_linked)
            .max()
        else {
            return;
        };
        let mut lost: Vec<NodeId> = self
            .entries
            .values()
            .filter(|e| {
                e.lost_at.is_some()
                    && e.chosen
                    && e.first_linked.is_some_and(|t| t < youngest)
                    && e.dialable(now, &self.blocked)
            })
            .map(|e| e.id.clone())
            .collect();
        lost.sort();
        if let Some(id) = lost.choose(&mut self.rng).cloned() {
            self.swaps += 1;
            self.dial_entry(&id, true);
        }
    }

    /// Starts a dial; `may_evict` as in [`Dial::may_evict`].
    fn new_dial(
        &mut self,
        addr: Address,
        node: Option<NodeId>,
        seed: Option<Address>,
        may_evict: bool,
    ) -> DialId {
        let dial = self.next_dial;
        self.next_dial += 1;
        self.actions.push(Action::Dial {
            dial,
            addr: addr.clone(),
        });
        self.dials.insert(
            dial,
            Dial {
                addr,
                node,
                seed,
                may_evict,
            },
        );
        dial
    }

    fn dial_entry(&mut self, id: &NodeId, may_evict: bool) -> bool {
        let Some(e) = self.entries.get(id) else {
            return false;
        };
        if e.link.is_some() || e.dialing.is_some() || e.addrs.is_empty() {
            return false;
        }
        // Rotate through the addresses as dials fail.
        let addr = e.addrs[e.dial_failures as usize % e.addrs.len()].clone();
        let dial = self.new_dial(addr, Some(id.clone()), None, may_evict);
        if let Some(e) = self.entries.get_mut(id) {
            e.dialing = Some(dial);
            e.set_state(PeerState::Connecting, &mut self.actions);
        }
        true
    }

    fn dial_seed(&mut self, i: usize, may_evict: bool) -> bool {
        let Some(seed) = self.seeds.get(i) else {
            return false;
        };
        let (addr, node) = (seed.addr.clone(), seed.node.clone());
        if let Some(n) = &node {
            if let Some(e) = self.entries.get(n) {
                if e.link.is_some() || e.dialing.is_some() {
                    return false;
                }
            }
        }
        // A seed whose node is known is dialled as that node too: its
        // entry is dialling, and a failure backs both off (otherwise the
        // entry, due on its own clock, dialled the same address again at
        // once: two dials, and two warnings, per round).
        let known = node.filter(|n| self.entries.contains_key(n));
        let dial = self.new_dial(addr.clone(), known.clone(), Some(addr), may_evict);
        if let Some(seed) = self.seeds.get_mut(i) {
            seed.dialing = Some(dial);
        }
        if let Some(e) = known.and_then(|n| self.entries.get_mut(&n)) {
            e.dialing = Some(dial);
            e.set_state(PeerState::Connecting, &mut self.actions);
        }
        true
    }

    // ----- queries -----------------------------------------------------

    /// The seeds, in the order configured.
    pub(crate) fn seed_snapshots(&self, now: Instant) -> Vec<SeedSnapshot> {
        self.seeds
            .iter()
            .map(|s| {
                let connected = s.node.as_ref().is_some_and(|n| self.is_linked(n));
                // A seed whose node is known follows that node's backoff, and
                // is being dialled when that node is.
                let entry = s.node.as_ref().and_then(|n| self.entries.get(n));
                let due = entry.map_or(s.next_attempt, |e| s.next_attempt.max(e.next_attempt));
                let dialling = s.dialing.is_some() || entry.is_some_and(|e| e.dialing.is_some());
                SeedSnapshot {
                    addr: s.addr.clone(),
                    node_id: s.node.clone(),
                    connected,
                    failures: s.failures,
                    last_error: s.last_error.clone(),
                    next_dial_in: (!connected && !dialling)
                        .then(|| due.saturating_duration_since(now)),
                }
            })
            .collect()
    }

    /// Every known peer, connected ones first, then by id.
    pub(crate) fn snapshot(&self, now: Instant) -> Vec<PeerSnapshot> {
        let mut all: Vec<PeerSnapshot> = self
            .entries
            .values()
            .map(|e| e.snapshot(now, self.cfg.failure_memory))
            .collect();
        all.sort_by(|a, b| {
            (!a.state.is_linked(), &a.node_id).cmp(&(!b.state.is_linked(), &b.node_id))
        });
        all
    }

    /// One peer.
    /// Whether `id` is banned now.
    pub(crate) fn is_banned(&self, id: &NodeId, now: Instant) -> bool {
        self.entries
            .get(id)
            .and_then(|e| e.banned_until)
            .is_some_and(|until| now < until)
    }

    pub(crate) fn peer(&self, id: &NodeId, now: Instant) -> Option<PeerSnapshot> {
        self.entries
            .get(id)
            .map(|e| e.snapshot(now, self.cfg.failure_memory))
    }

    /// A responsive peer passing `filter`, chosen at random weighted by
    /// score; with `least_failed`, only among those with the fewest errors
    /// and timeouts.
    pub(crate) fn choose(
        &mut self,
        now: Instant,
        least_failed: bool,
        filter: impl Fn(&PeerSnapshot) -> bool,
    ) -> Option<PeerSnapshot> {
        let mut pool: Vec<PeerSnapshot> = self
            .entries
            .values()
            .filter(|e| e.state == PeerState::Connected && !e.is_held())
            .map(|e| e.snapshot(now, self.cfg.failure_memory))
            .filter(|s| filter(s))
            .collect();
        if least_failed {
            let fewest = pool.iter().map(|s| s.errors + s.timeouts).min()?;
            pool.retain(|s| s.errors + s.timeouts == fewest);
        }
        // HashMap order is arbitrary; sort so a seeded rng picks reproducibly.
        pool.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let weights: Vec<f64> = pool.iter().map(|s| s.score).collect();
        let i = weighted_choice(&weights, &mut self.rng)?;
        Some(pool.swap_remove(i))
    }

    /// The seed addresses still in use (ours are dropped).
    #[cfg(test)]
    fn seed_addrs(&self) -> Vec<Address> {
        self.seeds.iter().map(|s| s.addr.clone()).collect()
    }
}

#[cfg(test)]
mod tests;
