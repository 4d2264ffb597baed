-- The compose stack's database, as a production one is set up: the change feed reads it as a
-- replication role, not the superuser, through a publication made for it.
CREATE ROLE debezium WITH LOGIN REPLICATION PASSWORD 'debezium';
-- Ferry's outbox is created by `ferry migrate`; the publication names it ahead of time
-- (Debezium's publication.autocreate.mode is disabled), and the heartbeat has a row to touch.
CREATE TABLE IF NOT EXISTS public.debezium_heartbeat (id int PRIMARY KEY DEFAULT 1, at timestamptz);
INSERT INTO public.debezium_heartbeat VALUES (1, now()) ON CONFLICT DO NOTHING;
GRANT SELECT, UPDATE ON public.debezium_heartbeat TO debezium;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO debezium;
