-- One row per request: its terminal event (completed or failed). Idempotent on request_id.
CREATE TABLE IF NOT EXISTS routing_events (
    request_id          text PRIMARY KEY,
    status              text NOT NULL CHECK (status IN ('completed', 'failed')),
    tenant_id           text,
    model               text,
    provider            text,
    policy              text,
    category            text,
    complexity          text,
    confidence          double precision,
    tier                text,
    error_code          text,
    error_detail        text,
    classifier_version  text,
    degraded            text[] NOT NULL DEFAULT '{}',
    estimated_cost_usd  double precision,
    decision            jsonb,
    timings_ms          jsonb,
    raw                 text,
    created_at          timestamptz,
    decided_at          timestamptz NOT NULL,
    source_topic        text NOT NULL,
    source_partition    integer NOT NULL,
    source_offset       bigint NOT NULL,
    inserted_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS routing_events_tenant_created_idx ON routing_events (tenant_id, created_at);
CREATE INDEX IF NOT EXISTS routing_events_model_idx ON routing_events (model);
CREATE INDEX IF NOT EXISTS routing_events_status_idx ON routing_events (status);
CREATE INDEX IF NOT EXISTS routing_events_decided_idx ON routing_events (decided_at);
