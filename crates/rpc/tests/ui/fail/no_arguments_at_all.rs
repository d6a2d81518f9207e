use meshwork_rpc::service;

#[service]
pub trait Factory {
    async fn make() -> Vec<u8>;
}

fn main() {}
