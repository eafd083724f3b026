package auditsink

import (
	"net/netip"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshguard/meshguard/audittrail"
)

// extAuthzNamespace is where Envoy puts ext_authz's dynamic metadata. Only
// ext_authz (meshguard) can write it; clients cannot forge it.
const extAuthzNamespace = "envoy.filters.http.ext_authz"

// Keys meshguard's ext_authz server sets in its dynamic metadata.
const (
	metaUser     = "user"     // authenticated user id → audittrail.Record.UserID
	metaRole     = "role"     // user's role → metadata.role
	metaTenant   = "tenant"   // tenant → audittrail.Record.Tenant
	metaOrigin   = "origin"   // normalised Origin → audittrail.Record.Origin when no origin header was logged
	metaDecision = "decision" // allow | deny | preflight → metadata.decision
	metaReason   = "reason"   // why, e.g. origin_not_allowed → metadata.reason
	metaClient   = "client"   // rate-limit client key → metadata.client
)

// Bounds on what one access-log entry contributes to a row. Longer values
// are cut on a UTF-8 boundary.
const (
	maxPathLen      = 2048
	maxUserAgentLen = 512
	maxShortLen     = 256 // authority, origin, header values, node, ...
	maxIDLen        = 128 // request id, user, tenant, role
)

// entryView is what rules look at. Building it does not allocate.
type entryView struct {
	tcp    bool
	method corev3.RequestMethod
	path   string // without the query
	segs   splitPath
	status uint32 // 0: no response
	flags  uint64
	authz  map[string]*structpb.Value
}

// streamIdentity is the per-stream identifier (first message only), kept
// as a ready-to-append JSON fragment.
type streamIdentity struct {
	json []byte // `"node":"…","cluster":"…","log_name":"…"` or empty
}

func newStreamIdentity(id *alsv3.StreamAccessLogsMessage_Identifier) streamIdentity {
	var b []byte
	field := func(k, v string) {
		if v == "" {
			return
		}
		if len(b) > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, k)
		b = append(b, ':')
		b = appendJSONString(b, truncate(v, maxShortLen))
	}
	field("node", id.GetNode().GetId())
	field("cluster", id.GetNode().GetCluster())
	field("log_name", id.GetLogName())
	return streamIdentity{json: b}
}

// mapper turns access-log entries into Records. It is immutable and safe
// for concurrent use.
type mapper struct {
	rules       *ruleSet
	reqHeaders  []string // lower case
	respHeaders []string
	now         func() time.Time
}

// httpOutcome says what became of one HTTP entry.
type outcome uint8

const (
	outKept outcome = iota
	outDropRule
	outUnmatched
	outIntermediate
)

