-- One row per registered database instance.
CREATE TABLE registry.instances (
    id uuid PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL,
    engine text NOT NULL CHECK (engine IN ('postgres', 'redis')),
    -- Shown to users; credentials replaced by ****.
    url_masked text NOT NULL,
    -- The full URL, AES-256-GCM under key_id: nonce || ciphertext || tag.
    url_ciphertext bytea NOT NULL,
    key_id text NOT NULL,
    environment text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}',
    monitoring_endpoints jsonb NOT NULL DEFAULT '[]',
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    health_checked_at timestamptz,
    health_reachable boolean NOT NULL DEFAULT false,
    health_server_version text NOT NULL DEFAULT '',
    health_role text NOT NULL DEFAULT '',
    health_error text NOT NULL DEFAULT '',
    health_latency_us bigint,
    CONSTRAINT instances_tenant_name_key UNIQUE (tenant, name)
);

-- List pages walk a tenant's instances in id (creation) order.
CREATE INDEX instances_tenant_id_idx ON registry.instances (tenant, id);
-- Label selectors: containment (=, in via @>) and existence (key, !key).
CREATE INDEX instances_labels_idx ON registry.instances USING gin (labels);
-- Key rotation finds rows still under an old key.
CREATE INDEX instances_key_id_idx ON registry.instances (key_id);
