package audittrail

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/meshguard/meshguard/internal/secret"
)

// Config is the trail's part of the `audit:` section: store, writer, spool,
// keys, witness and retention. (Ingest rules are auditsink.Config, the admin
// API's token auditapi.Config; the three share the YAML section.)
type Config struct {
	// Retention is how long rows are kept; whole monthly partitions older
	// than this are dropped (after a chain checkpoint is recorded).
	Retention time.Duration `yaml:"retention"`
	// RetentionInterval is how often the background retention loop runs.
	// Zero: no background loop (`meshguard audit prune` only).
	RetentionInterval time.Duration `yaml:"retention_interval"`
	// PartitionsAhead is how many monthly partitions after the current one are
	// kept created in advance (PostgreSQL only).
	PartitionsAhead int `yaml:"partitions_ahead"`
	// SpoolDir holds batches the database could not take yet.
	SpoolDir string `yaml:"spool_dir"`
	// SpoolMaxBytes bounds the spool on disk. When it is reached the writer
	// applies SpoolFullPolicy; a batch whose write already failed is still
	// spooled (the limit is exceeded by at most one batch), so nothing
	// accepted is lost.
	SpoolMaxBytes int64 `yaml:"spool_max_bytes"`
	// SpoolFullPolicy is "block" (stop taking records: the queue fills and
	// Enqueue waits, so streams stall) or "drop" (discard new batches and
	// count them in meshguard_auditsink_dropped_records_total).
	SpoolFullPolicy string `yaml:"spool_full_policy"`
	// SQLitePath is the embedded store used when no database is configured.
	SQLitePath string `yaml:"sqlite_path"`

	// BatchSize is the most records written in one COPY.
	BatchSize int `yaml:"batch_size"`
	// BatchInterval is the longest a record waits in the queue before a
	// partial batch is written.
	BatchInterval time.Duration `yaml:"batch_interval"`
	// QueueSize bounds the records held in memory between Enqueue and the
	// database or spool. Must be at least BatchSize.
	QueueSize int `yaml:"queue_size"`
	// WriteTimeout bounds one batch write to the database; after it the batch
	// goes to the spool.
	WriteTimeout time.Duration `yaml:"write_timeout"`

	// CheckpointInterval is how often a growing chain's signed checkpoint is
	// published to WitnessDir (besides its first write and shutdown).
	CheckpointInterval time.Duration `yaml:"checkpoint_interval"`
	// WitnessDir receives each chain's latest signed checkpoint. Keep it
	// where the database administrator cannot write (a volume of its own,
	// shipped off the host by a collector). Empty: <spool_dir>/witness.
	WitnessDir string `yaml:"witness_dir"`
	// ChainID prefixes this writer's chain ids: each start begins the chain
	// <chain_id>/<start time in ns>, so a restart never reuses seqs. Empty:
	// the hostname.
	ChainID string `yaml:"chain_id"`

	// KeyFile holds the signing key (note format, PRIVATE+KEY+...). Empty
	// (and MESHGUARD_AUDIT_KEY unset): serve generates one in SpoolDir.
	KeyFile string `yaml:"key_file"`
	// Key comes from MESHGUARD_AUDIT_KEY, never from the file; it wins over KeyFile.
	Key secret.String `yaml:"-"`
	// PreviousKeyFiles are the keys of earlier rotations: their rows' MACs
	// still verify.
	PreviousKeyFiles []string `yaml:"previous_key_files"`
	// TrustedKeys are public keys (name+hash+base64) whose checkpoints are
	// accepted, for a verifier that holds no private key.
	TrustedKeys []string `yaml:"trusted_keys"`
}

// Spool-full policies.
const (
	SpoolFullBlock = "block"
	SpoolFullDrop  = "drop"
)

// DefaultConfig returns the defaults for the audit section.
func DefaultConfig() Config {
	return Config{
		Retention:          8760 * time.Hour,
		RetentionInterval:  time.Hour,
		PartitionsAhead:    3,
		SpoolDir:           "./meshguard-spool",
		SpoolMaxBytes:      1 << 30,
		SpoolFullPolicy:    SpoolFullBlock,
		SQLitePath:         "./meshguard-audit.db",
		BatchSize:          10000,
		BatchInterval:      200 * time.Millisecond,
		QueueSize:          100000,
		WriteTimeout:       10 * time.Second,
		CheckpointInterval: time.Minute,
	}
}

// Validate reports every invalid field, naming it by its YAML path.
func (c Config) Validate() error { return c.validateStore() }

func (c Config) validateStore() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Retention <= 0 {
		add("audit.retention: must be positive, got %q", c.Retention)
	} else if c.Retention < 24*time.Hour {
		add("audit.retention: must be at least 24h (partitions are monthly), got %q", c.Retention)
	}
	if c.RetentionInterval < 0 {
		add("audit.retention_interval: must not be negative, got %q", c.RetentionInterval)
	}
	if c.PartitionsAhead < 1 || c.PartitionsAhead > 36 {
		add("audit.partitions_ahead: must be between 1 and 36, got %d", c.PartitionsAhead)
	}
	if c.SpoolDir == "" {
		add("audit.spool_dir: must be set")
	}
	if c.SpoolMaxBytes < 1<<20 {
		add("audit.spool_max_bytes: must be at least 1048576 (1 MiB), got %d", c.SpoolMaxBytes)
	}
	if c.SpoolFullPolicy != SpoolFullBlock && c.SpoolFullPolicy != SpoolFullDrop {
		add("audit.spool_full_policy: must be block or drop, got %q", c.SpoolFullPolicy)
	}
	if c.BatchSize < 1 || c.BatchSize > 100000 {
		add("audit.batch_size: must be between 1 and 100000, got %d", c.BatchSize)
	}
	if c.BatchInterval <= 0 {
		add("audit.batch_interval: must be positive, got %q", c.BatchInterval)
	}
	if c.QueueSize < c.BatchSize {
		add("audit.queue_size: must be at least audit.batch_size (%d), got %d", c.BatchSize, c.QueueSize)
	}
	if c.WriteTimeout <= 0 {
		add("audit.write_timeout: must be positive, got %q", c.WriteTimeout)
	}
	if c.CheckpointInterval <= 0 {
		add("audit.checkpoint_interval: must be positive, got %q", c.CheckpointInterval)
	}
	if c.WitnessDir != "" && filepath.Clean(c.WitnessDir) == filepath.Clean(c.SpoolDir) {
		add("audit.witness_dir: must not be audit.spool_dir itself, got %q", c.WitnessDir)
	}
	if c.ChainID != "" && (len(c.ChainID) > 200 || !validKeyName(c.ChainID)) {
		add("audit.chain_id: must be at most 200 printable bytes without spaces or '+', got %q", c.ChainID)
	}
	for i, vk := range c.TrustedKeys {
		if _, err := note.NewVerifier(vk); err != nil {
			add("audit.trusted_keys[%d]: not a public key (name+hash+base64), got %q", i, vk)
		}
	}
	return errors.Join(errs...)
}

// WitnessDirectory is audit.witness_dir, or <spool_dir>/witness when unset.
func (c Config) WitnessDirectory() string {
	if c.WitnessDir != "" {
		return c.WitnessDir
	}
	return filepath.Join(c.SpoolDir, "witness")
}

// KeySource is where LoadKeyring finds this config's keys.
func (c Config) KeySource() KeySource {
	return KeySource{Key: c.Key.Reveal(), KeyFile: c.KeyFile, PreviousKeyFiles: c.PreviousKeyFiles,
		TrustedKeys: c.TrustedKeys, SpoolDir: c.SpoolDir}
}
