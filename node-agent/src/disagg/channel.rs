//! HTTP/2 settings of the KV channel, shared by the prefill agent's server, the decode agent's
//! client and `bench kv-transfer`, so the benchmark measures what production runs.
//!
//! A KV stream is a bulk transfer of megabytes per request. HTTP/2's defaults are sized for
//! RPCs: a 64 KiB stream window means the prefill agent stops after every 64 KiB until the
//! decode agent's WINDOW_UPDATE arrives, and 16 KiB frames cut each megabyte chunk into 64
//! frames. Large windows keep a whole prompt's layers in flight, the decode agent still
//! bounds what it buffers (it reads chunk by chunk and validates as it goes), and large
//! frames let one chunk travel in a few writes.

use tonic::transport::{Endpoint, Server};

/// Bytes one KV stream may have in flight before the receiver acknowledges them.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Bytes all streams of one connection may have in flight (several prefills share a peer).
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame either side accepts on the KV channel.
pub const MAX_FRAME: u32 = 1 << 20;

/// A decode agent's endpoint to a prefill peer, with the KV channel's flow control.
pub fn endpoint(ep: Endpoint) -> Endpoint {
    ep.initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .tcp_nodelay(true)
}

/// The prefill agent's KV server builder, with the KV channel's flow control.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .tcp_nodelay(true)
}
