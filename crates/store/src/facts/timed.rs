//! What the clock needs beyond the fact values: for every windowed event count, the instants of
//! the events it counts now, since each one leaving its window can flip the criteria.
//! `membrane_criteria::clock::timed_facts_from_raw` is the oracle (its `window_events`). The
//! counting statement gathers them (see [`Round::gather_facts_and_window_events_for`]).

use chrono::{DateTime, Utc};
use membrane_abi::Fact;

use super::{FactRequest, WindowEvents};
use crate::round::Round;
use crate::Result;

impl Round {
    /// One row per user (in `users` order), one list per fact (in `facts` order): for a windowed
    /// [`Fact::EventCount`], the occurrence instants (Unix ms, rounded down as the oracle reads
    /// them) of the events it counts at `now`, in no particular order; empty for every other
    /// fact.
    pub async fn gather_window_events(
        &mut self,
        users: &[String],
        facts: &[Fact],
        now: DateTime<Utc>,
    ) -> Result<WindowEvents> {
        let mut batches = self
            .gather_window_events_for(
                &[FactRequest {
                    users,
                    facts,
                    page: false,
                }],
                now,
            )
            .await?;
        Ok(batches.pop().expect("one list per request"))
    }

    /// [`Round::gather_window_events`] for several batches at once, in one statement.
    pub async fn gather_window_events_for(
        &mut self,
        requests: &[FactRequest<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<WindowEvents>> {
        let timed = vec![true; requests.len()];
        let (_, window_events) = self
            .gather_facts_and_window_events_for(requests, &timed, now)
            .await?;
        Ok(window_events)
    }
}
