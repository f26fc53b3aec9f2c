//! aiq-agent: the API service. Streams events to clients with keepalives so
//! idle connections survive proxies and load balancers.

use std::{convert::Infallible, time::Duration};

use axum::{
    response::sse::{Event, KeepAlive, Sse},
    routing::get,
    Router,
};
use backend::{health_routes, serve, version, Shutdown};
use futures_util::{stream, Stream, StreamExt};

const SERVICE: &str = "aiq-agent";

#[tokio::main]
async fn main() {
    let shutdown = Shutdown::install();
    let keepalive = Duration::from_secs(
        std::env::var("KEEPALIVE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(15),
    );
    let version = version!(SERVICE);
    let events_shutdown = shutdown.clone();
    let revision = version.revision;
    let app = Router::new()
        .route(
            "/api/events",
            get(move || async move {
                Sse::new(events(revision, events_shutdown))
                    .keep_alive(KeepAlive::new().interval(keepalive).text("keepalive"))
            }),
        )
        .merge(health_routes(version, shutdown.clone()));
    serve(app, 8000, shutdown, Duration::from_secs(5)).await;
}

/// One `hello` event naming the revision, then nothing but keepalives until
/// shutdown, when a `bye` event ends the stream cleanly.
fn events(
    revision: &'static str,
    shutdown: Shutdown,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let hello = Event::default().event("hello").data(revision);
    stream::once(async move { Ok(hello) }).chain(stream::once(async move {
        shutdown.begun().await;
        Ok(Event::default().event("bye").data("shutting down"))
    }))
}
