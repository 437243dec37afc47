//! Attaches the console to the database in `DATABASE_URL`:
//! `DATABASE_URL=postgres://... cargo run -p membrane-console --example attach`

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL to an engine's database")?;
    let store = membrane_store::Store::connect(&url).await?;
    membrane_console::run(store).await
}
