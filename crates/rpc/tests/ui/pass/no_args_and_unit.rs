//! Methods without arguments, and methods returning nothing.

#![deny(warnings)]

use meshwork_rpc::{RpcError, Service, ServiceClient, service};

#[service]
pub trait Heartbeat {
    async fn ping(&self);
    async fn uptime(&self) -> u64;
    async fn reset(&self) -> ();
    async fn touch(&self, times: u32);
}

struct Imp;

impl Heartbeat for Imp {
    async fn ping(&self) {}
    async fn uptime(&self) -> u64 {
        42
    }
    async fn reset(&self) {}
    async fn touch(&self, _times: u32) {}
}

/// The client's methods return `Result<T, RpcError>` (no application error).
#[allow(dead_code)]
async fn client_types(c: HeartbeatClient) {
    let _: Result<(), RpcError> = c.ping().await;
    let _: Result<u64, RpcError> = c.uptime().await;
    let _: Result<(), RpcError> = c.reset().await;
    let _: Result<(), RpcError> = c.touch(3).await;
}

fn main() {
    let server = HeartbeatServer::new(Imp);
    assert_eq!(server.methods(), ["ping", "uptime", "reset", "touch"]);
    assert_eq!(server.version(), 1);
    assert_eq!(<HeartbeatClient as ServiceClient>::VERSION, 1);
    let _ = client_types;
}
