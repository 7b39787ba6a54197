//! Clients that stop reading: a gRPC `Subscribe` stream over raw HTTP/2 whose window never
//! opens again, and an SSE request whose socket is never read.

#![allow(dead_code)]

use std::io::Write;
use std::time::Duration;

use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use prost::Message;

/// A Subscribe stream (raw JSON included) whose client reads the response headers and nothing
/// more: it takes `window` bytes (its HTTP/2 window, so it gets that far into the log) and never
/// opens its window again. Returns what keeps it open.
pub async fn stalled_grpc(
    addr: std::net::SocketAddr,
    start: Option<Start>,
    window: u32,
) -> (h2::client::SendRequest<bytes::Bytes>, h2::RecvStream) {
    let request = SubscribeRequest {
        start,
        include_raw_json: true,
        ..SubscribeRequest::default()
    };
    stalled_request(addr, request, window, Some(window)).await
}

/// `request` as a Subscribe stream whose client reads the response headers and nothing more,
/// with a stream window of `window` bytes and a connection window of `connection_window`
/// (HTTP/2's default when `None`), never opened again.
pub async fn stalled_request(
    addr: std::net::SocketAddr,
    request: SubscribeRequest,
    window: u32,
    connection_window: Option<u32>,
) -> (h2::client::SendRequest<bytes::Bytes>, h2::RecvStream) {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(window);
    if let Some(connection_window) = connection_window {
        builder.initial_connection_window_size(connection_window);
    }
    let (client, connection) = builder
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let message = request.encode_to_vec();
    let request = http::Request::post(format!(
        "http://{addr}/iqchannels.gateway.v1.EventGateway/Subscribe"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("a request");
    let mut client = client.ready().await.expect("ready");
    let (response, mut send) = client.send_request(request, false).expect("request sent");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    send.send_data(frame.into(), true)
        .expect("request body sent");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("headers in time")
        .expect("a response");
    assert_eq!(response.status(), 200);
    (client, response.into_body())
}

/// An SSE stream whose client sends its request and never reads: its socket buffers fill and
/// the server's writes stop.
pub fn stalled_sse(addr: std::net::SocketAddr, query: &str) -> std::net::TcpStream {
    let socket = socket2_free_connect(addr);
    let mut writer = &socket;
    write!(
        writer,
        "GET /v1/events:stream?{query} HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("request sent");
    socket
}

/// A plain TCP connection with a small receive buffer, so that a reader that stops reading
/// stalls the server soon.
pub fn socket2_free_connect(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(addr).expect("connects");
    // SAFETY: setsockopt on a socket we own, with a valid int option.
    unsafe {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 16 * 1024;
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    stream
}
