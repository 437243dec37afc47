//! `membrane webhooks`: register, disable, enable and remove endpoints, see their queues and
//! dead letters, replay them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use membrane_engine::webhooks::{generate_secret, parse_ca_pem, Signer};
use membrane_store::webhooks::Replay;
use membrane_store::Store;

use crate::Format;

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// Register an endpoint; it receives every transition committed from now on.
    Add {
        /// An https:// (or http://) URL.
        url: String,
        /// The signing secret, `whsec_` followed by base64; generated when omitted.
        #[arg(long)]
        secret: Option<String>,
        /// PEM file of CA certificates to trust for this https:// endpoint, besides the public
        /// roots (for a private CA or a self-signed receiver). Stored with the endpoint.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Stop sending to an endpoint. Its pending deliveries wait; transitions committed while
    /// it is disabled are not queued for it.
    Disable { id: i64 },
    /// Resume sending to an endpoint, its waiting deliveries first, in order.
    Enable { id: i64 },
    /// Delete an endpoint, dropping its pending deliveries and dead letters.
    Remove { id: i64 },
    /// Every endpoint with its pending, dead and delivered counts.
    List {
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Dead letters: deliveries that failed every attempt.
    Dead {
        /// Only this endpoint's.
        #[arg(long)]
        endpoint: Option<i64>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Send dead letters again, with fresh attempts.
    Replay {
        /// The dead delivery's id (see `membrane webhooks dead`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

pub async fn run(store: &Store, command: WebhooksCommand) -> Result<()> {
    match command {
        WebhooksCommand::Add {
            url,
            secret,
            ca_file,
        } => {
            let is_https = url.starts_with("https://");
            if !is_https && !url.starts_with("http://") {
                bail!(
                    "`{url}` is not a webhook URL: expected https://host/path or http://host/path"
                );
            }
            let ca_pem = match &ca_file {
                Some(path) if !is_https => bail!(
                    "--ca-file {} is for https:// endpoints; `{url}` is plain HTTP",
                    path.display()
                ),
                Some(path) => {
                    let pem = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read --ca-file {}", path.display()))?;
                    parse_ca_pem(&pem).with_context(|| format!("--ca-file {}", path.display()))?;
                    Some(pem)
                }
                None => None,
            };
            let secret = secret.unwrap_or_else(generate_secret);
            Signer::new(&secret).context("invalid --secret")?;
            let id = store
                .add_webhook_endpoint(&url, &secret, ca_pem.as_deref())
                .await?;
            println!("endpoint {id}: {url}\nsecret: {secret}");
        }
        WebhooksCommand::Disable { id } => switch(store, id, false).await?,
        WebhooksCommand::Enable { id } => switch(store, id, true).await?,
        WebhooksCommand::Remove { id } => {
            let removed = store
                .remove_webhook_endpoint(id)
                .await?
                .with_context(|| no_endpoint(id))?;
            println!(
                "endpoint {id} removed, with {} pending deliveries and {} dead letter(s)",
                removed.pending, removed.dead
            );
        }
        WebhooksCommand::List { format } => {
            let endpoints = store.webhook_endpoints().await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&endpoints)?),
                Format::Human => {
                    for endpoint in &endpoints {
                        let state = if endpoint.enabled { "" } else { " (disabled)" };
                        let ca = if endpoint.custom_ca { " (own CA)" } else { "" };
                        println!(
                            "{:>4}  {}{ca}{state}  pending {}  dead {}  delivered {}",
                            endpoint.id,
                            endpoint.url,
                            endpoint.pending,
                            endpoint.dead,
                            endpoint.delivered
                        );
                        if let Some(error) = &endpoint.last_error {
                            println!("      retrying: {error}");
                        }
                    }
                }
            }
        }
        WebhooksCommand::Dead { endpoint, format } => {
            let dead = store.dead_webhook_deliveries(endpoint).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&dead)?),
                Format::Human => {
                    for letter in &dead {
                        println!(
                            "{:>6}  endpoint {}  {}  {} attempts  {}",
                            letter.id,
                            letter.endpoint_id,
                            letter.transition_key,
                            letter.attempts,
                            letter.last_error.as_deref().unwrap_or("")
                        );
                    }
                }
            }
        }
        WebhooksCommand::Replay { id, all: _ } => {
            // clap guarantees exactly one of the id and --all.
            let which = match id {
                Some(delivery_id) => Replay::One { delivery_id },
                None => Replay::AllDead,
            };
            let replayed = store.replay_webhook_deliveries(which).await?;
            if replayed == 0 && id.is_some() {
                bail!("no dead delivery with that id");
            }
            println!("{replayed} dead letter(s) queued again");
        }
    }
    Ok(())
}

async fn switch(store: &Store, id: i64, enable: bool) -> Result<()> {
    if !store.set_webhook_enabled(id, enable).await? {
        bail!(no_endpoint(id));
    }
    let state = if enable { "enabled" } else { "disabled" };
    println!("endpoint {id} {state}");
    Ok(())
}

fn no_endpoint(id: i64) -> String {
    format!("no webhook endpoint {id}; `membrane webhooks list` shows them")
}
