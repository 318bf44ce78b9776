-- One row per request's outcome (what the caller saw); idempotent on request_id. Spend history
-- per tenant/model/policy and window is a GROUP BY over this table.
CREATE TABLE IF NOT EXISTS routing_outcomes (
    request_id      text PRIMARY KEY,
    tenant_id       text NOT NULL,
    model           text NOT NULL,
    policy          text,
    success         boolean NOT NULL,
    latency_ms      double precision NOT NULL,
    input_tokens    integer NOT NULL DEFAULT 0,
    output_tokens   integer NOT NULL DEFAULT 0,
    cost_usd        double precision NOT NULL DEFAULT 0,
    category        text,
    label           text,
    reported_at     timestamptz NOT NULL,
    source_topic    text NOT NULL,
    source_partition integer NOT NULL,
    source_offset   bigint NOT NULL,
    inserted_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS routing_outcomes_tenant_reported_idx
    ON routing_outcomes (tenant_id, reported_at);
CREATE INDEX IF NOT EXISTS routing_outcomes_model_reported_idx
    ON routing_outcomes (model, reported_at);
CREATE INDEX IF NOT EXISTS routing_outcomes_policy_idx ON routing_outcomes (policy);
