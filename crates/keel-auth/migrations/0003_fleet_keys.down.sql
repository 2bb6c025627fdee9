-- Fleet keys cannot exist without this migration: they are removed, not given a tenant.
DELETE FROM api_keys WHERE tenant IS NULL;
DROP INDEX api_keys_active_fleet_name;
ALTER TABLE api_keys DROP CONSTRAINT api_keys_fleet_service_only;
ALTER TABLE api_keys DROP CONSTRAINT api_keys_tenant_not_empty;
ALTER TABLE api_keys ALTER COLUMN tenant SET NOT NULL;
