-- Nothing reads an event by its id: fact gathering, sweeps and erasure go through
-- events_user_name_time, and the audit reads the whole table. The primary key cost every
-- ingested event an index insert (and a WAL record). The id stays, from its sequence, as the
-- order events were stored in.
ALTER TABLE events DROP CONSTRAINT events_pkey;
