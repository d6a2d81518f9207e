//! The attribute through the facade (`meshwork::service`), served on a
//! facade node's RPC layer.

#![deny(warnings)]

use meshwork::rpc::{Rpc, RpcError};

#[meshwork::service]
pub trait Echo {
    async fn echo(&self, s: String) -> String;
}

struct Imp;

impl Echo for Imp {
    async fn echo(&self, s: String) -> String {
        s
    }
}

#[allow(dead_code)]
async fn wire_up(rpc: &Rpc) -> Result<String, RpcError> {
    rpc.serve("echo", EchoServer::new(Imp)).await?;
    let client: EchoClient = rpc.client("echo");
    client.echo("hi".into()).await
}

fn main() {
    let _ = wire_up;
}
