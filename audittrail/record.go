package audittrail

import (
	"context"
	"encoding/json"
	"time"
)

// Record is one row of the audit trail (table audit_logs). Ingest (the ALS
// server, CSP reports, the admin API auditing itself) builds Records; the
// writer assigns the chain columns and stores them.
type Record struct {
	ID         int64     `json:"id"`         // assigned by the store; 0 before
	CreatedAt  time.Time `json:"created_at"` // event time (entry start time), UTC
	Action     string    `json:"action"`     // e.g. LOGIN_FAILURE, CREATE, CORS_VIOLATION
	Severity   string    `json:"severity"`   // LOW | MEDIUM | HIGH | CRITICAL
	EntityType string    `json:"entity_type,omitempty"`
	EntityID   string    `json:"entity_id,omitempty"`
	UserID     string    `json:"user_id,omitempty"`
	IPAddress  string    `json:"ip_address,omitempty"`
	UserAgent  string    `json:"user_agent,omitempty"`
	Method     string    `json:"method,omitempty"`
	Path       string    `json:"path,omitempty"` // secrets in the query already redacted
	Status     int       `json:"status,omitempty"`
	RequestID  string    `json:"request_id,omitempty"`
	Origin     string    `json:"origin,omitempty"`
	Tenant     string    `json:"tenant,omitempty"`
	// Metadata, OldValues and NewValues are JSON objects (jsonb); nil is SQL NULL.
	Metadata  json.RawMessage `json:"metadata,omitempty"`
	OldValues json.RawMessage `json:"old_values,omitempty"`
	NewValues json.RawMessage `json:"new_values,omitempty"`

	// Tamper evidence, set by the single writer of each chain.
	ChainID  string `json:"chain_id,omitempty"` // which chain the row belongs to
	Seq      int64  `json:"seq,omitempty"`      // position in its chain, from 1
	KeyID    string `json:"key_id,omitempty"`   // the key that MACs the row (and signs its chain's checkpoints)
	PrevHash []byte `json:"prev_hash,omitempty"`
	Hash     []byte `json:"hash,omitempty"` // HMAC-SHA256 of the row's leaf hash, see chain.go
}

// Severities.
const (
	SeverityLow      = "LOW"
	SeverityMedium   = "MEDIUM"
	SeverityHigh     = "HIGH"
	SeverityCritical = "CRITICAL"
)

// Filter selects rows for the admin API and exports. Zero fields match all.
type Filter struct {
	From, To   time.Time // CreatedAt in [From, To)
	Actions    []string
	Severity   string
	UserID     string
	EntityType string
	EntityID   string
	Status     int
	Tenant     string
	IPAddress  string // exact match, as stored
	ID         int64  // one row by its id (0: any)
}

// Cursor is a keyset pagination position: rows strictly after it in
// (created_at DESC, id DESC) order. The zero Cursor starts at the newest row.
type Cursor struct {
	CreatedAt time.Time
	ID        int64
}

// recordReader is what Verify reads rows through; both stores (PostgreSQL
// and the embedded SQLite) implement it, and the admin API reads through
// the same two methods.
type recordReader interface {
	// List returns up to limit rows matching f after cur, newest first, and
	// the cursor of the last row returned (zero when there are no more).
	List(ctx context.Context, f Filter, cur Cursor, limit int) ([]Record, Cursor, error)
	// Scan calls fn for every row matching f in (created_at, id) ascending
	// order, streaming: it never holds the whole range in memory.
	Scan(ctx context.Context, f Filter, fn func(*Record) error) error
}
