-- Keyed chains, chain numbers for row ids, signed retention checkpoints,
-- and least privilege: serve writes as meshguard_audit_writer (INSERT and
-- SELECT only), retention drops partitions as meshguard_audit_retention
-- (through audit_drop_partition only). Grant these NOLOGIN roles to the
-- login roles of each job: GRANT meshguard_audit_writer TO <serve's user>.
ALTER TABLE audit_logs ADD COLUMN key_id text;
ALTER TABLE audit_chain_checkpoints ADD COLUMN note text;

-- A chain's number is the high half of its rows' ids (id = chain_no << 32 | seq).
CREATE TABLE audit_chains (
    chain_no   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id   text        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Roles are per cluster: another database's migration may have made them.
-- Creating them needs CREATEROLE once; a DBA may create them beforehand.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meshguard_audit_writer') THEN
        CREATE ROLE meshguard_audit_writer NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meshguard_audit_retention') THEN
        CREATE ROLE meshguard_audit_retention NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- Monthly partitions, created by the schema owner on the caller's behalf:
-- neither role needs any DDL privilege.
CREATE FUNCTION audit_ensure_partition(month date) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    name text := 'audit_logs_p' || to_char(month, 'YYYYMM');
    lo timestamptz := month::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF month <> date_trunc('month', month)::date THEN
        RAISE EXCEPTION 'audit_ensure_partition: % is not the first day of a month', month;
    END IF;
    IF to_regclass(name) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF audit_logs FOR VALUES FROM (%L) TO (%L)',
            name, lo, (month + interval '1 month')::timestamp AT TIME ZONE 'UTC');
    END IF;
END $$;

-- Retention's only way to remove rows: a whole partition whose month ended
-- more than a day ago (the shortest audit.retention), detached and dropped.
CREATE FUNCTION audit_drop_partition(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    month date;
BEGIN
    IF name !~ '^audit_logs_p[0-9]{6}$' THEN
        RAISE EXCEPTION 'audit_drop_partition: % is not an audit partition name', name;
    END IF;
    month := to_date(substr(name, 13), 'YYYYMM');
    IF (month + interval '1 month')::timestamp AT TIME ZONE 'UTC' > now() - interval '1 day' THEN
        RAISE EXCEPTION 'audit_drop_partition: % is not older than a day', name;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                   WHERE i.inhparent = 'audit_logs'::regclass AND c.relname = name) THEN
        RAISE EXCEPTION 'audit_drop_partition: % is not a partition of audit_logs', name;
    END IF;
    EXECUTE format('ALTER TABLE audit_logs DETACH PARTITION %I', name);
    EXECUTE format('DROP TABLE %I', name);
END $$;

REVOKE ALL ON audit_logs, audit_chain_checkpoints, audit_chains, audit_schema_migrations FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_ensure_partition(date), audit_drop_partition(text) FROM PUBLIC;

GRANT SELECT, INSERT ON audit_logs, audit_chains TO meshguard_audit_writer;
GRANT SELECT ON audit_chain_checkpoints, audit_schema_migrations TO meshguard_audit_writer;
GRANT EXECUTE ON FUNCTION audit_ensure_partition(date) TO meshguard_audit_writer;

GRANT SELECT ON audit_logs, audit_chains, audit_schema_migrations TO meshguard_audit_retention;
GRANT SELECT, INSERT ON audit_chain_checkpoints TO meshguard_audit_retention;
GRANT EXECUTE ON FUNCTION audit_ensure_partition(date), audit_drop_partition(text) TO meshguard_audit_retention;
