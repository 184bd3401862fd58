//! The floor under a random-key lookup in a compiled consent snapshot: one
//! dependent read of a random 128-byte record of a mapped file, with nothing
//! else around it.
//!
//! ```text
//! cargo run --release --example random_read -- accounts.pgcs
//! ```
//!
//! Any file of the snapshot's size will do. `evaluate` with random keys
//! cannot cost less than its in-cache time plus this, whatever the layout;
//! the README's "Consent at internet scale" compares the two.

use std::fs::File;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

const RECORD: usize = 128;
const READS: usize = 2_000_000;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: random_read FILE");
        return ExitCode::from(2);
    };
    let map = match File::open(&path).and_then(|f| {
        // SAFETY: read-only mapping of a file nobody rewrites while this runs.
        unsafe { memmap2::Mmap::map(&f) }
    }) {
        Ok(map) => map,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = map.advise(memmap2::Advice::HugePage);
    let records = map.len() / RECORD;
    if records == 0 {
        eprintln!("{path}: smaller than one record");
        return ExitCode::FAILURE;
    }
    // Bring the whole file into the page cache and the mapping first.
    let touched: u64 = map.iter().step_by(4096).map(|&b| u64::from(b)).sum();
    black_box(touched);

    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 1..=3 {
        let started = Instant::now();
        let mut carry = 0u64;
        for _ in 0..READS {
            // xorshift, made dependent on the previous read's byte so that no
            // two reads overlap: each waits for the memory, as a lookup does.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let record = ((state ^ carry) % records as u64) as usize;
            carry = carry.wrapping_add(u64::from(map[record * RECORD]));
        }
        black_box(carry);
        let ns = started.elapsed().as_nanos() as f64 / READS as f64;
        println!(
            "round {round}: {ns:.0} ns per dependent random read of a {RECORD}-byte record, {} MiB file",
            map.len() >> 20
        );
    }
    ExitCode::SUCCESS
}
