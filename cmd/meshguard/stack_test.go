package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	rlcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/jackc/pgx/v5"

	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// TestFullStack runs the whole binary (run itself) against a real Redis and
// a real PostgreSQL, and speaks to it as Envoy does: ext_authz decides and
// names the client, the Rate Limit Service counts that client's quota in Redis,
// the access-log stream turns the requests into audit rows in PostgreSQL, and
// the admin API reads them back.
func TestFullStack(t *testing.T) {
	if testing.Short() {
		t.Skip("starts redis-server and postgres")
	}
	rds := redistest.Start(t)
	pg := pgtest.Start(t)
	dbURL := pg.NewDatabase(t)

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "meshguard.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
listen: {grpc: "127.0.0.1:0", http: "127.0.0.1:0", ratelimit: "127.0.0.1:0"}
log: {format: json}
# A store timeout would answer by failure_mode (allow) without counting: the
# 50ms default is too short for the first call (dial, script load) under
# -race on a busy machine.
redis: {timeout: 5s}
cors:
  public_origin: "https://app.example.com"
  allowed_origins: ["https://*.example.com"]
ratelimit:
  domains:
    - domain: api
      descriptors:
        - key: preset
          value: auth
          descriptors:
            - key: client
              rate_limit: {preset: auth}
audit:
  spool_dir: %q
  sqlite_path: %q
  batch_interval: 50ms
`, filepath.Join(dir, "spool"), filepath.Join(dir, "unused.db"))), 0o600)
	const token = "full-stack-admin-token-0123456789"
	env := map[string]string{
		"REDIS_URL":             rds.URL(),
		"DATABASE_URL":          dbURL,
		"MESHGUARD_ADMIN_TOKEN": token,
	}

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	line, errc, logs := startRun(t, ctx, cfgPath, func(k string) string { return env[k] })
	httpBase := "http://" + line["http_addr"].(string)
	conn, err := grpc.NewClient(line["grpc_addr"].(string), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// Readiness reports both stores as healthy.
	servertest.WaitFor(t, 20*time.Second, func() error {
		code, body := httpGet(t, httpBase+"/readyz", "")
		if code != 200 || !strings.Contains(body, `"database"`) || !strings.Contains(body, `"redis"`) {
			return fmt.Errorf("/readyz %d %s", code, body)
		}
		return nil
	})

	// 1. ext_authz: an allowed cross-origin request; meshguard names the client.
	authz := authv3.NewAuthorizationClient(conn)
	check, err := authz.Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		// The peer is the load balancer; the client's address is what
		// Envoy's header_mutation writes into x-meshguard-client-ip
		// (identity.client_ip_header's default), over any client copy.
		Source: &authv3.AttributeContext_Peer{Address: socketAddr("10.0.0.1", 51000)},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "req-1", Method: "POST", Scheme: "https", Host: "app.example.com", Path: "/api/users",
			Headers: map[string]string{"origin": "https://dashboard.example.com", "x-meshguard-client": "user:forged",
				"x-meshguard-client-ip": "203.0.113.7"},
		}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if check.GetStatus().GetCode() != 0 {
		t.Fatalf("allowed origin denied: %v", check)
	}
	client := ""
	for _, h := range check.GetOkResponse().GetHeaders() {
		if strings.EqualFold(h.GetHeader().GetKey(), "x-meshguard-client") {
			client = h.GetHeader().GetValue()
		}
	}
	if client != "ip:203.0.113.7" {
		t.Fatalf("x-meshguard-client = %q, want ip:203.0.113.7 (forged headers must not count)", client)
	}
	denied, err := authz.Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: socketAddr("203.0.113.8", 51001)},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "POST", Scheme: "https", Host: "app.example.com", Path: "/api/users",
			Headers: map[string]string{"origin": "https://evilexample.com"},
		}},
	}})
	if err != nil || denied.GetDeniedResponse().GetStatus().GetCode() != 403 {
		t.Fatalf("disallowed origin: %v, %v", denied, err)
	}

	// 2. RLS, on the rate limit listener as Envoy calls it: the auth preset
	// admits 5 requests per client, in Redis.
	rlConn, err := grpc.NewClient(line["ratelimit_addr"].(string), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer rlConn.Close()
	rls := rlsv3.NewRateLimitServiceClient(rlConn)
	req := &rlsv3.RateLimitRequest{Domain: "api", HitsAddend: 1, Descriptors: []*rlcommon.RateLimitDescriptor{{
		Entries: []*rlcommon.RateLimitDescriptor_Entry{{Key: "preset", Value: "auth"}, {Key: "client", Value: client}},
	}}}
	for i := 1; i <= 6; i++ {
		resp, err := rls.ShouldRateLimit(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		want := rlsv3.RateLimitResponse_OK
		if i == 6 {
			want = rlsv3.RateLimitResponse_OVER_LIMIT
		}
		if resp.GetOverallCode() != want {
			t.Fatalf("request %d: %v, want %v", i, resp.GetOverallCode(), want)
		}
	}
	if keys, err := rds.Do("DBSIZE"); err != nil || keys == "0" {
		t.Fatalf("no quota keys in Redis (DBSIZE %q, %v)", keys, err)
	}

	// 3. ALS: Envoy streams the access log; a POST becomes a CREATE row.
	als, err := alsv3.NewAccessLogServiceClient(conn).StreamAccessLogs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	md, _ := structpb.NewStruct(map[string]any{"decision": "allow", "client": client, "user": "", "origin": "https://dashboard.example.com"})
	entry := func(id, method, path string, code uint32) *accesslogv3.HTTPAccessLogEntry {
		return &accesslogv3.HTTPAccessLogEntry{
			CommonProperties: &accesslogv3.AccessLogCommon{
				StartTime:                  timestamppb.Now(),
				TimeToLastDownstreamTxByte: durationpb.New(3 * time.Millisecond),
				DownstreamRemoteAddress:    socketAddr("203.0.113.7", 51000),
				Metadata:                   &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.filters.http.ext_authz": md}},
			},
			Request: &accesslogv3.HTTPRequestProperties{
				RequestMethod: corev3.RequestMethod(corev3.RequestMethod_value[method]),
				Authority:     "app.example.com", Path: path, RequestId: id, UserAgent: "full-stack-test",
			},
			Response: &accesslogv3.HTTPResponseProperties{ResponseCode: wrapperspb.UInt32(code)},
		}
	}
	err = als.Send(&alsv3.StreamAccessLogsMessage{
		Identifier: &alsv3.StreamAccessLogsMessage_Identifier{Node: &corev3.Node{Id: "envoy-1"}, LogName: "meshguard"},
		LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{
			LogEntry: []*accesslogv3.HTTPAccessLogEntry{
				entry("req-1", "POST", "/api/users?token=s3cret", 201),
				entry("req-2", "GET", "/healthz", 200),
			},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := als.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}

	// 4. The admin API finds exactly that row in PostgreSQL, with the secret redacted.
	if code, _ := httpGet(t, httpBase+"/v1/audit/logs", ""); code != 401 {
		t.Fatalf("audit API without a token: %d, want 401", code)
	}
	var rows []map[string]any
	servertest.WaitFor(t, 20*time.Second, func() error {
		code, body := httpGet(t, httpBase+"/v1/audit/logs?action=CREATE", token)
		if code != 200 {
			return fmt.Errorf("GET /v1/audit/logs: %d %s", code, body)
		}
		var doc struct {
			Items []map[string]any `json:"items"`
		}
		if err := json.Unmarshal([]byte(body), &doc); err != nil {
			return fmt.Errorf("decoding %s: %v", body, err)
		}
		rows = doc.Items
		if len(rows) != 1 {
			return fmt.Errorf("want 1 CREATE row, got %d: %s", len(rows), body)
		}
		return nil
	})
	r := rows[0]
	if r["request_id"] != "req-1" || r["ip_address"] != "203.0.113.7" || strings.Contains(fmt.Sprint(r["path"]), "s3cret") {
		t.Fatalf("row %v", r)
	}
	var inDB int
	if err := pgCount(ctx, dbURL, "SELECT count(*) FROM audit_logs WHERE request_id = 'req-1'", &inDB); err != nil || inDB != 1 {
		t.Fatalf("rows for req-1 in PostgreSQL: %d, %v", inDB, err)
	}

	cancel()
	if err := waitRun(t, errc, logs); err != nil {
		t.Fatalf("run returned %v", err)
	}
}

func socketAddr(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func httpGet(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func pgCount(ctx context.Context, url, sql string, n *int) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return conn.QueryRow(ctx, sql).Scan(n)
}
