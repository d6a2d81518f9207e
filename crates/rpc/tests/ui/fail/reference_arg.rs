use meshwork_rpc::service;

#[service]
pub trait Text {
    async fn len(&self, s: &str) -> usize;
}

fn main() {}
