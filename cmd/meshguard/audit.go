package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/auditapi"
	"github.com/meshguard/meshguard/audittrail"
)

// auditCommands are the subcommands of `meshguard audit`.
var auditCommands = map[string]command{
	"export": {"write the audit trail for a time range as CSV or JSON Lines", runAuditExport},
	"verify": {"check every chain against the key and the witness; fails on tampering, naming chain, seq and what is wrong", runAuditVerify},
	"prune":  {"drop audit partitions older than audit.retention, vouched for by signed retention checkpoints", runAuditPrune},
	"keygen": {"make a signing key for audit.key_file / MESHGUARD_AUDIT_KEY and print its public key", runAuditKeygen},
}

// runAudit dispatches `meshguard audit <subcommand>`.
func runAudit(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		auditUsage(stderr)
		return errUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		auditUsage(stdout)
		return nil
	}
	cmd, ok := auditCommands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "unknown audit command %q\n", args[0])
		auditUsage(stderr)
		return errUsage
	}
	return cmd.run(ctx, args[1:], getenv, stdout, stderr)
}

func auditUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: meshguard audit <command> --config FILE [flags]\n\ncommands:")
	for _, n := range []string{"export", "verify", "prune", "keygen"} {
		fmt.Fprintf(w, "  %-8s %s\n", n, auditCommands[n].summary)
	}
}

// auditEnv is what an audit subcommand works with: the configuration, the
// migrated store, and a cleanup.
type auditEnv struct {
	a     *app
	store auditStore
	kind  string
	close func()
}

// openAuditEnv loads the config and opens (and migrates) the audit store the
// way serve would. Logs go to stderr.
func openAuditEnv(ctx context.Context, configPath string, getenv func(string) string, stderr io.Writer) (*auditEnv, error) {
	cfg, err := loadConfig(configPath, getenv)
	if err != nil {
		return nil, err
	}
	log := newLogger(cfg.Log, cfg.Development(), stderr)
	a := &app{log: log, reg: prometheus.NewRegistry(), cfg: cfg}
	db, err := openDatabase(ctx, a)
	if err != nil {
		return nil, err
	}
	a.db = db
	closeDB := func() {
		if db != nil {
			db.close()
		}
	}
	store, kind, err := openAuditStore(ctx, log.With("component", "auditsink"), cfg.Audit.Config, db)
	if err != nil {
		closeDB()
		return nil, err
	}
	if err := store.Migrate(ctx); err != nil {
		store.Close()
		closeDB()
		return nil, fmt.Errorf("migrating the audit store: %w", err)
	}
	return &auditEnv{a: a, store: store, kind: kind, close: func() { store.Close(); closeDB() }}, nil
}

// runMigrate is `meshguard migrate --config FILE`: apply the audit schema
// (and, on PostgreSQL, create the partitions ahead).
func runMigrate(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "config file (YAML); absent: embedded defaults")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("migrate: unexpected argument %q", fs.Arg(0))
	}
	env, err := openAuditEnv(ctx, *configPath, getenv, stderr)
	if err != nil {
		return err
	}
	defer env.close()
	fmt.Fprintf(stdout, "audit schema up to date (%s)\n", env.kind)
	return nil
}

// timeFlag is an optional RFC 3339 time flag.
type timeFlag struct{ t time.Time }

func (f timeFlag) String() string {
	if f.t.IsZero() {
		return ""
	}
	return f.t.Format(time.RFC3339Nano)
}

func (f *timeFlag) Set(s string) error {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return fmt.Errorf("must be an RFC 3339 time like 2026-01-02T15:04:05Z, got %q", s)
	}
	f.t = t.UTC()
	return nil
}

func checkRange(from, to timeFlag) error {
	if !from.t.IsZero() && !to.t.IsZero() && !from.t.Before(to.t) {
		return fmt.Errorf("--to (%s) must be after --from (%s)", to.String(), from.String())
	}
	return nil
}

