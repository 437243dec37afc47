-- The evaluation queue and timers churn: every queue entry is deleted once processed, timers
-- are re-armed. Their live rows are few, so autovacuum's default (20% of the table) would let
-- dead rows pile up at the head of the indexes claims scan. Vacuum them after a fixed number.
ALTER TABLE eval_queue SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                            autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 10000);
ALTER TABLE timers SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_threshold = 10000);