// mapHTTP classifies e and, when a rule keeps it, fills rec. It returns the
// matched rule (nil when none matched or the entry is intermediate).
func (m *mapper) mapHTTP(id *streamIdentity, e *accesslogv3.HTTPAccessLogEntry, rec *audittrail.Record) (*rule, outcome) {
	c := e.GetCommonProperties()
	switch c.GetAccessLogType() {
	case accesslogv3.AccessLogType_NotSet, accesslogv3.AccessLogType_DownstreamEnd:
	default:
		return nil, outIntermediate
	}
	// Envoys before access_log_type mark start/periodic entries this way.
	//lint:ignore SA1019 older Envoys still send it
	if c.GetIntermediateLogEntry() {
		return nil, outIntermediate
	}
	req, resp := e.GetRequest(), e.GetResponse()
	rawPath := req.GetPath()
	v := entryView{
		method: req.GetRequestMethod(),
		path:   pathOnly(rawPath),
		flags:  flagBits(c.GetResponseFlags()),
		authz:  c.GetMetadata().GetFilterMetadata()[extAuthzNamespace].GetFields(),
	}
	if rc := resp.GetResponseCode(); rc != nil {
		v.status = rc.GetValue()
	}
	var caps [maxCaptures]string
	r := m.rules.classify(&v, &caps)
	if r == nil {
		return nil, outUnmatched
	}
	if r.drop {
		return r, outDropRule
	}

	*rec = audittrail.Record{
		Action:     r.action.expand(&caps, maxActionLen),
		Severity:   r.severity,
		EntityType: clean(r.entType.expand(&caps, maxEntityLen)),
		EntityID:   clean(r.entID.expand(&caps, maxEntityLen)),
		Method:     methodName(v.method),
		Path:       boundedPath(rawPath),
		Status:     int(v.status),
		RequestID:  clean(truncate(req.GetRequestId(), maxIDLen)),
		UserAgent:  clean(truncate(req.GetUserAgent(), maxUserAgentLen)),
	}
	var claimed *timestamppb.Timestamp
	rec.CreatedAt, claimed = m.eventTime(c)
	meta := make([]byte, 0, 384)
	ip, rawIP := ipOf(c.GetDownstreamRemoteAddress())
	rec.IPAddress = ip
	authzStr := func(k string, max int) string {
		s, _ := metaString(v.authz, k)
		return clean(truncate(s, max))
	}
	rec.UserID = authzStr(metaUser, maxIDLen)
	rec.Tenant = authzStr(metaTenant, maxIDLen)
	rec.Origin = clean(truncate(req.GetRequestHeaders()["origin"], maxShortLen))
	if rec.Origin == "" {
		rec.Origin = authzStr(metaOrigin, maxShortLen)
	}

	meta = append(meta, '{')
	meta = appendRaw(meta, id.json)
	meta = appendField(meta, "rule", r.name)
	meta = appendClaimedTime(meta, claimed)
	meta = appendField(meta, "authority", truncate(req.GetAuthority(), maxShortLen))
	meta = appendDuration(meta, c)
	if v.flags != 0 {
		meta = appendKey(meta, "response_flags")
		meta = appendFlags(meta, v.flags)
	}
	if v.status == 0 {
		meta = appendKey(meta, "no_response")
		meta = append(meta, "true"...)
	}
	meta = appendField(meta, "response_code_details", truncate(resp.GetResponseCodeDetails(), maxShortLen))
	meta = appendField(meta, "role", authzStr(metaRole, maxIDLen))
	meta = appendField(meta, "decision", authzStr(metaDecision, maxIDLen))
	meta = appendField(meta, "reason", authzStr(metaReason, maxIDLen))
	meta = appendField(meta, "client", authzStr(metaClient, maxShortLen))
	meta = appendField(meta, "route", truncate(c.GetRouteName(), maxShortLen))
	meta = appendField(meta, "upstream_cluster", truncate(c.GetUpstreamCluster(), maxShortLen))
	meta = appendField(meta, "forwarded_for", truncate(req.GetForwardedFor(), maxShortLen))
	if rawIP != "" {
		meta = appendField(meta, "remote_address", truncate(rawIP, maxShortLen))
	}
	if peer, _ := ipOf(c.GetDownstreamDirectRemoteAddress()); peer != "" && peer != ip {
		meta = appendField(meta, "peer_address", peer)
	}
	if op := req.GetOriginalPath(); op != "" {
		meta = appendField(meta, "original_path", boundedPath(op))
	}
	meta = appendHeaders(meta, "request_headers", m.reqHeaders, req.GetRequestHeaders())
	meta = appendHeaders(meta, "response_headers", m.respHeaders, resp.GetResponseHeaders())
	rec.Metadata = append(meta, '}')
	return r, outKept
}

// mapTCP classifies a TCP entry (kind: tcp rules) and fills rec when kept.
func (m *mapper) mapTCP(id *streamIdentity, e *accesslogv3.TCPAccessLogEntry, rec *audittrail.Record) (*rule, outcome) {
	c := e.GetCommonProperties()
	switch c.GetAccessLogType() {
	case accesslogv3.AccessLogType_NotSet, accesslogv3.AccessLogType_TcpConnectionEnd:
	default:
		return nil, outIntermediate
	}
	v := entryView{
		tcp:   true,
		flags: flagBits(c.GetResponseFlags()),
		authz: c.GetMetadata().GetFilterMetadata()[extAuthzNamespace].GetFields(),
	}
	var caps [maxCaptures]string
	r := m.rules.classify(&v, &caps)
	if r == nil {
		return nil, outUnmatched
	}
	if r.drop {
		return r, outDropRule
	}
	*rec = audittrail.Record{
		Action:     r.action.expand(&caps, maxActionLen),
		Severity:   r.severity,
		EntityType: clean(r.entType.expand(&caps, maxEntityLen)),
		EntityID:   clean(r.entID.expand(&caps, maxEntityLen)),
	}
	var claimed *timestamppb.Timestamp
	rec.CreatedAt, claimed = m.eventTime(c)
	meta := make([]byte, 0, 384)
	ip, rawIP := ipOf(c.GetDownstreamRemoteAddress())
	rec.IPAddress = ip
	if s, _ := metaString(v.authz, metaUser); s != "" {
		rec.UserID = clean(truncate(s, maxIDLen))
	}
	meta = append(meta, '{')
	meta = appendRaw(meta, id.json)
	meta = appendField(meta, "rule", r.name)
	meta = appendClaimedTime(meta, claimed)
	meta = appendField(meta, "protocol", "tcp")
	meta = appendDuration(meta, c)
	if v.flags != 0 {
		meta = appendKey(meta, "response_flags")
		meta = appendFlags(meta, v.flags)
	}
	meta = appendField(meta, "upstream_cluster", truncate(c.GetUpstreamCluster(), maxShortLen))
	if rawIP != "" {
		meta = appendField(meta, "remote_address", truncate(rawIP, maxShortLen))
	}
	if p := e.GetConnectionProperties(); p != nil {
		meta = appendKey(meta, "bytes_received")
		meta = strconv.AppendUint(meta, p.GetReceivedBytes(), 10)
		meta = appendKey(meta, "bytes_sent")
		meta = strconv.AppendUint(meta, p.GetSentBytes(), 10)
	}
	rec.Metadata = append(meta, '}')
	return r, outKept
}