// runAuditExport is `meshguard audit export --config FILE --format csv|jsonl
// [--from T] [--to T] [--out FILE]`. The export is recorded in the trail
// (EXPORT by cli:<OS user>) before the first row is read; when that record
// cannot be stored, nothing is exported. With --out the file appears only
// complete: rows go to a temporary file renamed at the end.
func runAuditExport(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("audit export", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "config file (YAML); absent: embedded defaults")
	format := fs.String("format", auditapi.FormatJSONL, "csv or jsonl")
	out := fs.String("out", "", "output file; absent: standard output")
	var from, to timeFlag
	fs.Var(&from, "from", "start of the range, inclusive (RFC 3339); absent: the oldest row")
	fs.Var(&to, "to", "end of the range, exclusive (RFC 3339); absent: now")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("audit export: unexpected argument %q", fs.Arg(0))
	}
	if *format != auditapi.FormatCSV && *format != auditapi.FormatJSONL {
		return fmt.Errorf("audit export: --format must be csv or jsonl, got %q", *format)
	}
	if err := checkRange(from, to); err != nil {
		return fmt.Errorf("audit export: %w", err)
	}
	env, err := openAuditEnv(ctx, *configPath, getenv, stderr)
	if err != nil {
		return err
	}
	defer env.close()
	f := audittrail.Filter{From: from.t, To: to.t}
	if err := recordCLIExport(ctx, env, f, *format, *out); err != nil {
		return err
	}

	w := stdout
	var tmp *os.File
	if *out != "" {
		tmp, err = os.CreateTemp(filepath.Dir(*out), "."+filepath.Base(*out)+".*.tmp")
		if err != nil {
			return fmt.Errorf("audit export: %w", err)
		}
		defer func() {
			if tmp != nil {
				tmp.Close()
				os.Remove(tmp.Name())
			}
		}()
		w = tmp
	}
	rows, err := auditapi.WriteExport(ctx, w, env.store, f, *format)
	if err != nil {
		return fmt.Errorf("audit export after %d rows: %w", rows, err)
	}
	if tmp != nil {
		if err := tmp.Sync(); err != nil {
			return fmt.Errorf("audit export: %w", err)
		}
		if err := tmp.Close(); err != nil {
			return fmt.Errorf("audit export: %w", err)
		}
		if err := os.Rename(tmp.Name(), *out); err != nil {
			return fmt.Errorf("audit export: %w", err)
		}
		tmp = nil
		fmt.Fprintf(stderr, "exported %d rows to %s\n", rows, *out)
	}
	return nil
}

// recordCLIExport stores the EXPORT row of a command-line export through a
// writer of its own: its own chain (so it never collides with a running
// serve's) and a private spool directory (serve holds the configured one).
// The row must reach the store: if it only reached the spool, the export is
// refused.
func recordCLIExport(ctx context.Context, env *auditEnv, f audittrail.Filter, format, out string) error {
	cfg := env.a.cfg.Audit.Config
	keys, err := audittrail.LoadKeyring(cfg.KeySource(), false)
	if err == nil && keys.Current == nil {
		err = errors.New("no signing key (audit.key_file, MESHGUARD_AUDIT_KEY, or the key serve generated in audit.spool_dir)")
	}
	if err != nil {
		return fmt.Errorf("recording the export: %w", err)
	}
	cfg.WitnessDir = cfg.WitnessDirectory() // the configured witness, not the private spool's
	cfg.ChainID = ""                        // a fresh chain: hostname + start time
	spoolDir, err := os.MkdirTemp("", "meshguard-cli-spool-*")
	if err != nil {
		return fmt.Errorf("recording the export: %w", err)
	}
	cfg.SpoolDir = spoolDir
	w, err := newAuditWriter(env.a.log.With("component", "auditsink"), prometheus.NewRegistry(), cfg, env.store, keys)
	if err != nil {
		os.RemoveAll(spoolDir)
		return fmt.Errorf("recording the export: %w", err)
	}
	name := "unknown"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	rec := auditapi.CLIExportRecord(time.Now(), name, f, format, out)
	err = w.Enqueue(ctx, []audittrail.Record{rec})
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*cfg.WriteTimeout)
	defer cancel()
	err = errors.Join(err, w.Close(cctx))
	if st := w.Status(); err == nil && (st.SpoolSegments > 0 || st.LastError != "") {
		err = fmt.Errorf("the audit store did not take it (%s); the row is kept in %s", st.LastError, spoolDir)
		return fmt.Errorf("recording the export: %w", err)
	}
	os.RemoveAll(spoolDir)
	if err != nil {
		return fmt.Errorf("recording the export: %w", err)
	}
	return nil
}

