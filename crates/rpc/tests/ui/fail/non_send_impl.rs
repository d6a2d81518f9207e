use std::rc::Rc;

use meshwork_rpc::service;

#[service]
pub trait Calc {
    async fn add(&self, a: i64, b: i64) -> i64;
}

struct Imp;

impl Calc for Imp {
    async fn add(&self, a: i64, b: i64) -> i64 {
        let held = Rc::new(a);
        tokio::task::yield_now().await;
        *held + b
    }
}

fn main() {}