// Clock skew allowed on an entry's start time. Rows land in monthly
// partitions created ahead of time; a start time far from now (a broken
// clock, a hostile client) would fall outside them and fail a whole batch,
// so such entries are stamped with the receive time and keep the claimed
// time in metadata.start_time.
const (
	maxFutureSkew = 5 * time.Minute
	maxPastSkew   = 24 * time.Hour
)

// eventTime returns the row time: the entry's start time, or the receive
// time when the start time is missing or outside the allowed skew; then
// claimed is the entry's own (unusable) start time.
func (m *mapper) eventTime(c *accesslogv3.AccessLogCommon) (t time.Time, claimed *timestamppb.Timestamp) {
	now := m.now().UTC()
	st := c.GetStartTime()
	if st == nil {
		return now, nil
	}
	if st.CheckValid() == nil {
		t := st.AsTime()
		if t.After(now.Add(-maxPastSkew)) && t.Before(now.Add(maxFutureSkew)) {
			return t, nil
		}
	}
	return now, st
}

func appendClaimedTime(b []byte, st *timestamppb.Timestamp) []byte {
	if st == nil {
		return b
	}
	b = appendKey(b, "claimed_start_time")
	if st.CheckValid() == nil {
		return appendJSONString(b, st.AsTime().Format(time.RFC3339Nano))
	}
	return strconv.AppendInt(b, st.GetSeconds(), 10)
}

// boundedPath redacts query secrets and bounds the result. The raw path is
// cut first so a huge path costs no huge copy; a secret cut short is still
// redacted, and "REDACTED" cut short reveals nothing.
func boundedPath(p string) string {
	return clean(truncate(redactQuery(truncate(p, maxPathLen)), maxPathLen))
}

func pathOnly(p string) string {
	if i := strings.IndexByte(p, '?'); i >= 0 {
		return p[:i]
	}
	return p
}

func methodName(m corev3.RequestMethod) string {
	if m == corev3.RequestMethod_METHOD_UNSPECIFIED {
		return ""
	}
	return m.String()
}

// ipOf returns the address of a socket address as PostgreSQL inet accepts
// it (no zone), or "" plus the raw text when it is not an IP (a pipe, a
// hostname). Envoy already resolved the client address: with
// use_remote_address and xff_num_trusted_hops set on the HTTP connection
// manager, downstream_remote_address is the trusted client, not the
// forgeable first X-Forwarded-For entry.
func ipOf(a *corev3.Address) (ip, raw string) {
	s := a.GetSocketAddress().GetAddress()
	if s == "" {
		if p := a.GetPipe().GetPath(); p != "" {
			return "", "unix:" + p
		}
		return "", ""
	}
	addr, err := netip.ParseAddr(s)
	if err != nil {
		return "", s
	}
	if addr.Zone() != "" || addr.Is4In6() {
		return addr.WithZone("").Unmap().String(), ""
	}
	return s, ""
}

// secretParams are query parameters whose values are redacted, compared
// case-insensitively with - read as _. Names ending in _token, _secret,
// _key or _password are redacted too.
var secretParams = map[string]bool{
	"token": true, "password": true, "passwd": true, "pwd": true, "pass": true, "key": true, "apikey": true,
	"code": true, "secret": true, "signature": true, "sig": true, "auth": true, "authorization": true,
	"session": true, "sessionid": true, "jwt": true, "otp": true, "credential": true, "credentials": true,
	"x_amz_signature": true, "x_amz_credential": true, "x_amz_security_token": true,
}

