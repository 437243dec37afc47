//! `membrane webhooks`: register endpoints, see their queues and dead letters, replay them.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use membrane_engine::webhooks::{generate_secret, Signer};
use membrane_store::webhooks::Replay;
use membrane_store::Store;

use crate::Format;

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// Register an endpoint; it receives every transition committed from now on.
    Add {
        /// An http:// URL (this build speaks plain HTTP only; put TLS in front of it).
        url: String,
        /// The signing secret, `whsec_` followed by base64; generated when omitted.
        #[arg(long)]
        secret: Option<String>,
    },
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
        WebhooksCommand::Add { url, secret } => {
            if !url.starts_with("http://") {
                bail!("webhook URLs must be http:// (this build has no TLS client): {url}");
            }
            let secret = secret.unwrap_or_else(generate_secret);
            Signer::new(&secret).context("invalid --secret")?;
            let id = store.add_webhook_endpoint(&url, &secret).await?;
            println!("endpoint {id}: {url}\nsecret: {secret}");
        }
        WebhooksCommand::List { format } => {
            let endpoints = store.webhook_endpoints().await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&endpoints)?),
                Format::Human => {
                    for endpoint in &endpoints {
                        let state = if endpoint.enabled { "" } else { " (disabled)" };
                        println!(
                            "{:>4}  {}{state}  pending {}  dead {}  delivered {}",
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
