//! A gate between a client and the lab's API server, on loopback: a TCP
//! relay that can be cut, as a network partition cuts a replica off.
//!
//! Cut, it relays nothing in either direction and answers nothing:
//! connections stay open and requests hang, as they do when packets are
//! dropped (the worst case for a client: no error to act on, only its own
//! deadlines). New connections are accepted and held the same way. Healed,
//! it relays again (what was held goes through).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay to one upstream address that can be cut and healed.
#[derive(Debug)]
pub struct Gate {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// A gate on 127.0.0.1 to `upstream`, open.
    pub async fn start(upstream: SocketAddr) -> Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the gate")?;
        let addr = listener.local_addr()?;
        let (open, is_open) = watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, is_open.clone()));
            }
        });
        Ok(Gate { addr, open, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Relays nothing more until healed.
    pub fn cut(&self) {
        let _ = self.open.send(false);
    }

    pub fn heal(&self) {
        let _ = self.open.send(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays `client` to `upstream` while the gate is open.
async fn relay(client: TcpStream, upstream: SocketAddr, open: watch::Receiver<bool>) {
    let mut gated = open.clone();
    if gated.wait_for(|o| *o).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pipe(client_read, server_write, open.clone()) => {}
        _ = pipe(server_read, client_write, open) => {}
    }
}

/// Copies `from` to `to`, holding each chunk while the gate is cut.
async fn pipe(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut open: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if open.wait_for(|o| *o).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