func isSecretParam(name string) bool {
	var buf [64]byte
	if len(name) > len(buf) {
		return true // absurd names are suspicious; redact
	}
	n := buf[:len(name)]
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'A' && c <= 'Z':
			c += 'a' - 'A'
		case c == '-':
			c = '_'
		}
		n[i] = c
	}
	if secretParams[string(n)] {
		return true
	}
	for _, suf := range [...]string{"_token", "_secret", "_key", "_password"} {
		if len(n) > len(suf) && string(n[len(n)-len(suf):]) == suf {
			return true
		}
	}
	return false
}

const redactedValue = "REDACTED"

// redactQuery replaces the values of secret query parameters with
// REDACTED. A path without a secret parameter is returned as is, with no
// allocation. Parameter names are compared after percent-decoding.
func redactQuery(p string) string {
	q := strings.IndexByte(p, '?')
	if q < 0 {
		return p
	}
	var b []byte
	start := q + 1
	for start <= len(p) {
		end := strings.IndexByte(p[start:], '&')
		if end < 0 {
			end = len(p)
		} else {
			end += start
		}
		pair := p[start:end]
		name, _, hasValue := strings.Cut(pair, "=")
		if hasValue && isSecretParam(unescapeName(name)) {
			if b == nil {
				b = make([]byte, 0, len(p))
				b = append(b, p[:start]...)
			}
			b = append(b, name...)
			b = append(b, '=')
			b = append(b, redactedValue...)
		} else if b != nil {
			b = append(b, pair...)
		}
		if end < len(p) && b != nil {
			b = append(b, '&')
		}
		start = end + 1
	}
	if b == nil {
		return p
	}
	return string(b)
}

// unescapeName percent-decodes a query parameter name well enough to
// compare it ("api%5Fkey", "pass+word"); it allocates only when needed.
func unescapeName(s string) string {
	if !strings.ContainsAny(s, "%+") {
		return s
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '+':
			b = append(b, ' ')
		case c == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= '0' && c <= '9':
		return c - '0'
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// truncate cuts s to at most max bytes on a UTF-8 boundary.
func truncate(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// clean makes s storable in a PostgreSQL text column: NUL bytes (which
// text rejects, failing the whole COPY batch) and invalid UTF-8 become
// U+FFFD. Clean strings are returned without allocating.
func clean(s string) string {
	if strings.IndexByte(s, 0) < 0 && utf8.ValidString(s) {
		return s
	}
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}

func appendKey(b []byte, k string) []byte {
	if len(b) > 0 && b[len(b)-1] != '{' {
		b = append(b, ',')
	}
	b = appendJSONString(b, k)
	return append(b, ':')
}

func appendField(b []byte, k, v string) []byte {
	if v == "" {
		return b
	}
	b = appendKey(b, k)
	return appendJSONString(b, v)
}

// appendRaw splices a ready JSON fragment (fields without braces).
func appendRaw(b, frag []byte) []byte {
	if len(frag) == 0 {
		return b
	}
	if len(b) > 0 && b[len(b)-1] != '{' {
		b = append(b, ',')
	}
	return append(b, frag...)
}

func appendDuration(b []byte, c *accesslogv3.AccessLogCommon) []byte {
	d := c.GetDuration()
	if d == nil {
		d = c.GetTimeToLastDownstreamTxByte()
	}
	if d == nil {
		return b
	}
	b = appendKey(b, "duration_ms")
	return strconv.AppendFloat(b, durationMillis(d), 'f', -1, 64)
}

func durationMillis(d *durationpb.Duration) float64 {
	// Microsecond precision is plenty and keeps the number short.
	us := d.GetSeconds()*1e6 + int64(d.GetNanos())/1e3
	return float64(us) / 1e3
}

func appendHeaders(b []byte, k string, names []string, h map[string]string) []byte {
	if len(names) == 0 || len(h) == 0 {
		return b
	}
	open := false
	for _, n := range names {
		v, ok := h[n]
		if !ok {
			continue
		}
		if !open {
			b = appendKey(b, k)
			b = append(b, '{')
			open = true
		}
		b = appendKey(b, n)
		b = appendJSONString(b, truncate(v, maxShortLen))
	}
	if open {
		b = append(b, '}')
	}
	return b
}

// appendJSONString appends s as a JSON string that PostgreSQL jsonb
// accepts: control characters escaped, NUL (which jsonb rejects as
// \u0000) and invalid UTF-8 replaced by U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			case 0:
				b = append(b, "\uFFFD"...)
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			// A run of invalid bytes becomes one U+FFFD, as in clean.
			b = append(b, s[start:i]...)
			b = append(b, "\uFFFD"...)
			for i++; i < len(s) && s[i] >= utf8.RuneSelf; i++ {
				if r, size := utf8.DecodeRuneInString(s[i:]); r != utf8.RuneError || size != 1 {
					break
				}
			}
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
