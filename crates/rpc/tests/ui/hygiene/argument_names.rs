//! Argument names that the server adapter's expansion also uses for its own
//! locals (`codec`, `args`, `method`, `v`, `e`) must still work: the
//! expansion should not capture them.

use meshwork_rpc::{Service, service};

#[service]
pub trait Names {
    async fn first(&self, codec: u32, args: String, method: bool) -> u32;
    async fn second(&self, client: u8, v: u8, e: u8) -> Result<u8, u8>;
}

struct Imp;

impl Names for Imp {
    async fn first(&self, codec: u32, _args: String, _method: bool) -> u32 {
        codec
    }
    async fn second(&self, client: u8, v: u8, e: u8) -> Result<u8, u8> {
        if e == 0 { Ok(client + v) } else { Err(e) }
    }
}

fn main() {
    assert_eq!(NamesServer::new(Imp).methods(), ["first", "second"]);
}
