-- The queue always has writers, so a vacuum (auto or manual) retried for 5 s to take the
-- exclusive lock that truncating the table's empty tail needs, and when it got it, ingest and
-- claims waited behind it. Emptied pages are reused instead.
ALTER TABLE eval_queue SET (vacuum_truncate = false);
