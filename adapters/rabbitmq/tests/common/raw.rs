//! A minimal AMQP 0-9-1 client over a TCP stream, for publishing what lapin refuses to
//! write: a message whose header table has a field name that is not UTF-8.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

fn short_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("short string"));
    out.extend_from_slice(s);
}

fn long_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s);
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

async fn write_frame(s: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    s.write_all(&f).await.expect("write a frame");
}

/// Reads frames until a method frame of `class`.`id`; returns its arguments.
async fn expect_method(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).await.expect("read a frame header");
        let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload).await.expect("read a frame");
        if head[0] != METHOD {
            continue;
        }
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        if got == (10, 50) || got == (20, 40) {
            panic!(
                "the broker closed the connection or channel: {}",
                String::from_utf8_lossy(&payload[4..size])
            );
        }
        if got == (class, id) {
            return payload[4..size].to_vec();
        }
    }
}

/// Publishes `body` to `queue` through the default exchange, with one header whose
/// name is `name` (any bytes, up to 255) and whose value is the string `value`, as
/// guest/guest on 127.0.0.1:5672 (or `AMQP_RAW_ADDR`). Returns once the broker has
/// routed it (it answered the `connection.close` sent after it).
pub async fn publish_with_header_name(queue: &str, name: &[u8], value: &str, body: &[u8]) {
    let addr = std::env::var("AMQP_RAW_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".into());
    let mut s = TcpStream::connect(&addr).await.unwrap_or_else(|e| {
        panic!(
            "RabbitMQ is not reachable at {addr} (start it with `rabbitmq-server -detached`): {e}"
        )
    });
    s.write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .expect("protocol header");
    expect_method(&mut s, 10, 10).await; // connection.start
    let mut args = 0u32.to_be_bytes().to_vec(); // client properties: an empty table
    short_str(&mut args, b"PLAIN");
    long_str(&mut args, b"\0guest\0guest");
    short_str(&mut args, b"en_US");
    write_frame(&mut s, METHOD, 0, &method(10, 11, &args)).await; // start-ok
    let tune = expect_method(&mut s, 10, 30).await; // connection.tune
    let mut args = tune[0..6].to_vec(); // channel-max and frame-max as offered
    args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    write_frame(&mut s, METHOD, 0, &method(10, 31, &args)).await; // tune-ok
    let mut args = Vec::new();
    short_str(&mut args, b"/");
    short_str(&mut args, b"");
    args.push(0);
    write_frame(&mut s, METHOD, 0, &method(10, 40, &args)).await; // connection.open
    expect_method(&mut s, 10, 41).await;
    write_frame(&mut s, METHOD, 1, &method(20, 10, &[0])).await; // channel.open
    expect_method(&mut s, 20, 11).await;

    let mut args = 0u16.to_be_bytes().to_vec();
    short_str(&mut args, b""); // the default exchange
    short_str(&mut args, queue.as_bytes());
    args.push(0); // neither mandatory nor immediate
    write_frame(&mut s, METHOD, 1, &method(60, 40, &args)).await; // basic.publish

    let mut table = Vec::new();
    short_str(&mut table, name);
    table.push(b'S');
    long_str(&mut table, value.as_bytes());
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes()); // weight
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&(1u16 << 13).to_be_bytes()); // only the headers property
    long_str(&mut header, &table);
    write_frame(&mut s, HEADER, 1, &header).await;
    write_frame(&mut s, BODY, 1, body).await;

    let mut args = 200u16.to_be_bytes().to_vec();
    short_str(&mut args, b"done");
    args.extend_from_slice(&[0, 0, 0, 0]);
    write_frame(&mut s, METHOD, 0, &method(10, 50, &args)).await; // connection.close
    expect_method(&mut s, 10, 51).await;
}
