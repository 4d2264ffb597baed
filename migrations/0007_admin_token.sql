-- The admin API's token when none is configured: generated at the first start of `ferry consume`,
-- printed once, and kept here as its SHA-256 only (every instance checks against it; the token
-- itself is never stored).
ALTER TABLE control ADD COLUMN admin_token_sha256 bytea;
