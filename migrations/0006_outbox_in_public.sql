-- The outbox is the application's table: its transactions write it under their own
-- search_path, and Debezium's connector or the relay's publication name it as `public.outbox`.
-- Ferry's own tables stay in Ferry's schema (the first of its sessions' search_path, where the
-- earlier migrations created them all). A database adopted from the layout before Ferry had a
-- schema of its own has its outbox in public already; an outbox of the application's own in
-- public is left alone.
DO $$
BEGIN
    IF current_schema() <> 'public'
       AND to_regclass(format('%I.outbox', current_schema())) IS NOT NULL
       AND to_regclass('public.outbox') IS NULL THEN
        EXECUTE format('ALTER TABLE %I.outbox SET SCHEMA public', current_schema());
    END IF;
END $$;
