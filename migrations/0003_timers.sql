-- Durable timers: for each (bucket, user), the next instant anything about that user in that
-- bucket can change with no new event (a window edge, a timestamp property coming due, a
-- min_dwell deferral ending, the max_dwell deadline, the next dwell mark).
--
-- Rows are written only by rounds that hold the user's contact row lock (every evaluation of a
-- user re-arms, moves or deletes its row in the round's own transaction), so a row is never
-- older than the memberships it was computed from. Erasing a contact deletes its timers.

CREATE TABLE timers (
    bucket_id  text NOT NULL,
    user_id    text NOT NULL REFERENCES contacts (user_id) ON DELETE CASCADE,
    due_at     timestamptz NOT NULL,
    PRIMARY KEY (bucket_id, user_id)
);
-- Due first: the timer task claims each serving bucket's earliest timers by this index, and
-- finds the earliest instant to sleep until.
CREATE INDEX timers_due ON timers (bucket_id, due_at);
-- Erasing a contact deletes its timers through the foreign key: this finds them.
CREATE INDEX timers_user ON timers (user_id);
