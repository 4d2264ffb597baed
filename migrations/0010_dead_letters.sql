-- The terminal policy's second way: an event an operator gives up on (`skip`) is exported, with
-- its attempts, to the integration's dead-letter topic (`consume.dead_letter_topic`) and settled
-- as `dead_lettered`, and the tenant goes on. Each export is kept here too: which record of the
-- topic holds it, and whether `ferry dead-letters copy-back` has written it back into the
-- tenant's stream (once: a second copy-back skips it).
ALTER TABLE deliveries DROP CONSTRAINT deliveries_outcome_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_outcome_check CHECK (outcome IN (
    'delivered', 'deferred', 'failed', 'parked', 'expired', 'skipped', 'ignored', 'bad_event',
    'dead_lettered'));

CREATE TABLE dead_letters (
    integration     text        NOT NULL,
    event_id        uuid        NOT NULL,
    tenant_id       text        NOT NULL,
    -- Where the export landed.
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    exported_at     timestamptz NOT NULL DEFAULT now(),
    exported_by     text        NOT NULL,
    reason          text        NOT NULL,
    -- Set when copied back into the outbox, with the new event's id.
    copied_back_at  timestamptz,
    copied_as       uuid,
    PRIMARY KEY (integration, event_id)
);
CREATE INDEX dead_letters_tenant_idx ON dead_letters (integration, tenant_id, topic, partition, "offset");
