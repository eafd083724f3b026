-- Keyed chains, chain numbers for row ids, signed retention checkpoints.
-- SQLite has no roles: keep the file (and the spool directory, which holds
-- a generated key) readable by meshguard alone.
ALTER TABLE audit_logs ADD COLUMN key_id TEXT;
ALTER TABLE audit_chain_checkpoints ADD COLUMN note TEXT;
CREATE TABLE audit_chains (
    chain_no   INTEGER PRIMARY KEY AUTOINCREMENT,
    chain_id   TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER) * 1000000)
);
