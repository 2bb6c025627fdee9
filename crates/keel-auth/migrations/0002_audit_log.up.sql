-- Runs with search_path set to the `auth` schema (see keel_store::migrate).
-- Who did what to which key, and when. Rows are append-only by convention: no code path
-- updates or deletes them (tamper-evidence comes later). Never holds a key or its hash.
CREATE TABLE audit_log (
    -- UUID v7, so ids sort by creation time.
    id       uuid        PRIMARY KEY,
    -- The database clock, which all replicas share; the time of the change's transaction.
    at       timestamptz NOT NULL DEFAULT now(),
    -- `os:user@host` for the CLI, `key:<key id>` for an API caller, `system:<name>` for Keel itself.
    actor    text        NOT NULL CHECK (actor <> ''),
    -- Dotted lowercase words, e.g. `key.created`, `encryption_key.rotated`.
    action   text        NOT NULL CHECK (action ~ '^[a-z][a-z_]*(\.[a-z][a-z_]*)+$'),
    -- NULL for actions that concern no single tenant, such as an encryption key rotation.
    tenant   text,
    -- The key id or encryption key id the action was about.
    subject  text        NOT NULL CHECK (subject <> ''),
    details  jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object')
);

-- `keel admin audit` reads the newest entries first.
CREATE INDEX audit_log_at ON audit_log (at DESC, id DESC);
