//! `Vec<u8>` arguments and results, however spelled, travel as byte
//! strings; the methods keep their plain types on both sides.

extern crate alloc;

use meshwork_rpc::service;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum StoreError {
    Missing,
}

#[service]
pub trait Store {
    async fn put(&self, key: String, value: Vec<u8>, meta: std::vec::Vec<u8>) -> u64;
    async fn get(&self, key: String) -> Result<alloc::vec::Vec<u8>, StoreError>;
    async fn raw(&self, value: Vec<u8>) -> Vec<u8>;
    async fn many(&self, values: Vec<Vec<u8>>) -> Option<Vec<u8>>;
}

pub struct Imp;

impl Store for Imp {
    async fn put(&self, _key: String, value: Vec<u8>, meta: Vec<u8>) -> u64 {
        (value.len() + meta.len()) as u64
    }
    async fn get(&self, _key: String) -> Result<Vec<u8>, StoreError> {
        Err(StoreError::Missing)
    }
    async fn raw(&self, value: Vec<u8>) -> Vec<u8> {
        value
    }
    async fn many(&self, values: Vec<Vec<u8>>) -> Option<Vec<u8>> {
        values.into_iter().next()
    }
}

pub async fn use_client(c: StoreClient) {
    let _: Result<u64, _> = c.put("k".into(), vec![1], vec![2]).await;
    let _: Result<Vec<u8>, meshwork_rpc::RpcError<StoreError>> = c.get("k".into()).await;
    let _: Result<Vec<u8>, _> = c.raw(vec![3]).await;
    let _: Result<Option<Vec<u8>>, _> = c.many(vec![vec![4]]).await;
}

fn main() {
    let _ = StoreServer::new(Imp);
}
