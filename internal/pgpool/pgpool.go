// Package pgpool is the PostgreSQL connection pool that the audit sink and the
// tenant-origin watcher share: configuration, start-up, health and statistics.
package pgpool
