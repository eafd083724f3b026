// Package auditapi serves the audit trail's admin HTTP API (GET /v1/audit/
// logs, entities, users' activity, security events, export), its web front
// end, the audit console under /console/ (console*.go), and writes exports
// as CSV or JSON Lines, for the API, the console and `meshguard audit export`.
// Every read and export is recorded in the trail itself, and so is every
// failed authentication (rate-limited); the caller is the holder of an
// admin token, never whoever a request header names (see api.go).
//
// Metrics (names kept from before the split):
//
//	meshguard_auditsink_api_requests_total{endpoint,code}     endpoint: the API's and console_* pages
//	meshguard_auditsink_api_auth_failures_total{reason}       disabled | missing | invalid_token | invalid_session | csrf
//	meshguard_auditsink_api_auth_failures_unrecorded_total
//	meshguard_auditsink_api_unrecorded_total
//	meshguard_auditsink_export_rows_total{format}
package auditapi
