//! The backend's service plumbing: the revision baked in at build time, the
//! health endpoints, and a graceful shutdown that drains streams on SIGTERM.
//! It lives in the library so that a new revision, baked into the thin
//! `main.rs`, recompiles only that file.

use std::time::Duration;

use axum::{
    http::{header, StatusCode},
    routing::get,
    Json, Router,
};
use serde::Serialize;
use tokio::sync::watch;

/// The build's identity. The values come from the Dockerfile's build args
/// through [`version!`], which expands in the binary crate: a new commit
/// then recompiles only the thin `main.rs`, not this library.
#[derive(Clone, Debug, Serialize)]
pub struct Version {
    pub service: &'static str,
    pub revision: &'static str,
    pub dirty: bool,
    pub commit_time: &'static str,
}

/// `Version` of the calling binary, read at its compile time;
/// `option_env!` makes cargo rebuild it when the build args change.
#[macro_export]
macro_rules! version {
    ($service:expr) => {
        $crate::Version {
            service: $service,
            revision: match option_env!("GIT_REVISION") {
                Some(revision) => revision,
                None => "unknown",
            },
            dirty: matches!(option_env!("GIT_DIRTY"), Some("true")),
            commit_time: match option_env!("GIT_COMMIT_TIME") {
                Some(time) => time,
                None => "unknown",
            },
        }
    };
}

/// Flips to `true` once SIGTERM or Ctrl-C arrives; streams and readiness
/// watch it.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Installs the signal handlers and returns the shared flag.
    pub fn install() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = tx.send(true);
        });
        Shutdown(rx)
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when shutdown has begun.
    pub async fn begun(mut self) {
        let _ = self.0.wait_for(|draining| *draining).await;
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// `/healthz`, `/readyz` and `/version`, common to both services. Readiness
/// turns 503 while draining so load balancers stop sending new requests.
pub fn health_routes<S: Clone + Send + Sync + 'static>(
    version: Version,
    shutdown: Shutdown,
) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let draining = shutdown.is_draining();
                async move {
                    if draining {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining")
                    } else {
                        (StatusCode::OK, "ready")
                    }
                }
            }),
        )
        // Any origin may read it: a frontend built with the backend's public
        // address (the seed flow) asks from its own origin.
        .route(
            "/version",
            get(move || async move {
                ([(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], Json(version))
            }),
        )
}

/// Serves `app` on `0.0.0.0:$PORT` until shutdown, then gives open
/// connections `grace` to finish before returning anyway.
pub async fn serve(app: Router, default_port: u16, shutdown: Shutdown, grace: Duration) {
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default_port);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .unwrap_or_else(|e| panic!("binding port {port}: {e}"));
    eprintln!("listening on 0.0.0.0:{port}");
    let graceful = axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().begun());
    tokio::select! {
        result = graceful => {
            if let Err(e) = result {
                eprintln!("server error: {e}");
                std::process::exit(1);
            }
        }
        _ = async { shutdown.begun().await; tokio::time::sleep(grace).await } => {
            eprintln!("connections still open after {grace:?}; exiting");
        }
    }
    eprintln!("shut down");
}
