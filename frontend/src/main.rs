//! aiq-frontend's binary: only the revision it was built from lives here.

#[tokio::main]
async fn main() {
    frontend::run(backend::version!("aiq-frontend")).await;
}
