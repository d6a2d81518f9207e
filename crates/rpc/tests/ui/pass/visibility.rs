//! Public, crate-visible and private traits; the generated items follow the
//! trait's visibility.

#![deny(warnings)]

mod api {
    use meshwork_rpc::service;

    #[service]
    pub trait Public {
        async fn a(&self) -> u8;
    }

    #[service]
    pub(crate) trait Crate {
        async fn b(&self) -> u8;
    }

    #[service]
    trait Private {
        async fn c(&self) -> u8;
    }

    pub(crate) struct Imp;

    impl Private for Imp {
        async fn c(&self) -> u8 {
            3
        }
    }

    #[allow(dead_code)]
    async fn private_client(c: PrivateClient) -> u8 {
        c.c().await.unwrap_or(0)
    }

    pub(crate) fn private_server() -> impl meshwork_rpc::Service {
        let _ = private_client;
        PrivateServer::new(Imp)
    }
}

use api::{CrateClient, CrateServer, Imp, PublicClient, PublicServer};
use meshwork_rpc::Service;

impl api::Public for Imp {
    async fn a(&self) -> u8 {
        1
    }
}

impl api::Crate for Imp {
    async fn b(&self) -> u8 {
        2
    }
}

#[allow(dead_code)]
async fn clients(p: PublicClient, c: CrateClient) {
    let _ = p.a().await;
    let _ = c.b().await;
}

fn main() {
    assert_eq!(PublicServer::new(Imp).methods(), ["a"]);
    assert_eq!(CrateServer::new(Imp).methods(), ["b"]);
    assert_eq!(api::private_server().methods(), ["c"]);
    let _ = clients;
}
