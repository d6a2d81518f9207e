//! The examples (`cargo run -p meshwork --example NAME`) run here, each
//! with a timeout, and what they did is checked: they cannot rot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

#[path = "../examples/chat.rs"]
#[allow(dead_code)] // its `main`
mod chat;

#[path = "../examples/cache.rs"]
#[allow(dead_code)] // its `main`
mod cache;

const LIMIT: Duration = Duration::from_secs(60);

/// Every message reaches every member present once, its sender and absent
/// members never; carol's leave and return are seen; the private message
/// reaches carol alone, through the hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_example_delivers_every_message_once() {
    use chat::Seen;
    let (lines, neighbours) = tokio::time::timeout(LIMIT, chat::run())
        .await
        .expect("the chat example hangs")
        .expect("the chat example fails");
    assert!(
        !neighbours,
        "alice and carol are neighbours: nothing was routed"
    );
    let mut seen: HashMap<(String, Seen), usize> = HashMap::new();
    for line in lines {
        *seen.entry(line).or_default() += 1;
    }
    let count = |who: &str, what: &Seen| {
        seen.get(&(who.to_string(), what.clone()))
            .copied()
            .unwrap_or(0)
    };
    let members = ["hub", "alice", "bob", "carol"];
    let expected: [(&str, &str, &[&str]); 4] = [
        ("alice", "hello room", &["hub", "bob", "carol"]),
        ("bob", "hi alice", &["hub", "alice", "carol"]),
        ("alice", "carol left", &["hub", "bob"]),
        ("carol", "I'm back", &["hub", "alice", "bob"]),
    ];
    for (from, text, to) in expected {
        let message = Seen::Message {
            from: from.into(),
            text: text.into(),
        };
        for member in members {
            let want = usize::from(to.contains(&member));
            assert_eq!(count(member, &message), want, "{member} saw {message:?}");
        }
    }
    let private = Seen::Private {
        from: "alice".into(),
        text: "welcome back".into(),
    };
    for member in members {
        let want = usize::from(member == "carol");
        assert_eq!(count(member, &private), want, "{member} saw {private:?}");
    }
    for member in ["hub", "alice", "bob"] {
        assert_eq!(count(member, &Seen::Joined("carol".into())), 2, "{member}");
        assert!(count(member, &Seen::Left("carol".into())) >= 1, "{member}");
    }
}

/// The call after its server stopped is answered by the other; the new
/// capacity is applied; the lock is held by one node at a time, and each
/// node got it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_example_fails_over_and_locks() {
    let outcome = tokio::time::timeout(LIMIT, cache::run())
        .await
        .expect("the cache example hangs")
        .expect("the cache example fails");
    assert_ne!(outcome.after_failover.server, outcome.stopped);
    assert_eq!(outcome.after_failover.value, "MESH");
    assert_eq!(outcome.size, (1, 1));
    assert_eq!(outcome.most_holders, 1);
    assert_eq!(outcome.compactions.len(), 6, "{:?}", outcome.compactions);
    for node in ["app", "cache-a", "cache-b"] {
        let n = outcome.compactions.iter().filter(|c| *c == node).count();
        assert_eq!(n, 2, "{node}: {:?}", outcome.compactions);
    }
}
