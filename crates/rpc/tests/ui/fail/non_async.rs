use meshwork_rpc::service;

#[service]
pub trait Calc {
    async fn add(&self, a: i64, b: i64) -> i64;
    fn sub(&self, a: i64, b: i64) -> i64;
}

fn main() {}
