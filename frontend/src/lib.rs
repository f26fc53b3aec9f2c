//! aiq-frontend: one embedded page that shows which revision the frontend and
//! the backend run, and a same-origin reverse proxy to the backend. The
//! logic lives in this library so that a new revision, baked into the thin
//! `main.rs`, recompiles only that file.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, StatusCode, Uri},
    response::{Html, IntoResponse, Response},
    routing::{any, get},
    Router,
};
use backend::{health_routes, serve, Shutdown, Version};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

const PAGE: &str = include_str!("page.html");

#[derive(Clone)]
struct Proxy {
    backend_url: String,
    client: Client<HttpConnector, Body>,
}

/// Runs the frontend until SIGTERM.
pub async fn run(version: Version) {
    let shutdown = Shutdown::install();
    let backend_url = std::env::var("BACKEND_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:8000".to_owned())
        .trim_end_matches('/')
        .to_owned();
    eprintln!("proxying /api/* and /backend/version to {backend_url}");
    let proxy = Proxy {
        backend_url,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let page = PAGE.replace("{{REVISION}}", version.revision);
    let app = Router::new()
        .route("/", get(move || async move { Html(page) }))
        .route("/api/{*rest}", any(forward))
        .route("/backend/version", get(forward))
        .with_state(proxy)
        .merge(health_routes(version, shutdown.clone()));
    serve(app, 3000, shutdown, Duration::from_secs(5)).await;
}

/// Forwards the request to the backend: `/backend/version` becomes the
/// backend's `/version`, `/api/*` keeps its path. Bodies stream both ways, so
/// server-sent events pass through.
async fn forward(State(proxy): State<Proxy>, mut request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let backend_path = if path == "/backend/version" {
        "/version"
    } else {
        &path
    };
    let uri: Uri = match format!("{}{backend_path}", proxy.backend_url).parse() {
        Ok(uri) => uri,
        Err(e) => {
            return (StatusCode::BAD_GATEWAY, format!("bad BACKEND_URL: {e}")).into_response()
        }
    };
    *request.uri_mut() = uri;
    request.headers_mut().remove(header::HOST);
    match proxy.client.request(request).await {
        Ok(response) => response.map(Body::new).into_response(),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("backend {} unreachable: {e}", proxy.backend_url),
        )
            .into_response(),
    }
}
