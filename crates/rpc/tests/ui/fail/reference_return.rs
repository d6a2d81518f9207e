use meshwork_rpc::service;

#[service]
pub trait Text {
    async fn name(&self) -> &'static str;
}

fn main() {}
