use meshwork_rpc::service;

#[service]
pub trait Nothing {}

fn main() {}
