use meshwork_rpc::service;

#[service]
pub trait Settings {
    async fn with_deadline(&self, ms: u64) -> bool;
}

fn main() {}
