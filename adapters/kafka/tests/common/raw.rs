//! Records written to the broker byte for byte: a Produce request (version 3) carrying
//! one record batch (magic 2), over a plain TCP connection.
//!
//! Kafka takes any bytes as a header name, but every client API that builds headers
//! (rdkafka's `OwnedHeaders::insert` among them) takes a `&str`. Tests of records that
//! other producers can send (a header name that is not UTF-8, an empty one) write them
//! here. The format is the one the Kafka protocol guide gives for `RecordBatch`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One record: its key, value and headers, each header a name and a value (`None` is
/// a null value).
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Record {
    pub fn new(value: &str) -> Self {
        Record {
            value: value.as_bytes().to_vec(),
            ..Record::default()
        }
    }

    pub fn key(mut self, key: &str) -> Self {
        self.key = Some(key.as_bytes().to_vec());
        self
    }

    pub fn header(mut self, name: &[u8], value: &[u8]) -> Self {
        self.headers.push((name.to_vec(), Some(value.to_vec())));
        self
    }
}

/// Writes `records` to partition `partition` of `topic` as one batch, through the first
/// broker of `brokers` (the tests' brokers are single-node clusters, so it leads every
/// partition), and waits for the broker's acknowledgement. Panics with the broker's
/// error code if it refuses them.
pub async fn produce(brokers: &str, topic: &str, partition: i32, records: Vec<Record>) {
    let address = brokers
        .split(',')
        .next()
        .expect("a broker address")
        .trim()
        .to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || produce_blocking(&address, &topic, partition, &records))
        .await
        .expect("the raw producer ran");
}

fn produce_blocking(address: &str, topic: &str, partition: i32, records: &[Record]) {
    let batch = record_batch(records);
    let mut body = Vec::new();
    put_i16(&mut body, -1); // transactional id: null
    put_i16(&mut body, -1); // acks: all
    put_i32(&mut body, 10_000); // timeout, ms
    put_i32(&mut body, 1); // one topic
    put_str(&mut body, topic);
    put_i32(&mut body, 1); // one partition
    put_i32(&mut body, partition);
    put_i32(&mut body, len_i32(batch.len()));
    body.extend_from_slice(&batch);

    let mut request = Vec::new();
    put_i16(&mut request, 0); // API key: Produce
    put_i16(&mut request, 3); // API version
    put_i32(&mut request, 7); // correlation id
    put_str(&mut request, "redrive-raw-producer");
    request.extend_from_slice(&body);
    let mut frame = Vec::new();
    put_i32(&mut frame, len_i32(request.len()));
    frame.extend_from_slice(&request);

    let mut stream = TcpStream::connect(address)
        .unwrap_or_else(|e| panic!("connect to the Kafka broker at {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    stream.write_all(&frame).expect("send the Produce request");
    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .expect("the Produce response's size");
    let mut response = vec![0u8; usize::try_from(i32::from_be_bytes(size)).expect("a size")];
    stream
        .read_exact(&mut response)
        .expect("the Produce response");
    let mut r = Reader(&response);
    assert_eq!(r.i32(), 7, "correlation id");
    assert_eq!(r.i32(), 1, "one topic in the response");
    let name_len = usize::try_from(r.i16()).expect("a topic name");
    r.skip(name_len);
    assert_eq!(r.i32(), 1, "one partition in the response");
    assert_eq!(r.i32(), partition);
    let error = r.i16();
    assert_eq!(
        error, 0,
        "the broker refused the raw batch with error code {error}"
    );
}

/// A record batch, magic 2, with its CRC-32C.
fn record_batch(records: &[Record]) -> Vec<u8> {
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("milliseconds fit");
    let count = len_i32(records.len());
    // From `attributes` to the end: what the CRC covers.
    let mut tail = Vec::new();
    put_i16(&mut tail, 0); // attributes: no compression, create time
    put_i32(&mut tail, count - 1); // last offset delta
    put_i64(&mut tail, now); // base timestamp
    put_i64(&mut tail, now); // max timestamp
    put_i64(&mut tail, -1); // producer id
    put_i16(&mut tail, -1); // producer epoch
    put_i32(&mut tail, -1); // base sequence
    put_i32(&mut tail, count);
    for (delta, record) in records.iter().enumerate() {
        let mut r = Vec::new();
        r.push(0); // attributes
        put_varint(&mut r, 0); // timestamp delta
        put_varint(&mut r, i64::try_from(delta).expect("a delta"));
        put_bytes(&mut r, record.key.as_deref());
        put_bytes(&mut r, Some(&record.value));
        put_varint(&mut r, len_i64(record.headers.len()));
        for (name, value) in &record.headers {
            put_bytes(&mut r, Some(name));
            put_bytes(&mut r, value.as_deref());
        }
        put_varint(&mut tail, len_i64(r.len()));
        tail.extend_from_slice(&r);
    }
    let mut batch = Vec::new();
    put_i64(&mut batch, 0); // base offset (the broker assigns offsets)
    // Batch length: from the partition leader epoch to the end.
    put_i32(&mut batch, len_i32(4 + 1 + 4 + tail.len()));
    put_i32(&mut batch, -1); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c(&tail).to_be_bytes());
    batch.extend_from_slice(&tail);
    batch
}

/// CRC-32C (Castagnoli), bit by bit: test batches are small.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn len_i32(n: usize) -> i32 {
    i32::try_from(n).expect("a length that fits an i32")
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).expect("a length that fits an i64")
}

fn put_i16(buf: &mut Vec<u8>, v: i16) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_i32(buf: &mut Vec<u8>, v: i32) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_i64(buf: &mut Vec<u8>, v: i64) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_i16(buf, i16::try_from(s.len()).expect("a short string"));
    buf.extend_from_slice(s.as_bytes());
}

/// A zigzag varint, as record fields are written.
fn put_varint(buf: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

/// Varint length, then the bytes; `None` is length -1.
fn put_bytes(buf: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, len_i64(b.len()));
            buf.extend_from_slice(b);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("N bytes")
    }

    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take())
    }

    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take())
    }

    fn skip(&mut self, n: usize) {
        self.0 = &self.0[n..];
    }
}
