//! The facade's errors: what their messages say, and what converts into
//! them with `?`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error as _;

use meshwork::rpc::RpcError;
use meshwork::transport::Address;
use meshwork::transport::mem::MemNetwork;
use meshwork::{Error, Node, service};
use serde::{Deserialize, Serialize};

/// The whole chain of `e`, as anyhow's `{:#}` prints it.
fn chain(e: &Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// A port in use on 127.0.0.1: the message says why the node cannot
/// listen there (it said only "cannot listen on tcp://127.0.0.1:39159",
/// the OS error being only its `source()`), and the chain says it once.
#[tokio::test]
async fn a_listen_error_says_why() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: Address = format!("tcp://{}", taken.local_addr().unwrap())
        .parse()
        .unwrap();
    let e = Node::builder("errors-test")
        .listen(addr.clone())
        .start()
        .await
        .unwrap_err();
    let Error::Listen { addr: at, cause } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(at, &addr);
    let why = cause.to_string();
    assert!(!why.is_empty());
    assert_eq!(e.to_string(), format!("cannot listen on {addr}: {why}"));
    assert_eq!(chain(&e).matches(&why).count(), 1, "{}", chain(&e));

    // The in-memory transport's refusal too.
    let net = MemNetwork::new();
    let _first = Node::builder("errors-test")
        .transport(net.transport("a"))
        .listen(Address::mem("a"))
        .start()
        .await
        .unwrap();
    let e = Node::builder("errors-test")
        .transport(net.transport("a"))
        .listen(Address::mem("a"))
        .start()
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot listen on mem://a: mem://a is already listening"),
        "{e}"
    );
    _first.shutdown().await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CalcError {
    DivideByZero { dividend: i64 },
}

#[service]
trait Calc {
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    async fn add(&self, a: i64, b: i64) -> i64;
}

struct Imp;

impl Calc for Imp {
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b)
            .ok_or(CalcError::DivideByZero { dividend: a })
    }
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
}

/// `?` on typed calls in a function returning `meshwork::Result`: it did
/// not compile for a method with an error type (only `RpcError<NoError>`
/// converted).
async fn divide_then_add(calc: &CalcClient, a: i64, b: i64) -> meshwork::Result<i64> {
    let q = calc.div(a, b).await?;
    Ok(calc.add(q, 1).await?)
}

#[tokio::test]
async fn any_calls_error_converts_into_the_facades() {
    let net = MemNetwork::new();
    let node = Node::builder("errors-test")
        .transport(net.transport("a"))
        .listen(Address::mem("a"))
        .start()
        .await
        .unwrap();
    node.rpc()
        .serve("calc", CalcServer::new(Imp))
        .await
        .unwrap();
    let calc: CalcClient = node.rpc().client("calc");
    assert_eq!(divide_then_add(&calc, 8, 2).await.unwrap(), 5);

    // The method's own error, as text: the same message as the call's.
    let call = calc.div(8, 0).await.unwrap_err();
    let e = divide_then_add(&calc, 8, 0).await.unwrap_err();
    assert!(
        matches!(&e, Error::Application(m) if m == "DivideByZero { dividend: 8 }"),
        "{e:?}"
    );
    assert_eq!(e.to_string(), call.to_string());
    assert!(e.source().is_none());

    // Any other error stays an RPC error.
    let nobody: CalcClient = node.rpc().client("nobody");
    let e = divide_then_add(&nobody, 8, 2).await.unwrap_err();
    assert!(
        matches!(&e, Error::Rpc(RpcError::NoProvider(name)) if name == "nobody"),
        "{e:?}"
    );
    // It says what to do about a call made before the entry arrived.
    assert_eq!(
        e.to_string(),
        r#"no provider for service "nobody" is listed here (one served on another node a moment ago is listed once its registry entry arrives: wait for it with wait_for_provider)"#
    );
    node.shutdown().await;
}

/// A node whose seed is on another network: the wait for peers runs out
/// and says why (it said only "timed out after 2s waiting for peers", the
/// cause being in `status().seeds[0].last_error` alone).
#[tokio::test(start_paused = true)]
async fn waiting_for_peers_in_vain_says_why() {
    let net = MemNetwork::new();
    let there = Node::builder("one-network")
        .transport(net.transport("there"))
        .listen(Address::mem("there"))
        .start()
        .await
        .unwrap();
    let lost = Node::builder("another-network")
        .transport(net.transport("lost"))
        .listen(Address::mem("lost"))
        .seed(Address::mem("there"))
        .start()
        .await
        .unwrap();
    let wait = std::time::Duration::from_secs(2);
    let e = lost.wait_for_peers(1, wait).await.unwrap_err();
    let Error::Timeout(after, "peers", detail) = &e else {
        panic!("{e:?}");
    };
    assert_eq!(*after, wait);
    let last = lost.status().seeds[0].last_error.clone().unwrap();
    assert!(last.contains("WrongNetwork"), "{last}");
    assert!(detail.contains(&last), "{detail}");
    let text = e.to_string();
    assert!(
        text.starts_with("timed out after 2s waiting for peers: 0 of 1 peers linked; seed mem://there: refused by peer (WrongNetwork)"),
        "{text}"
    );
    for node in [lost, there] {
        node.shutdown().await;
    }
}
