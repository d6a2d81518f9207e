use meshwork_rpc::service;

#[service]
pub trait Calc: Clone {
    async fn add(&self, a: i64, b: i64) -> i64;
}

fn main() {}
