-- Scrape jobs: one row per registered instance, kept in step with the registry's events.
-- Replicas claim due rows with FOR UPDATE SKIP LOCKED; the claim moves next_run_at one
-- interval ahead, so a target is scraped once per interval however many replicas run.
CREATE TABLE targets (
    instance_id      uuid PRIMARY KEY,
    tenant           text NOT NULL,
    name             text NOT NULL,
    engine           text NOT NULL CHECK (engine IN ('postgres', 'redis')),
    labels           jsonb NOT NULL DEFAULT '{}',
    registry_version bigint NOT NULL,
    interval_ms      integer NOT NULL CHECK (interval_ms > 0),
    timeout_ms       integer NOT NULL CHECK (timeout_ms > 0),
    next_run_at      timestamptz NOT NULL DEFAULT now(),
    -- Bumped by every scrape that writes: a scrape whose delta base is no longer the latest
    -- (another replica wrote meanwhile) writes no deltas.
    scrape_seq       bigint NOT NULL DEFAULT 0,
    synced_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX targets_due ON targets (next_run_at);
CREATE INDEX targets_tenant_name ON targets (tenant, name);

-- The outcome of each target's last scrape, and the delta base of the next one.
CREATE TABLE scrape_state (
    instance_id   uuid PRIMARY KEY REFERENCES targets ON DELETE CASCADE,
    scraped_at    timestamptz NOT NULL,
    duration_ms   double precision NOT NULL,
    up            boolean NOT NULL,
    problems      text[] NOT NULL DEFAULT '{}',
    -- Samples of the last successful scrape, for /metrics and GetInstanceMetrics.
    latest        jsonb,
    latest_at     timestamptz,
    -- pg_stat_statements counters of the last scrape (see statements.rs for the layout).
    snapshot      bytea
);

-- Instance-level metrics over time. Deleted in batches once older than the retention.
CREATE TABLE samples (
    instance_id uuid NOT NULL,
    at          timestamptz NOT NULL,
    metric      text NOT NULL,
    labels      jsonb NOT NULL DEFAULT '{}',
    value       double precision NOT NULL
);
CREATE INDEX samples_instance_at ON samples (instance_id, at);
CREATE INDEX samples_at ON samples USING brin (at);

-- pg_stat_statements work between two scrapes, one row per statement that did any.
CREATE TABLE statement_deltas (
    instance_id       uuid NOT NULL,
    at                timestamptz NOT NULL,
    query_id          bigint NOT NULL,
    toplevel          boolean NOT NULL,
    calls             bigint NOT NULL,
    total_exec_ms     double precision NOT NULL,
    rows              bigint NOT NULL,
    shared_blks_hit   bigint NOT NULL,
    shared_blks_read  bigint NOT NULL,
    temp_blks_written bigint NOT NULL,
    wal_bytes         bigint NOT NULL
);
CREATE INDEX statement_deltas_instance_at ON statement_deltas (instance_id, at);
CREATE INDEX statement_deltas_at ON statement_deltas USING brin (at);

-- Normalised texts, read from the target only for query ids not seen before.
CREATE TABLE query_texts (
    instance_id uuid NOT NULL,
    query_id    bigint NOT NULL,
    text        text NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, query_id)
);

-- Alerts raised by the rules. At most one active (pending or firing) row per fingerprint.
CREATE TABLE alerts (
    id            uuid PRIMARY KEY,
    fingerprint   text NOT NULL,
    instance_id   uuid NOT NULL,
    tenant        text NOT NULL,
    instance_name text NOT NULL,
    rule          text NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'firing', 'resolved')),
    labels        jsonb NOT NULL,
    annotations   jsonb NOT NULL,
    value         double precision NOT NULL,
    threshold     double precision NOT NULL,
    active_since  timestamptz NOT NULL,
    fired_at      timestamptz,
    resolved_at   timestamptz
);
CREATE UNIQUE INDEX alerts_active_fingerprint ON alerts (fingerprint) WHERE state <> 'resolved';
CREATE INDEX alerts_instance ON alerts (instance_id, active_since DESC);
CREATE INDEX alerts_tenant ON alerts (tenant, active_since DESC);
