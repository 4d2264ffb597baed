-- Each tenant's own webhook endpoint, per webhooks integration: where its events go and the
-- secret they are signed with (Standard Webhooks: `whsec_` and base64). A rotated secret stays
-- valid until `previous_until`: deliveries carry a signature for each valid secret, so the
-- tenant swaps its copy without a window of refused deliveries. An endpoint that answered
-- 410 Gone is disabled (with why); its tenant's events are parked, rows in Postgres rather than
-- memory, until it is set again.
--
-- The secrets are kept as they are given: a delivery must be signed with them. Restrict who
-- reads this table (the role Ferry connects as), as for any credential.
CREATE TABLE webhook_endpoints (
    integration     text        NOT NULL,
    tenant_id       text        NOT NULL CHECK (tenant_id <> ''),
    url             text        NOT NULL CHECK (url ~ '^https?://'),
    secret          text        NOT NULL,
    previous_secret text,
    previous_until  timestamptz,
    disabled_at     timestamptz,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (integration, tenant_id),
    CONSTRAINT webhook_endpoints_disabled_has_reason
        CHECK ((disabled_at IS NULL) = (disabled_reason IS NULL)),
    CONSTRAINT webhook_endpoints_previous_has_end
        CHECK ((previous_secret IS NULL) = (previous_until IS NULL))
);
