//! next_change_at: see the clock helper.
