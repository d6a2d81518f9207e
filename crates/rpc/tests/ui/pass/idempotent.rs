//! `#[idempotent]` is accepted (and removed: the trait does not know it).

#![deny(warnings)]

use meshwork_rpc::{RpcError, Service, service};

#[service]
pub trait Store {
    /// Reads: safe to run twice.
    #[idempotent]
    async fn get(&self, key: String) -> Option<Vec<u8>>;
    async fn put(&self, key: String, value: Vec<u8>);
    #[idempotent]
    #[allow(unused_parens)]
    async fn len(&self) -> (u64);
}

struct Imp;

impl Store for Imp {
    async fn get(&self, _key: String) -> Option<Vec<u8>> {
        None
    }
    async fn put(&self, _key: String, _value: Vec<u8>) {}
    async fn len(&self) -> u64 {
        0
    }
}

#[allow(dead_code)]
async fn client_types(c: StoreClient) {
    let _: Result<Option<Vec<u8>>, RpcError> = c.get("k".into()).await;
    let _: Result<(), RpcError> = c.put("k".into(), vec![]).await;
    let _: Result<u64, RpcError> = c.len().await;
}

fn main() {
    assert_eq!(StoreServer::new(Imp).methods(), ["get", "put", "len"]);
    let _ = client_types;
}
