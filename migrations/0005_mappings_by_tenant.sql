-- Mappings are scoped by tenant: two tenants may use the same id for different objects (a
-- product id reused across accounts), and each must map to its own partner object. The new key
-- is looser than the old one, so every existing row satisfies it and nothing is rewritten.
ALTER TABLE integration_mappings
    ADD CONSTRAINT integration_mappings_tenant_local_key
    UNIQUE (integration, object_type, tenant_id, local_id);
ALTER TABLE integration_mappings DROP CONSTRAINT integration_mappings_local_key;
