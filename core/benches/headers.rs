//! Building a message's headers: a few, as most messages carry, and 4,096 distinct
//! ones, RabbitMQ's limit, as a hostile producer may send.
//!
//! `cargo bench -p redrive-core --bench headers` reports the time to insert them all
//! into fresh `Headers` with RabbitMQ's limits.
// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redrive_core::{HeaderLimits, Headers};

fn insert(c: &mut Criterion) {
    let limits = HeaderLimits {
        max_count: 4096,
        max_bytes: 1 << 20,
    };
    let mut group = c.benchmark_group("headers_insert");
    for n in [8usize, 4096] {
        let names: Vec<String> = (0..n).map(|i| format!("x-header-{i:05}")).collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &names, |b, names| {
            b.iter(|| {
                let mut h = Headers::with_limits(limits);
                for name in names {
                    h.insert(name.as_str(), "v").expect("within the limits");
                }
                h
            });
        });
    }
    group.finish();
}

criterion_group!(benches, insert);
criterion_main!(benches);
