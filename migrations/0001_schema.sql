-- Ferry's schema. Applied by `ferry migrate` (sqlx, embedded in the binary) and by the tests.

-- The outbox: Debezium's outbox columns plus what Ferry needs. Written by our application in
-- the same transaction as the change itself; read by the change feed from the WAL (inserts
-- only), so rows are never updated. Rows are kept as the audit history and the source of
-- replays; retention deletes old rows by `created_at` (see the README), which the change feed
-- ignores because the publication carries inserts only.
CREATE TABLE outbox (
    id              uuid        PRIMARY KEY,
    aggregatetype   text        NOT NULL,
    aggregateid     text        NOT NULL,
    type            text        NOT NULL,
    -- protobuf bytes (Debezium's ByteArrayConverter passes them through unchanged)
    payload         bytea       NOT NULL,
    tenant_id       text        NOT NULL CHECK (tenant_id <> ''),
    traceparent     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    deliver_before  timestamptz
);
-- Replay of a tenant from a point in time.
CREATE INDEX outbox_tenant_created_idx ON outbox (tenant_id, created_at);
-- Retention deletes by age; BRIN is tiny on an append-only, time-ordered table.
CREATE INDEX outbox_created_brin ON outbox USING brin (created_at);

-- Our ids to the partner's, for any integration and object type.
CREATE TABLE integration_mappings (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    integration text        NOT NULL,
    object_type text        NOT NULL,
    local_id    text        NOT NULL,
    foreign_id  text        NOT NULL,
    tenant_id   text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT integration_mappings_local_key UNIQUE (integration, object_type, local_id)
);
-- Rollback of a tenant: every object mapped for it.
CREATE INDEX integration_mappings_tenant_idx ON integration_mappings (integration, tenant_id);
-- Reverse look-up: which of ours is this partner object.
CREATE INDEX integration_mappings_foreign_idx
    ON integration_mappings (integration, object_type, foreign_id);

-- Per-tenant state. A tenant without a row is active with the integration off. Lives here, not
-- in memory, so whichever instance owns the tenant's partition after a rebalance obeys it.
CREATE TABLE tenants (
    tenant_id           text        PRIMARY KEY CHECK (tenant_id <> ''),
    integration_enabled boolean     NOT NULL DEFAULT false,
    -- active: delivering live; paused: events parked, nothing sent; draining: the parked
    -- backlog is being replayed (new events still parked); disabled: recorded as ignored.
    state               text        NOT NULL DEFAULT 'active'
                        CHECK (state IN ('active', 'paused', 'draining', 'disabled')),
    -- Why it is paused: retryable (resumed on a schedule), permanent (partner rejected),
    -- bad_event (undecodable), operator (paused by hand).
    pause_cause         text        CHECK (pause_cause IN ('retryable', 'permanent', 'bad_event', 'operator')),
    pause_reason        text,
    paused_event_id     uuid,
    paused_at           timestamptz,
    next_retry_at       timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- A paused tenant always says why, so an operator never finds a pause without a reason.
    CONSTRAINT tenants_pause_has_reason CHECK (
        state <> 'paused'
        OR (pause_cause IS NOT NULL AND pause_reason IS NOT NULL AND paused_at IS NOT NULL)
    )
);
-- The paused and draining tenants, loaded on every partition assignment: few, so a partial index.
CREATE INDEX tenants_not_active_idx ON tenants (state) WHERE state <> 'active';

-- Events of paused tenants, parked in arrival order. The raw record is kept (key, headers,
-- value), so a replay goes through the same decoder as live traffic and a bad event keeps the
-- bytes that made it bad.
CREATE TABLE parked_events (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text        NOT NULL,
    event_id    uuid,
    topic       text        NOT NULL,
    partition   integer     NOT NULL CHECK (partition >= 0),
    "offset"    bigint      NOT NULL CHECK ("offset" >= 0),
    record_key  bytea,
    -- [{"name": "...", "value": "<base64>" | null}, ...] in record order
    headers     jsonb       NOT NULL DEFAULT '[]',
    value       bytea,
    record_timestamp timestamptz,
    reason      text,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    -- A record redelivered after a crash is parked once.
    CONSTRAINT parked_events_record_key UNIQUE (topic, partition, "offset")
);
-- The backlog of a tenant, in order.
CREATE INDEX parked_events_tenant_idx ON parked_events (tenant_id, seq);

-- One row per event id: the outcome, and the dedupe record (written in the same transaction as
-- the handler's own writes, such as mapping rows).
CREATE TABLE deliveries (
    event_id        uuid        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    event_type      text,
    outcome         text        NOT NULL CHECK (outcome IN (
                        'delivered', 'deferred', 'failed', 'parked',
                        'expired', 'skipped', 'ignored', 'bad_event')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      text,
    -- The partner's last response: {"status": 422, "body": "..."}.
    last_response   jsonb,
    topic           text,
    partition       integer,
    "offset"        bigint,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Recent failures and a tenant's history.
CREATE INDEX deliveries_tenant_updated_idx ON deliveries (tenant_id, updated_at DESC);
CREATE INDEX deliveries_failed_idx ON deliveries (updated_at DESC) WHERE outcome IN ('failed', 'bad_event');

-- Every attempt at an event, for the operator's "what happened to this event".
CREATE TABLE delivery_attempts (
    event_id    uuid        NOT NULL,
    attempt     integer     NOT NULL CHECK (attempt >= 1),
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    outcome     text        NOT NULL,
    error       text,
    response    jsonb,
    instance    text,
    PRIMARY KEY (event_id, attempt)
);

-- Operator actions (skip, resume, pause, kill switch, replay): who, what, why, when.
CREATE TABLE operator_actions (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL CHECK (actor <> ''),
    action      text        NOT NULL,
    tenant_id   text,
    event_id    uuid,
    reason      text,
    details     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX operator_actions_tenant_idx ON operator_actions (tenant_id, at DESC);

-- Process-wide switches, one row. The kill switch stops all processing on every instance.
CREATE TABLE control (
    singleton           boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    kill_switch         boolean     NOT NULL DEFAULT false,
    kill_switch_reason  text,
    kill_switch_by      text,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
INSERT INTO control (singleton) VALUES (true);
