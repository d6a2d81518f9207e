use meshwork_rpc::service;

#[service]
pub trait Store {
    #[idempotent(always)]
    async fn get(&self, key: String) -> Option<Vec<u8>>;
}

fn main() {}
