use meshwork_rpc::service;

#[service]
pub trait Factory {
    async fn make(size: u32) -> Vec<u8>;
}

fn main() {}
