use meshwork_rpc::service;

#[service]
pub trait Store {
    async fn put(&self, value: u8) where Self: Sized;
}

fn main() {}
