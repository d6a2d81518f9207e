use meshwork_rpc::service;

#[service]
pub struct Calc;

fn main() {}
