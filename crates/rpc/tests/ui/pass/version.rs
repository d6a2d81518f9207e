//! `version = N` reaches the server adapter and the client.

#![deny(warnings)]

use meshwork_rpc::{Service, ServiceClient, service};

#[service(version = 2)]
pub trait Calc {
    async fn add(&self, a: i64, b: i64) -> i64;
}

#[service(version = 1)]
pub trait Explicit {
    async fn one(&self) -> u8;
}

#[service(version = 4_000_000_000,)]
pub trait Big {
    async fn big(&self) -> u8;
}

struct Imp;

impl Calc for Imp {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
}

impl Explicit for Imp {
    async fn one(&self) -> u8 {
        1
    }
}

impl Big for Imp {
    async fn big(&self) -> u8 {
        2
    }
}

fn main() {
    assert_eq!(CalcServer::new(Imp).version(), 2);
    assert_eq!(<CalcClient as ServiceClient>::VERSION, 2);
    assert_eq!(ExplicitServer::new(Imp).version(), 1);
    assert_eq!(<ExplicitClient as ServiceClient>::VERSION, 1);
    assert_eq!(BigServer::new(Imp).version(), 4_000_000_000);
    assert_eq!(<BigClient as ServiceClient>::VERSION, 4_000_000_000);
}
