use meshwork_rpc::service;

pub struct Opaque(pub u32);

#[service]
pub trait Vault {
    async fn load(&self, id: u64) -> Opaque;
}

fn main() {}