// runAuditVerify is `meshguard audit verify --config FILE [--from T] [--to T]
// [--witness DIR] [--json]`. It checks every chain against the keys of the
// config (private keys: every row's MAC; public keys: the signatures) and
// the witness, and returns an error (exit status 1) naming the chain, the
// seq and what is wrong when anything does not match.
func runAuditVerify(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("audit verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "config file (YAML); absent: embedded defaults")
	witnessDir := fs.String("witness", "", "witness directory of signed checkpoints; absent: audit.witness_dir")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	var from, to timeFlag
	fs.Var(&from, "from", "start of the range, inclusive (RFC 3339); absent: the whole trail")
	fs.Var(&to, "to", "end of the range, exclusive (RFC 3339)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("audit verify: unexpected argument %q", fs.Arg(0))
	}
	if err := checkRange(from, to); err != nil {
		return fmt.Errorf("audit verify: %w", err)
	}
	env, err := openAuditEnv(ctx, *configPath, getenv, stderr)
	if err != nil {
		return err
	}
	defer env.close()
	cfg := env.a.cfg.Audit
	keys, err := audittrail.LoadKeyring(cfg.KeySource(), false)
	if err != nil {
		return fmt.Errorf("audit verify: %w", err)
	}
	if !keys.HasPrivate() && len(cfg.TrustedKeys) == 0 {
		return errors.New("audit verify: no key: configure audit.key_file or MESHGUARD_AUDIT_KEY (checks every row), or audit.trusted_keys (checks signed checkpoints only)")
	}
	dir := *witnessDir
	if dir == "" {
		dir = cfg.WitnessDirectory()
	}
	rep, err := audittrail.VerifyWitnessed(ctx, env.store, dir, audittrail.VerifyOptions{From: from.t, To: to.t, Keys: keys})
	if err != nil {
		return fmt.Errorf("audit verify: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else if rep.OK {
		fmt.Fprintf(stdout, "ok: %d rows in %d chains verified; %d chains match their signed checkpoints; %d pruned rows vouched for by signed retention checkpoints\n",
			rep.Rows, rep.Chains, rep.Witnessed, rep.Pruned)
		if !rep.MACsChecked {
			fmt.Fprintln(stdout, "note: no private key: row MACs not checked; rows after a chain's last checkpoint are not vouched for")
		}
		if rep.AfterCheckpoint > 0 {
			fmt.Fprintf(stdout, "note: %d rows were written after their chain's last checkpoint (vouched for by MACs only)\n", rep.AfterCheckpoint)
		}
		for _, c := range rep.Unwitnessed {
			fmt.Fprintf(stdout, "note: chain %q has no checkpoint in the witness (writer killed before its first); its rows are vouched for by MACs only\n", c)
		}
	}
	if !rep.OK {
		b := "unknown break"
		if rep.Break != nil {
			b = rep.Break.String()
		}
		if !*asJSON {
			fmt.Fprintf(stdout, "TAMPERED: %s\n", b)
		}
		return fmt.Errorf("audit trail failed verification: %s", b)
	}
	return nil
}

// runAuditPrune is `meshguard audit prune --config FILE`: drop whole
// partitions (months) older than audit.retention, after recording chain
// checkpoints so verification still passes.
func runAuditPrune(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("audit prune", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "config file (YAML); absent: embedded defaults")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("audit prune: unexpected argument %q", fs.Arg(0))
	}
	env, err := openAuditEnv(ctx, *configPath, getenv, stderr)
	if err != nil {
		return err
	}
	defer env.close()
	keys, err := audittrail.LoadKeyring(env.a.cfg.Audit.KeySource(), false)
	if err == nil && keys.Current == nil {
		err = errors.New("no signing key to sign retention checkpoints with (audit.key_file or MESHGUARD_AUDIT_KEY)")
	}
	if err != nil {
		return fmt.Errorf("audit prune: %w", err)
	}
	dropped, err := env.store.Prune(ctx, time.Now(), keys)
	if err != nil {
		return fmt.Errorf("audit prune: %w", err)
	}
	if len(dropped) == 0 {
		fmt.Fprintf(stdout, "nothing older than %s to prune\n", env.a.cfg.Audit.Retention)
		return nil
	}
	fmt.Fprintf(stdout, "pruned %d partitions: %s\n", len(dropped), strings.Join(dropped, ", "))
	return nil
}

// runAuditKeygen is `meshguard audit keygen [--name NAME] --out FILE`: write
// a new signing key to FILE (created 0600, never overwritten) and print its
// public key, for audit.trusted_keys and checkpoint collectors.
func runAuditKeygen(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("audit keygen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	name := fs.String("name", audittrail.DefaultKeyName, "key name, shown in every signature")
	out := fs.String("out", "", "file to write the private key to (required)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("audit keygen: unexpected argument %q", fs.Arg(0))
	}
	if *out == "" {
		return errors.New("audit keygen: --out FILE is required")
	}
	skey, vkey, err := audittrail.GenerateKey(*name)
	if err != nil {
		return fmt.Errorf("audit keygen: %w", err)
	}
	f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("audit keygen: %w", err)
	}
	if _, err := f.WriteString(skey + "\n"); err != nil {
		f.Close()
		return fmt.Errorf("audit keygen: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("audit keygen: %w", err)
	}
	fmt.Fprintln(stdout, vkey)
	return nil
}
