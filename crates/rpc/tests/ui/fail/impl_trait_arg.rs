use meshwork_rpc::service;

#[service]
pub trait Text {
    async fn len(&self, s: impl AsRef<str>) -> usize;
}

fn main() {}
