-- Several integrations on one database. Each runs as a consumer group of its own on the same
-- outbox topic, so every record of the consumer's is filed under its integration's name: a
-- tenant's switch and state (paused for one partner, flowing to another), the dedupe record (two
-- integrations settle the same event id each for itself), attempts, the parked backlog and the
-- operator's actions. Mappings were keyed by integration from the start.
--
-- The rows already here belong to the one integration that ran: the name its mappings are filed
-- under when they name one only, else `partner` (the reference shop's). The column keeps no
-- default afterwards, so a statement that forgets to name its integration fails rather than
-- filing a row under the wrong one.
--
-- Changing a primary key builds its index under an exclusive lock: about a second per million
-- `deliveries` rows on a small machine. Stop the consumers while this runs (the relay may keep
-- going; what it writes waits in Kafka).
DO $$
DECLARE
    existing text := coalesce(
        (SELECT min(integration) FROM integration_mappings HAVING count(DISTINCT integration) = 1),
        'partner');
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenants', 'deliveries', 'delivery_attempts', 'parked_events'] LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN integration text NOT NULL DEFAULT %L', t, existing);
        EXECUTE format('ALTER TABLE %I ALTER COLUMN integration DROP DEFAULT', t);
    END LOOP;
    -- Null for what is not one integration's: the kill switch stops them all.
    ALTER TABLE operator_actions ADD COLUMN integration text;
    UPDATE operator_actions SET integration = existing WHERE tenant_id IS NOT NULL;
END $$;

ALTER TABLE tenants DROP CONSTRAINT tenants_pkey, ADD PRIMARY KEY (integration, tenant_id);
ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey, ADD PRIMARY KEY (integration, event_id);
ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_pkey,
    ADD PRIMARY KEY (integration, event_id, attempt);
-- Each integration parks its own copy of a record: a tenant paused for one partner only.
ALTER TABLE parked_events DROP CONSTRAINT parked_events_record_key,
    ADD CONSTRAINT parked_events_record_key UNIQUE (integration, topic, partition, "offset");
DROP INDEX parked_events_tenant_idx;
CREATE INDEX parked_events_tenant_idx ON parked_events (integration, tenant_id, seq);
DROP INDEX tenants_not_active_idx;
CREATE INDEX tenants_not_active_idx ON tenants (integration, state) WHERE state <> 'active';
DROP INDEX deliveries_failed_idx;
CREATE INDEX deliveries_failed_idx ON deliveries (integration, updated_at DESC)
    WHERE outcome IN ('failed', 'bad_event');
CREATE INDEX operator_actions_integration_idx ON operator_actions (integration, tenant_id, at DESC);

-- An outbox row may name the one integration it is for: a tenant's backfill when it switches
-- one integration on, an operator's replay for one partner. The change feed carries it as the
-- `integration` header; every other integration records the event as ignored. Null, the row is
-- for all of them, as every row an application writes. Nullable, so adding it rewrites nothing
-- and the application's own inserts need not change.
DO $$
BEGIN
    IF to_regclass('public.outbox') IS NOT NULL THEN
        ALTER TABLE public.outbox ADD COLUMN IF NOT EXISTS integration text;
    END IF;
END $$;

-- Which integration each consumer group runs: claimed by the first `ferry consume` of the group.
-- Two integrations sharing a group would each read only some of the partitions, and the events
-- of the others would never reach their partner; a second integration is refused at start.
CREATE TABLE consumer_groups (
    group_id    text        PRIMARY KEY,
    integration text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
