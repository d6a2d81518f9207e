use meshwork_rpc::service;

#[service]
pub trait Geometry {
    async fn norm(&self, _: (f64, f64)) -> f64;
}

fn main() {}
