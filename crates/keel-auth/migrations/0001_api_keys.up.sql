-- Runs with search_path set to the `auth` schema (see keel_store::migrate).
CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY,
    tenant      text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin', 'service')),
    name        text        NOT NULL,
    -- SHA-256 of the whole key string; the clear key is never stored.
    key_hash    bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    -- `keel_` plus 7 characters: enough to tell keys apart in listings, far too little to guess one.
    key_prefix  text        NOT NULL CHECK (char_length(key_prefix) = 12),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);

-- A name identifies a key among its tenant's active keys; revoking frees the name for a replacement.
CREATE UNIQUE INDEX api_keys_active_name ON api_keys (tenant, name) WHERE revoked_at IS NULL;
