-- Webhook delivery of transitions (Standard Webhooks).
--
-- Fan-out happens in the transaction that writes the transitions, by trigger: a delivery row
-- exists for an endpoint exactly when its transition committed. (A cursor over transitions.id
-- would skip rows, because bigserial ids commit out of order.) Delivered rows are deleted, so
-- this table holds only pending and dead deliveries and stays small.

CREATE TABLE webhook_endpoints (
    id               bigserial PRIMARY KEY,
    url              text NOT NULL,
    -- `whsec_` followed by the base64 of the signing key, as the specification writes it.
    secret           text NOT NULL,
    enabled          boolean NOT NULL DEFAULT true,
    delivered_count  bigint NOT NULL DEFAULT 0,
    last_delivered_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    endpoint_id      bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    transition_id    bigint NOT NULL REFERENCES transitions (id) ON DELETE CASCADE,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    last_status      integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, transition_id)
);
-- An endpoint's head of line: its oldest pending delivery.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (endpoint_id, transition_id)
    WHERE state = 'pending';
-- Operators' dead-letter listing.
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (endpoint_id, transition_id)
    WHERE state = 'dead';
-- Erasure deletes transitions; the cascade needs this.
CREATE INDEX webhook_deliveries_transition ON webhook_deliveries (transition_id);

-- Statement-level, so a round that writes many transitions costs one INSERT ... SELECT, and
-- nothing beyond an empty scan while no endpoint exists.
CREATE FUNCTION webhook_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (endpoint_id, transition_id)
    SELECT endpoint.id, written.id
    FROM written CROSS JOIN webhook_endpoints endpoint
    WHERE endpoint.enabled;
    RETURN NULL;
END
$$;

CREATE TRIGGER transitions_webhook_fan_out
    AFTER INSERT ON transitions
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_fan_out();
