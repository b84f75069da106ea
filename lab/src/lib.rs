//! stillpoint-lab: what runs Stillpoint on one machine without a cluster,
//! outside the product.
//!
//! - [`servers`]: real database server pairs (PostgreSQL, MariaDB, Redis;
//!   primary + replica), agents as processes, loop-mounted filesystems —
//!   shared by the demo, the benchmarks and the end-to-end tests.
//! - [`demo`]: the demo cluster (`stillpoint-lab demo`).
//! - [`bench`]: the benchmark suite (`stillpoint-lab bench`).
//! - [`cli`]: the `stillpoint-lab` command line (`stillpoint demo|bench`
//!   run it).
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod demo;
pub mod servers;
