//! A hostile client against the real gateway (issue 8, spec §7 e2): raw
//! sockets from `127.45.67.89`, recording echo upstreams, and for every case
//! the status answered *and* what the upstreams received: nothing, or the
//! sanitised request.
//!
//! - `findings`: one test (or more) per numbered finding of the issue;
//! - `held_up`: what already held and must keep holding;
//! - `limits`: slowloris, idle connections, the connection limit, bodies;
//! - `properties`: random addresses and spoofed headers (`PROPTEST_CASES`
//!   sets the count; SECURITY.md has the long run).

#[path = "../support/mod.rs"]
mod support;

mod findings;
mod held_up;
mod limits;
mod properties;
mod raw;
