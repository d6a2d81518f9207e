//! A chat room: `cargo run -p meshwork --example chat`.
//!
//! Four nodes in one process over loopback TCP. The first, `hub`, is the
//! seed the others join through; each member keeps a single link, to the
//! hub, so that messages between members are relayed by it.
//!
//! - the room is a topic: [`publish`](meshwork::concerns::Concerns::publish)
//!   on one node, every subscriber elsewhere receives it once;
//! - who is here is kept in the replicated map, one ephemeral key per member
//!   (`chat/members/{node id}` = name): a watch of the prefix says who
//!   joined and who left (a graceful shutdown removes the key at once, a
//!   crash within its ttl);
//! - a private message goes to one node by id
//!   ([`send_to`](meshwork::concerns::Context::send_to)), routed through
//!   other nodes when it is not a neighbour, to a concern of our own.
//!
//! `carol` leaves and comes back with the same identity; `alice` then
//! writes to her privately, through the hub.

#![allow(clippy::print_stdout)] // an example prints what it receives

use std::collections::HashMap;
use std::time::Duration;

use meshwork::concerns::{BoxError, Bytes, Concern, Context, Reply, Via, async_trait};
use meshwork::sync::ChangeKind;
use meshwork::{Address, Error, Identity, Node, NodeId};
use tokio::sync::mpsc;

const NETWORK: &str = "chat-example";
/// The room's topic.
const ROOM: &str = "chat/room";
/// Members: `chat/members/{node id}` = name.
const MEMBERS: &str = "chat/members/";
/// The command id of private messages (any id below 0xFFFF_0000).
const PRIVATE: u32 = 0x0c4a_7000;
/// How long any one step may take.
const WAIT: Duration = Duration::from_secs(10);

/// What a member saw, as it printed it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Seen {
    Message { from: String, text: String },
    Private { from: String, text: String },
    Joined(String),
    Left(String),
}

/// Every line printed: who saw what.
type Log = mpsc::UnboundedSender<(String, Seen)>;

/// Receives private messages (command `PRIVATE`) and hands them on.
struct Inbox(mpsc::UnboundedSender<(NodeId, Bytes)>);

#[async_trait]
impl Concern for Inbox {
    fn command(&self) -> u32 {
        PRIVATE
    }
    fn name(&self) -> &str {
        "chat-private"
    }
    // Private messages come direct or routed, never as a broadcast.
    fn accepts(&self, via: Via) -> bool {
        via != Via::Flooded
    }
    async fn on_request(
        &self,
        _ctx: &Context,
        from: &NodeId, // the origin, also when routed
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        let _ = self.0.send((from.clone(), payload));
        Ok(None)
    }
}

/// One member of the room: its node, and a task printing what it receives.
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) node: Node,
}

impl Member {
    /// Starts a node for `name` (a hub when `seed` is `None`), subscribes
    /// to the room and says it is here.
    pub(crate) async fn join(
        name: &str,
        identity: Identity,
        seed: Option<Address>,
        log: Log,
    ) -> Result<Member, Error> {
        let (inbox_tx, mut inbox) = mpsc::unbounded_channel();
        let mut builder = Node::builder(NETWORK)
            .identity(identity)
            .listen("tcp://127.0.0.1:0".parse()?)
            .concern(Inbox(inbox_tx))
            .min_peers(1);
        if let Some(seed) = &seed {
            builder = builder.seed(seed.clone()).max_peers(1);
        }
        let node = builder.start().await?;
        let mut room = node.concerns().subscribe(ROOM)?;
        let mut members = node.sync().watch(MEMBERS);
        if seed.is_some() {
            node.wait_for_peers(1, WAIT).await?;
        }
        let key = format!("{MEMBERS}{}", node.node_id());
        node.sync()
            .set_ephemeral(key, name.to_string(), Duration::from_secs(30))
            .await?;

        let me = name.to_string();
        tokio::spawn(async move {
            let mut names: HashMap<Bytes, String> = HashMap::new();
            let name_of = |names: &HashMap<Bytes, String>, id: &NodeId| {
                let key = Bytes::from(format!("{MEMBERS}{id}"));
                names.get(&key).cloned().unwrap_or_else(|| id.short())
            };
            loop {
                let seen = tokio::select! {
                    Some(p) = room.recv() => Seen::Message {
                        from: name_of(&names, &p.origin),
                        text: String::from_utf8_lossy(&p.payload).into(),
                    },
                    Some((from, text)) = inbox.recv() => Seen::Private {
                        from: name_of(&names, &from),
                        text: String::from_utf8_lossy(&text).into(),
                    },
                    change = members.recv() => match change {
                        // The owner refreshes its key now and then: a join
                        // is the first value of a key.
                        Ok(c) => match c.kind {
                            ChangeKind::Set(v) if !names.contains_key(&c.key) => {
                                let name = String::from_utf8_lossy(&v).to_string();
                                names.insert(c.key, name.clone());
                                Seen::Joined(name)
                            }
                            ChangeKind::Deleted => match names.remove(&c.key) {
                                Some(name) => Seen::Left(name),
                                None => continue,
                            },
                            _ => continue,
                        },
                        Err(meshwork::sync::SyncError::Lagged(_)) => continue,
                        Err(_) => break, // the node stopped
                    },
                    else => break,
                };
                println!("[{me}] {seen:?}");
                let _ = log.send((me.clone(), seen));
            }
        });
        Ok(Member {
            name: name.to_string(),
            node,
        })
    }

