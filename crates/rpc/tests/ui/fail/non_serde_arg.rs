use meshwork_rpc::service;

pub struct Opaque(pub u32);

#[service]
pub trait Vault {
    async fn store(&self, item: Opaque) -> u64;
}

fn main() {}
