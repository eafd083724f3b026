// Package audittrail is the tamper-evident audit trail: the Record, its
// keyed chain and Merkle tree (chain.go, merkle.go, keys.go), the signed
// checkpoints published to a witness outside the database (checkpoint.go),
// the durable writer with its disk spool (writer.go, spool.go), the two
// stores (PostgreSQL, and SQLite when no database is configured) behind one
// shared implementation (store.go), signed retention (retention.go), and
// Verify, which holds the rows against the keys and the witness
// (verify.go). Ingest (package auditsink) and the admin API (package
// auditapi) write and read through it; the database never holds a key.
//
// Metrics (names kept from before the split, so dashboards still read them):
//
//	meshguard_auditsink_writer_stored_records_total{path}   direct | replay
//	meshguard_auditsink_writer_dropped_records_total{reason} queue_full | spool_full
//	meshguard_auditsink_writer_duplicate_batches_total
//	meshguard_auditsink_writer_write_errors_total
//	meshguard_auditsink_writer_batch_duration_seconds
//	meshguard_auditsink_writer_queue_records
//	meshguard_auditsink_spool_records_total, _bytes, _segments, _full
//	meshguard_auditsink_spool_corrupt_segments_total, _rejected_segments_total
//	meshguard_auditsink_chain_head_seq
package audittrail
