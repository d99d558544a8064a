//! A plain Pingora reverse proxy: one listener, one upstream, keep-alive both ways, nothing
//! else — what nginx's `proxy_pass` does in the bench. `bench/run` runs it beside Portico so
//! every result separates Portico's own cost from Pingora's. Same allocator as Portico.
//!
//! Usage: pingora-baseline LISTEN UPSTREAM [h2c]

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

#[global_allocator]
static ALLOC: portico::memory::Allocator = portico::memory::Allocator;

struct Plain {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Plain {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2).and_then(|u| u.parse().ok())) else {
        eprintln!("usage: pingora-baseline LISTEN UPSTREAM [h2c]");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Plain { upstream });
    if args.get(3).is_some_and(|a| a == "h2c") {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        if let Some(app) = proxy.app_logic_mut() {
            app.server_options = Some(options);
        }
    }
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
