-- The embedded audit trail (no database configured): same columns and
-- chain as PostgreSQL, one plain table. created_at is Unix microseconds (UTC).
CREATE TABLE audit_logs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at  INTEGER NOT NULL,
    action      TEXT    NOT NULL,
    severity    TEXT    NOT NULL,
    entity_type TEXT,
    entity_id   TEXT,
    user_id     TEXT,
    ip_address  TEXT,
    user_agent  TEXT,
    method      TEXT,
    path        TEXT,
    status      INTEGER,
    request_id  TEXT,
    origin      TEXT,
    tenant      TEXT,
    metadata    TEXT,
    old_values  TEXT,
    new_values  TEXT,
    chain_id    TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    prev_hash   BLOB    NOT NULL,
    hash        BLOB    NOT NULL,
    UNIQUE (chain_id, seq)
);
CREATE INDEX audit_logs_created_at_id_idx ON audit_logs (created_at, id);
CREATE INDEX audit_logs_action_idx ON audit_logs (action, created_at);
CREATE INDEX audit_logs_user_idx ON audit_logs (user_id, created_at) WHERE user_id IS NOT NULL;
CREATE INDEX audit_logs_entity_idx ON audit_logs (entity_type, entity_id, created_at) WHERE entity_type IS NOT NULL;
CREATE INDEX audit_logs_tenant_idx ON audit_logs (tenant, created_at) WHERE tenant IS NOT NULL;

CREATE TABLE audit_chain_checkpoints (
    chain_id        TEXT    NOT NULL,
    first_seq       INTEGER NOT NULL,
    last_seq        INTEGER NOT NULL,
    first_prev_hash BLOB    NOT NULL,
    last_hash       BLOB    NOT NULL,
    row_count       INTEGER NOT NULL,
    partition_name  TEXT    NOT NULL,
    recorded_at     INTEGER NOT NULL,
    PRIMARY KEY (chain_id, first_seq)
);
