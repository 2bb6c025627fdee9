-- Runs with search_path set to the `auth` schema (see keel_store::migrate).
-- Fleet keys belong to Keel's own services (a collector scrapes every tenant's instances):
-- they have no tenant (NULL, never an empty string meaning "all") and the service role only,
-- which the database itself enforces, whatever code writes the row.
ALTER TABLE api_keys ALTER COLUMN tenant DROP NOT NULL;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_tenant_not_empty CHECK (tenant <> '');
ALTER TABLE api_keys ADD CONSTRAINT api_keys_fleet_service_only
    CHECK (tenant IS NOT NULL OR role = 'service');

-- A fleet key's name is the identity its client certificate must carry, so it is unique among
-- active fleet keys (api_keys_active_name treats NULL tenants as all distinct).
CREATE UNIQUE INDEX api_keys_active_fleet_name ON api_keys (name)
    WHERE revoked_at IS NULL AND tenant IS NULL;
