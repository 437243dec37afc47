//! `membrane members`, `membrane user` and `membrane transitions`: the HTTP reads, from the
//! database directly.

use std::time::Duration;

use anyhow::{anyhow, Result};
use membrane_store::{MemberCursor, Store, TransitionRow, TRANSITIONS_CHANNEL};

use crate::Format;

#[derive(clap::Args)]
pub struct MembersArgs {
    bucket: String,
    /// The cursor printed after the previous page.
    #[arg(long)]
    after: Option<String>,
    #[arg(long, default_value_t = membrane_http::DEFAULT_PAGE_LIMIT,
          value_parser = clap::value_parser!(i64).range(1..=membrane_http::MAX_PAGE_LIMIT))]
    limit: i64,
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

#[derive(clap::Args)]
pub struct TransitionsArgs {
    /// Only transitions with a greater id.
    #[arg(long, default_value_t = 0)]
    after: i64,
    /// Transitions per read.
    #[arg(long, default_value_t = membrane_http::DEFAULT_PAGE_LIMIT,
          value_parser = clap::value_parser!(i64).range(1..=membrane_http::MAX_PAGE_LIMIT))]
    limit: i64,
    /// Only this bucket's.
    #[arg(long)]
    bucket: Option<String>,
    /// Keep printing transitions as they commit, until interrupted.
    #[arg(long)]
    follow: bool,
    /// `json`: one JSON object per line.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

/// Prints one page; its cursor goes to stderr in human format, so stdout stays the members.
pub async fn members(store: &Store, args: MembersArgs) -> Result<()> {
    let after = args
        .after
        .as_deref()
        .map(MemberCursor::parse)
        .transpose()
        .map_err(|error| anyhow!("--after: {error}"))?;
    let page = store
        .bucket_members(&args.bucket, after.as_ref(), args.limit)
        .await?
        .ok_or_else(|| no_bucket(&args.bucket))?;
    let next = page.next.as_ref().map(MemberCursor::token);
    match args.format {
        Format::Human => {
            for member in &page.members {
                println!(
                    "{:<32} epoch {:<4} since {}",
                    member.user_id,
                    member.epoch,
                    member.entered_at.to_rfc3339()
                );
            }
            if let Some(next) = &next {
                eprintln!(
                    "more: membrane members {} --after {next} --limit {}",
                    args.bucket, args.limit
                );
            }
        }
        Format::Json => {
            let members: Vec<serde_json::Value> = page
                .members
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "user_id": m.user_id, "epoch": m.epoch, "entered_at": m.entered_at,
                    })
                })
                .collect();
            println!(
                "{:#}",
                serde_json::json!({ "bucket": args.bucket, "members": members, "next": next })
            );
        }
    }
    Ok(())
}

pub async fn user(store: &Store, user_id: &str, format: Format) -> Result<()> {
    let memberships = store.user_memberships(user_id).await?;
    match format {
        Format::Human => {
            if memberships.is_empty() {
                eprintln!("{user_id} is in no bucket");
            }
            for membership in &memberships {
                println!(
                    "{:<24} epoch {:<4} since {}",
                    membership.bucket_id,
                    membership.epoch,
                    membership.entered_at.to_rfc3339()
                );
            }
        }
        Format::Json => println!(
            "{:#}",
            serde_json::json!({ "user": user_id, "buckets": memberships })
        ),
    }
    Ok(())
}

/// With `--follow`, waits for the transitions channel (re-reading every second as a backstop)
/// and prints each transition once, in id order.
pub async fn transitions(store: &Store, args: TransitionsArgs) -> Result<()> {
    if let Some(bucket) = &args.bucket {
        if store.member_count(bucket).await?.is_none() {
            return Err(no_bucket(bucket));
        }
    }
    let mut notifications = if args.follow {
        Some(store.listen(&[TRANSITIONS_CHANNEL]).await?)
    } else {
        None
    };
    let mut after = args.after;
    loop {
        let page = store
            .transitions_since(after, args.limit, args.bucket.as_deref())
            .await?;
        for transition in &page.transitions {
            print_transition(transition, args.format)?;
        }
        after = page.next;
        let full = page.transitions.len() as i64 == args.limit;
        match notifications.as_mut() {
            None if !full => return Ok(()),
            Some(notifications) if !full => {
                // A timeout only means "read again".
                let _ = tokio::time::timeout(Duration::from_secs(1), notifications.recv()).await;
            }
            _ => {}
        }
    }
}

fn print_transition(transition: &TransitionRow, format: Format) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Human => {
            let label = transition
                .label
                .as_deref()
                .map(|label| format!(" {label}"))
                .unwrap_or_default();
            writeln!(
                out,
                "{:>8}  {}  {:<20} {:<24} {}{} (epoch {}, {}/{})",
                transition.id,
                transition.occurred_at.to_rfc3339(),
                transition.bucket_id,
                transition.user_id,
                transition.kind,
                label,
                transition.epoch,
                transition.source,
                transition.reason
            )?;
        }
        Format::Json => writeln!(out, "{}", serde_json::to_string(transition)?)?,
    }
    // `--follow` output is read as it comes (pipes are block-buffered otherwise).
    out.flush()?;
    Ok(())
}

fn no_bucket(id: &str) -> anyhow::Error {
    anyhow!("no bucket `{id}`: `membrane status` lists the buckets")
}
