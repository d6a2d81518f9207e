use meshwork_rpc::service;

#[service]
pub trait Greeter {
    async fn hello(&self) -> String {
        "hello".to_string()
    }
}

fn main() {}