    /// Says `text` to the room.
    pub(crate) fn say(&self, text: &str) -> Result<(), Error> {
        self.node.concerns().publish(ROOM, text.to_string())?;
        Ok(())
    }

    /// Sends `text` to the member called `to` only.
    pub(crate) async fn tell(&self, to: &str, text: &str) -> Result<(), Error> {
        let id = self
            .node
            .sync()
            .prefixed(MEMBERS)
            .into_iter()
            .find(|(_, name)| name == to.as_bytes())
            .and_then(|(key, _)| {
                std::str::from_utf8(&key[MEMBERS.len()..])
                    .ok()?
                    .parse()
                    .ok()
            });
        let Some(id) = id else {
            return Err(Error::Application(format!("nobody called {to} is here")));
        };
        let ctx = self.node.concerns().context(PRIVATE);
        ctx.send_to(&id, text.to_string()).await?;
        Ok(())
    }
}

/// Everything the members saw, read as it comes.
pub(crate) struct Transcript {
    rx: mpsc::UnboundedReceiver<(String, Seen)>,
    pub(crate) lines: Vec<(String, Seen)>,
    /// Where [`wait`](Self::wait) starts looking.
    from: usize,
}

impl Transcript {
    /// From now on, [`wait`](Self::wait) looks only at lines read after
    /// those printed so far.
    pub(crate) fn mark(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            self.lines.push(line);
        }
        self.from = self.lines.len();
    }

    /// Waits until each of `who` has seen `what` (since the last mark).
    pub(crate) async fn wait(&mut self, who: &[&str], what: Seen) -> Result<(), Error> {
        let done = |lines: &[(String, Seen)]| {
            who.iter()
                .all(|w| lines.iter().any(|(n, s)| n == w && *s == what))
        };
        let read = async {
            while !done(&self.lines[self.from..]) {
                match self.rx.recv().await {
                    Some(line) => self.lines.push(line),
                    None => break,
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .map_err(|_| Error::Timeout(WAIT, "chat", format!("{who:?} to see {what:?}")))
    }

    /// Reads what is left once every member has stopped.
    pub(crate) async fn finish(mut self) -> Vec<(String, Seen)> {
        while let Some(line) = self.rx.recv().await {
            self.lines.push(line);
        }
        self.lines
    }
}

fn said(from: &str, text: &str) -> Seen {
    Seen::Message {
        from: from.into(),
        text: text.into(),
    }
}

/// The whole story; returns every line every member printed, and whether
/// alice and carol were neighbours when alice wrote to carol.
pub(crate) async fn run() -> Result<(Vec<(String, Seen)>, bool), Error> {
    let (log, rx) = mpsc::unbounded_channel();
    let mut transcript = Transcript {
        rx,
        lines: Vec::new(),
        from: 0,
    };
    let hub = Member::join("hub", Identity::generate(), None, log.clone()).await?;
    let seed = hub.node.listen_addrs()[0].clone(); // the port picked for port 0
    let carol_id = Identity::generate(); // kept to come back as the same node
    let alice = Member::join(
        "alice",
        Identity::generate(),
        Some(seed.clone()),
        log.clone(),
    )
    .await?;
    let bob = Member::join("bob", Identity::generate(), Some(seed.clone()), log.clone()).await?;
    let carol = Member::join("carol", carol_id.clone(), Some(seed.clone()), log.clone()).await?;
    let all = ["hub", "alice", "bob", "carol"];
    for name in all {
        transcript.wait(&all, Seen::Joined(name.into())).await?;
    }

    alice.say("hello room")?;
    transcript
        .wait(&["hub", "bob", "carol"], said("alice", "hello room"))
        .await?;
    bob.say("hi alice")?;
    transcript
        .wait(&["hub", "alice", "carol"], said("bob", "hi alice"))
        .await?;

    carol.node.shutdown().await;
    let here = ["hub", "alice", "bob"];
    transcript.wait(&here, Seen::Left("carol".into())).await?;
    alice.say("carol left")?;
    transcript
        .wait(&["hub", "bob"], said("alice", "carol left"))
        .await?;

    transcript.mark();
    let carol = Member::join("carol", carol_id, Some(seed), log.clone()).await?;
    transcript.wait(&here, Seen::Joined("carol".into())).await?;
    for name in all {
        transcript
            .wait(&["carol"], Seen::Joined(name.into()))
            .await?;
    }
    carol.say("I'm back")?;
    transcript.wait(&here, said("carol", "I'm back")).await?;

    let neighbours = alice.node.peers().is_neighbour(carol.node.node_id());
    alice.tell("carol", "welcome back").await?;
    let private = Seen::Private {
        from: "alice".into(),
        text: "welcome back".into(),
    };
    transcript.wait(&["carol"], private).await?;

    drop(log);
    for member in [alice, bob, carol, hub] {
        println!("{} leaves", member.name);
        member.node.shutdown().await;
    }
    Ok((transcript.finish().await, neighbours))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (lines, _) = run().await?;
    println!("{} lines seen in all", lines.len());
    Ok(())
}
