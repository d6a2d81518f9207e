//! The generated client futures are `Send` (they can be spawned), clients
//! are `Clone + Send + Sync`, and a server is a `Service` usable as
//! `Arc<dyn Service>`.

#![deny(warnings)]

use std::sync::Arc;

use meshwork_rpc::{Service, service};

#[service]
pub trait Calc {
    async fn add(&self, a: u8, b: u8) -> u8;
    async fn div(&self, a: u8, b: u8) -> Result<u8, String>;
}

struct Imp;

impl Calc for Imp {
    async fn add(&self, a: u8, b: u8) -> u8 {
        a.wrapping_add(b)
    }
    async fn div(&self, a: u8, b: u8) -> Result<u8, String> {
        a.checked_div(b).ok_or_else(|| "division by zero".to_string())
    }
}

fn assert_send<T: Send>(_: &T) {}
fn assert_client<T: Clone + Send + Sync + 'static>() {}

#[allow(dead_code)]
fn client_futures_are_send(c: CalcClient) {
    assert_send(&c.add(1, 2));
    assert_send(&c.div(1, 2));
    // Spawnable, moving the client in.
    drop(tokio::spawn(async move { c.add(1, 2).await }));
}

fn main() {
    let server: Arc<dyn Service> = Arc::new(CalcServer::new(Imp));
    assert_eq!(server.methods(), ["add", "div"]);
    assert_client::<CalcClient>();
    let _ = client_futures_are_send;
}
