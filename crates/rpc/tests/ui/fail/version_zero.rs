use meshwork_rpc::service;

#[service(version = 0)]
pub trait Calc {
    async fn add(&self, a: i64, b: i64) -> i64;
}

fn main() {}
