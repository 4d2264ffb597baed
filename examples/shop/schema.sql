-- The reference shop's own table (the example application's, not Ferry's: Ferry's migrations
-- never create it): the products it owns. `ferry load` and the demo write them, each change in
-- one transaction with its outbox row; `ferry verify` compares them with the partner's state.
-- Created in `public`, beside the outbox, by `ferry load` (`shop::create_tables`) when no
-- `products` table is on the search path yet, or by `psql -f` as scripts/demo does.
CREATE TABLE IF NOT EXISTS public.products (
    tenant_id   text        NOT NULL CHECK (tenant_id <> ''),
    id          uuid        NOT NULL,
    name        text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    price_minor bigint      NOT NULL CHECK (price_minor >= 0),
    currency    text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Bumped by every change: a tenant's writes serialize on its product rows.
    version     bigint      NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
