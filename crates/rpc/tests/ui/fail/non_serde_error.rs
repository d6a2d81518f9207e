use meshwork_rpc::service;

#[derive(Debug)]
pub enum VaultError {
    Missing,
}

#[service]
pub trait Vault {
    async fn load(&self, id: u64) -> Result<u64, VaultError>;
}

fn main() {}
