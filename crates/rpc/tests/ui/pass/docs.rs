//! Doc comments travel to the trait and the client, and everything the
//! macro generates is documented and Debug (the workspace lints).

#![deny(missing_docs, missing_debug_implementations, warnings)]

use meshwork_rpc::service;

/// A documented service.
#[service]
pub trait Documented {
    /// Says hello.
    ///
    /// In several paragraphs.
    async fn hello(&self, name: String) -> String;
    #[doc = "An attribute doc."]
    async fn bye(&self);
}

/// The implementation.
#[derive(Debug)]
pub struct Imp;

impl Documented for Imp {
    async fn hello(&self, name: String) -> String {
        format!("hello {name}")
    }
    async fn bye(&self) {}
}

/// Uses the client.
pub async fn use_client(c: DocumentedClient) {
    let _ = c.hello("x".into()).await;
    let _ = c.bye().await;
    let _ = c.clone().with_deadline(std::time::Duration::from_secs(1));
    let _ = c.client().service();
    let _ = format!("{c:?}");
}

fn main() {
    let server = DocumentedServer::new(Imp);
    let _ = format!("{server:?}");
    let _ = &server.0;
    let _ = use_client;
}
