-- Analyses: job rows any replica may claim (FOR UPDATE SKIP LOCKED). A claim holds a lease
-- the runner renews; a runner that dies leaves a lapsed lease, and the job is claimed again.
CREATE TABLE analyses (
    id               uuid PRIMARY KEY,
    tenant           text NOT NULL,
    instance_id      uuid NOT NULL,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'done', 'failed')),
    budget_bytes     bigint NOT NULL CHECK (budget_bytes >= 0),
    max_indexes      integer NOT NULL CHECK (max_indexes > 0),
    window_seconds   integer NOT NULL CHECK (window_seconds > 0),
    max_statements   integer NOT NULL CHECK (max_statements > 0),
    attempts         integer NOT NULL DEFAULT 0,
    lease_until      timestamptz NOT NULL DEFAULT now(),
    phase            text NOT NULL DEFAULT 'queued',
    message          text NOT NULL DEFAULT '',
    whatif_calls     bigint NOT NULL DEFAULT 0,
    -- The finished analysis: workload source, statements with their outcome, counters.
    result           jsonb,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX analyses_claimable ON analyses (lease_until) WHERE state IN ('queued', 'running');
CREATE INDEX analyses_instance ON analyses (tenant, instance_id, created_at DESC);

-- Recommendations and their state machine:
-- proposed → applying → applied → rolling_back → rolled_back, or failed (with the reason).
-- An apply or rollback in flight is a row in 'applying' / 'rolling_back' with a lease; the
-- worker that holds it renews it, and a lapsed lease (a killed process) is claimed again and
-- resumed from what the target shows (the index exists, is valid, is invalid, or is absent).
CREATE TABLE recommendations (
    id               uuid PRIMARY KEY,
    tenant           text NOT NULL,
    instance_id      uuid NOT NULL,
    analysis_id      uuid NOT NULL REFERENCES analyses ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind IN ('create_index', 'drop_index')),
    state            text NOT NULL DEFAULT 'proposed'
                     CHECK (state IN ('proposed', 'applying', 'applied', 'rolling_back', 'rolled_back', 'failed')),
    state_reason     text NOT NULL DEFAULT '',
    table_name       text NOT NULL,
    index_schema     text NOT NULL,
    index_name       text NOT NULL,
    ddl              text NOT NULL,
    rollback_ddl     text NOT NULL,
    estimated_bytes  bigint NOT NULL,
    hypopg_bytes     bigint NOT NULL DEFAULT 0,
    built_bytes      bigint NOT NULL DEFAULT 0,
    write_cost       double precision NOT NULL,
    benefit          double precision NOT NULL,
    share_of_time    double precision NOT NULL,
    -- The statements it helps, with plans and costs before and after (what-if, then measured).
    effects          jsonb NOT NULL DEFAULT '[]',
    explanation      text NOT NULL,
    lease_until      timestamptz NOT NULL DEFAULT now(),
    -- A failed build left an invalid index that could not be dropped at once (the lock it needs
    -- was held): a worker drops it as soon as it can.
    cleanup_pending  boolean NOT NULL DEFAULT false,
    version          bigint NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recommendations_in_flight ON recommendations (lease_until)
    WHERE state IN ('applying', 'rolling_back') OR cleanup_pending;
CREATE INDEX recommendations_instance ON recommendations (tenant, instance_id, created_at DESC);
