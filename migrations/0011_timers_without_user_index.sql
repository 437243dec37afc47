-- Every armed timer maintained an index on user_id that only erasure used. Erasure now deletes
-- a user's timers with one primary-key probe per recorded bucket (timers are only armed for
-- recorded buckets, and bucket rows are never deleted).
DROP INDEX timers_user;
