-- The audit trail: one row per kept access-log entry or security event,
-- range-partitioned by month on created_at. Monthly partitions are created
-- ahead by the application (there is no DEFAULT partition, so retention can
-- detach partitions and new ones attach without a scan).
CREATE TABLE audit_logs (
    id          bigserial   NOT NULL,
    created_at  timestamptz NOT NULL,
    action      text        NOT NULL,
    severity    text        NOT NULL,
    entity_type text,
    entity_id   text,
    user_id     text,
    ip_address  text,
    user_agent  text,
    method      text,
    path        text,
    status      integer,
    request_id  text,
    origin      text,
    tenant      text,
    metadata    jsonb,
    old_values  jsonb,
    new_values  jsonb,
    -- Tamper evidence: the hash chain assigned by the single writer of each chain.
    chain_id    text        NOT NULL,
    seq         bigint      NOT NULL,
    prev_hash   bytea       NOT NULL,
    hash        bytea       NOT NULL,
    PRIMARY KEY (id, created_at),
    -- The idempotency key: a batch replayed from the spool after a crash
    -- collides here instead of being stored twice.
    UNIQUE (chain_id, seq, created_at)
) PARTITION BY RANGE (created_at);

-- Keyset order of the admin API and exports.
CREATE INDEX audit_logs_created_at_id_idx ON audit_logs (created_at, id);
CREATE INDEX audit_logs_action_idx ON audit_logs (action, created_at);
CREATE INDEX audit_logs_user_idx ON audit_logs (user_id, created_at) WHERE user_id IS NOT NULL;
CREATE INDEX audit_logs_entity_idx ON audit_logs (entity_type, entity_id, created_at) WHERE entity_type IS NOT NULL;
CREATE INDEX audit_logs_tenant_idx ON audit_logs (tenant, created_at) WHERE tenant IS NOT NULL;

-- Before a partition is dropped, every run of consecutive seqs it holds per
-- chain is recorded here, so verification can bridge the gap it leaves.
CREATE TABLE audit_chain_checkpoints (
    chain_id        text        NOT NULL,
    first_seq       bigint      NOT NULL,
    last_seq        bigint      NOT NULL,
    first_prev_hash bytea       NOT NULL,
    last_hash       bytea       NOT NULL,
    row_count       bigint      NOT NULL,
    partition_name  text        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, first_seq)
);
