//! The HTTP listener: accepts connections, serves them with hyper (HTTP/1.1 and HTTP/2) and
//! stops gracefully on a signal.
//!
//! Why not `axum::serve`: it cannot configure hyper's parser, and hyper answers a request
//! whose head exceeds its buffer (400 KiB) or has more than 100 header fields with a bare 431
//! and no body. Here hyper parses up to [`HYPER_MAX_HEAD_BYTES`] and [`HYPER_MAX_HEADERS`], far
//! above the agent's own limits (`http::MAX_HEADER_BYTES`, `http::MAX_HEADER_COUNT`), so the
//! router answers oversized headers with a 431 in OpenAI error JSON. Only a head beyond
//! hyper's limits (1 MiB or 1,000 fields) still gets hyper's bare answer.
//!
//! Every accepted socket gets TCP_NODELAY: streamed tokens are small writes, and Nagle's
//! algorithm would hold each one back until the previous is acknowledged.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Most bytes of a request head hyper buffers before refusing it on its own.
pub const HYPER_MAX_HEAD_BYTES: usize = 1 << 20;
/// Most header fields hyper parses before refusing a request on its own.
pub const HYPER_MAX_HEADERS: usize = 1000;

/// Serves `app` on `listener` until `stop` turns true, then lets every open connection finish
/// its requests (HTTP/1 keep-alive connections close after the response in flight; HTTP/2 gets
/// GOAWAY) and returns once all have closed.
pub async fn serve(listener: TcpListener, app: Router, stop: watch::Receiver<bool>) {
    // Each connection task holds a clone of `open`; `closed()` resolves when all are gone.
    let (open_tx, open_rx) = watch::channel(());
    let mut stopping = stop.clone();
    loop {
        let accepted = tokio::select! {
            _ = stopping.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accepting an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "setting TCP_NODELAY on an HTTP connection");
        }
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .max_buf_size(HYPER_MAX_HEAD_BYTES)
                .max_headers(HYPER_MAX_HEADERS);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            let mut shutting_down = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(error) = result {
                            tracing::trace!(%error, "HTTP connection ended");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !shutting_down => {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(open);
        });
    }
    drop(open_rx);
    open_tx.closed().await;
}
