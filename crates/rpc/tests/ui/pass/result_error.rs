//! `Result<T, E>` methods: the client gets `RpcError<E>` with `E` typed.

#![deny(warnings)]

use meshwork_rpc::{NoError, RpcError, service};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BankError {
    Insufficient { wanted: u64, available: u64 },
    NoSuchAccount(String),
    Frozen,
}

#[service]
pub trait Bank {
    async fn withdraw(&self, account: String, amount: u64) -> Result<u64, BankError>;
    async fn close(&self, account: String) -> Result<(), BankError>;
    /// A fully qualified `Result` is fallible too.
    async fn audit(&self) -> std::result::Result<Vec<String>, String>;
    /// So is `core::result::Result`.
    async fn freeze(&self) -> core::result::Result<bool, BankError>;
    /// A result inside an option is a plain value.
    async fn peek(&self) -> Option<Result<u64, BankError>>;
}

struct Imp;

impl Bank for Imp {
    async fn withdraw(&self, account: String, amount: u64) -> Result<u64, BankError> {
        if account.is_empty() {
            return Err(BankError::NoSuchAccount(account));
        }
        Err(BankError::Insufficient {
            wanted: amount,
            available: 0,
        })
    }
    async fn close(&self, _account: String) -> Result<(), BankError> {
        Err(BankError::Frozen)
    }
    async fn audit(&self) -> Result<Vec<String>, String> {
        Ok(vec![])
    }
    async fn freeze(&self) -> Result<bool, BankError> {
        Ok(true)
    }
    async fn peek(&self) -> Option<Result<u64, BankError>> {
        None
    }
}

#[allow(dead_code)]
async fn client_types(c: BankClient) {
    let r: Result<u64, RpcError<BankError>> = c.withdraw("a".into(), 5).await;
    if let Err(RpcError::Application(BankError::Insufficient { wanted, available })) = r {
        let _ = (wanted, available);
    }
    let _: Result<(), RpcError<BankError>> = c.close("a".into()).await;
    let _: Result<Vec<String>, RpcError<String>> = c.audit().await;
    let _: Result<bool, RpcError<BankError>> = c.freeze().await;
    let _: Result<Option<Result<u64, BankError>>, RpcError<NoError>> = c.peek().await;
}

fn main() {
    let _ = BankServer::new(Imp);
    let _ = client_types;
}
