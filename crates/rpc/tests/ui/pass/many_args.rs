//! Many arguments of many serde types, in and out.

#![deny(warnings)]

use std::collections::{BTreeMap, HashMap};

use meshwork_rpc::{RpcError, Service, service};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Shape {
    Circle { center: Point, radius: f64 },
    Polygon(Vec<Point>),
    Empty,
}

#[service]
pub trait Kitchen {
    #[allow(clippy::too_many_arguments)]
    async fn sink(
        &self,
        a: u8,
        b: i128,
        c: String,
        d: Vec<u8>,
        e: Option<Point>,
        f: HashMap<String, Vec<Shape>>,
        g: (bool, char),
        h: [u16; 4],
        mut i: BTreeMap<u32, Option<String>>,
    ) -> (usize, Shape);
    async fn bounds(&self, shapes: Vec<Shape>) -> Option<(Point, Point)>;
    async fn nested(&self, x: Vec<Vec<Option<Box<Shape>>>>) -> Vec<Vec<Option<Box<Shape>>>>;
}

struct Imp;

impl Kitchen for Imp {
    async fn sink(
        &self,
        a: u8,
        _b: i128,
        _c: String,
        _d: Vec<u8>,
        _e: Option<Point>,
        _f: HashMap<String, Vec<Shape>>,
        _g: (bool, char),
        _h: [u16; 4],
        i: BTreeMap<u32, Option<String>>,
    ) -> (usize, Shape) {
        (usize::from(a) + i.len(), Shape::Empty)
    }
    async fn bounds(&self, _shapes: Vec<Shape>) -> Option<(Point, Point)> {
        None
    }
    async fn nested(&self, x: Vec<Vec<Option<Box<Shape>>>>) -> Vec<Vec<Option<Box<Shape>>>> {
        x
    }
}

#[allow(dead_code)]
async fn client_types(c: KitchenClient) {
    let r: Result<(usize, Shape), RpcError> = c
        .sink(
            1,
            -2,
            "c".into(),
            vec![4],
            Some(Point { x: 0.0, y: 1.0 }),
            HashMap::new(),
            (true, 'x'),
            [1, 2, 3, 4],
            BTreeMap::new(),
        )
        .await;
    let _ = r;
    let _: Result<Option<(Point, Point)>, RpcError> = c.bounds(vec![]).await;
    let _: Result<Vec<Vec<Option<Box<Shape>>>>, RpcError> = c.nested(vec![]).await;
}

fn main() {
    let server = KitchenServer::new(Imp);
    assert_eq!(server.methods(), ["sink", "bounds", "nested"]);
    let _ = client_types;
    let _ = Shape::Circle {
        center: Point { x: 0.0, y: 0.0 },
        radius: 1.0,
    };
    let _ = Shape::Polygon(vec![]);
}
