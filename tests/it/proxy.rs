//! A TCP proxy between Ferry and Postgres that a test can cut: every open connection reset and
//! new ones refused, as when the server is stopped; restored on the same address. It forwards
//! bytes only, so it carries the query and the replication protocols alike.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use sqlx::ConnectOptions as _;
use sqlx::postgres::PgConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The proxy: its address, and the tasks to abort on a cut.
pub struct PgProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl PgProxy {
    /// A proxy on a free loopback port in front of the server `url` names.
    pub async fn start(url: &str) -> PgProxy {
        let parsed: PgConnectOptions = url.parse().expect("a postgres URL");
        let (host, port) = (parsed.get_host().to_owned(), parsed.get_port());
        let upstream = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .expect("the server's address");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = PgProxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            accept: Mutex::new(None),
            links: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let parsed: PgConnectOptions = url.parse().expect("a postgres URL");
        parsed
            .host("127.0.0.1")
            .port(self.addr.port())
            .to_url_lossy()
            .to_string()
    }

    fn serve(&self, listener: TcpListener) {
        let (upstream, links) = (self.upstream, Arc::clone(&self.links));
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut links = links.lock().unwrap();
                links.retain(|l| !l.is_finished());
                links.push(link);
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    /// Postgres "stops": the listener closes (new connections are refused) and every open
    /// connection is dropped.
    pub fn cut(&self) {
        if let Some(accept) = self.accept.lock().unwrap().take() {
            accept.abort();
        }
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Postgres "starts" again on the same address.
    pub async fn restore(&self) {
        // The aborted listener closes as its task ends; bind until the port is free again.
        let listener = crate::support::wait_for(
            "the proxy's port free again",
            std::time::Duration::from_secs(10),
            || async { TcpListener::bind(self.addr).await.ok() },
        )
        .await;
        self.serve(listener);
    }
}
