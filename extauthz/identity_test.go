package extauthz

import (
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/meshguard/meshguard/internal/metrictest"
)

// upstreamHeader is the value an allowed answer sets for header k upstream;
// "" when it sets none.
func upstreamHeader(resp *authv3.CheckResponse, k string) string {
	for _, h := range resp.GetOkResponse().GetHeaders() {
		if h.GetHeader().GetKey() == k {
			return h.GetHeader().GetValue()
		}
	}
	return ""
}

// TestAddressKeys: anonymous clients are keyed by the address Envoy
// derived (x-meshguard-client-ip), else the connection peer; IPv6 by
// prefix (identity.ipv6_prefix), IPv4-mapped IPv6 unmapped, zones dropped,
// so neither a /64 nor two spellings of one address give a client more
// than one quota. Addresses from issue 13.
func TestAddressKeys(t *testing.T) {
	cfg := func(prefix int) Config {
		c := testConfig()
		c.Identity.IPv6Prefix = prefix
		return c
	}
	cases := []struct {
		name     string
		prefix   int
		header   string // x-meshguard-client-ip; "" none
		source   string // connection peer
		jwtUser  string
		want     string // x-meshguard-ip
		wantUser string // x-meshguard-client when jwtUser is set
	}{
		{name: "IPv6 address keyed by its /64", prefix: 64, header: "2001:db8:1:2::1", want: "ip:2001:db8:1:2::/64"},
		{name: "another address of the same /64", prefix: 64, header: "2001:db8:1:2::2", want: "ip:2001:db8:1:2::/64"},
		{name: "a host part that fills the /64", prefix: 64, header: "2001:db8:1:2:ffff:ffff:ffff:ffff", want: "ip:2001:db8:1:2::/64"},
		{name: "the next /64 is another client", prefix: 64, header: "2001:db8:1:3::1", want: "ip:2001:db8:1:3::/64"},
		{name: "IPv4-mapped IPv6 is unmapped", prefix: 64, header: "::ffff:203.0.113.9", want: "ip:203.0.113.9"},
		{name: "IPv4-mapped in hex is unmapped", prefix: 64, header: "::ffff:cb00:7109", want: "ip:203.0.113.9"},
		{name: "IPv4 as it is", prefix: 64, header: "203.0.113.9", want: "ip:203.0.113.9"},
		{name: "zone dropped", prefix: 64, header: "fe80::1%eth0", want: "ip:fe80::/64"},
		{name: "zone dropped from the peer", prefix: 64, source: "2001:db8:1:2::1%3", want: "ip:2001:db8:1:2::/64"},
		{name: "upper-case IPv6 text", prefix: 64, header: "2001:DB8:1:2::1", want: "ip:2001:db8:1:2::/64"},
		{name: "prefix 128 keys the address", prefix: 128, header: "2001:db8:1:2::1", want: "ip:2001:db8:1:2::1"},
		{name: "prefix 48", prefix: 48, header: "2001:db8:1:2::1", want: "ip:2001:db8:1::/48"},
		{name: "IPv4 ignores the IPv6 prefix", prefix: 48, header: "198.51.100.250", want: "ip:198.51.100.250"},
		{name: "peer when the header is no address", prefix: 64, header: "2001:db8::1, 10.0.0.1", source: "2001:db8:9:9::9", want: "ip:2001:db8:9:9::/64"},
		{name: "peer when the header has a port", prefix: 64, header: "[2001:db8::1]:443", source: "192.0.2.1", want: "ip:192.0.2.1"},
		{name: "unknown when neither is an address", prefix: 64, header: "localhost", source: "unix:/run/envoy.sock", want: "ip:unknown"},
		{name: "user key beside the address key", prefix: 64, header: "2001:db8:1:2::1", jwtUser: "u-7", want: "ip:2001:db8:1:2::/64", wantUser: "user:u-7"},
	}
	for _, tc := range cases {
		for _, form := range []string{formHeaders, formHeaderMap} {
			t.Run(tc.name+"/"+form, func(t *testing.T) {
				srv, _ := newTestServer(t, cfg(tc.prefix), nil)
				client := startGRPC(t, srv)
				req := envoyReq{host: "api.example.net", source: tc.source}
				if tc.header != "" {
					req.headers = hdr("x-meshguard-client-ip", tc.header)
				}
				if tc.jwtUser != "" {
					req.jwt = map[string]any{"sub": tc.jwtUser}
				}
				resp, err := client.Check(t.Context(), req.build(t, form))
				if err != nil {
					t.Fatal(err)
				}
				wantClient := tc.want
				if tc.wantUser != "" {
					wantClient = tc.wantUser
				}
				got := [3]string{upstreamHeader(resp, "x-meshguard-ip"), upstreamHeader(resp, "x-meshguard-client"),
					resp.GetDynamicMetadata().GetFields()["client"].GetStringValue()}
				if want := [3]string{tc.want, wantClient, wantClient}; got != want {
					t.Errorf("x-meshguard-ip, x-meshguard-client, metadata client = %q, want %q", got, want)
				}
			})
		}
	}
}

// TestTokenInvalid: jwt_authn lets a failed token through
// (allow_missing_or_failed) and records why under failed_status_in_metadata;
// meshguard answers 401 itself, after CORS, so an allowed origin's script
// can read it and refresh its token. A missing token is just anonymous.
func TestTokenInvalid(t *testing.T) {
	expired := map[string]any{"code": 3, "message": "Jwt is expired"}
	missing := map[string]any{"code": 1, "message": "Jwt is missing"}
	invalid401 := func(response []string, m map[string]any) outcome {
		return outcome{Code: codes.Unauthenticated, HTTP: 401, Body: `{"error":"Invalid or expired token"}`, Response: response, Meta: m}
	}
	challenge := `WWW-Authenticate: Bearer error="invalid_token" (overwrite)`
	exposeAuth := "Access-Control-Expose-Headers: X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, WWW-Authenticate (overwrite)"
	noFailureKey := testConfig()
	noFailureKey.Identity.JWTMetadata.FailureKey = ""
	cases := []struct {
		name string
		cfg  Config
		req  envoyReq
		want outcome
	}{
		{name: "expired token from an allowed origin: 401 the browser can read",
			req: envoyReq{host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com"), jwtFailure: expired},
			want: invalid401([]string{acao("https://dashboard.example.com"), credsHdr, exposeAuth, varyDenied, jsonHdr, challenge},
				meta("decision", "deny", "reason", "token_invalid", "origin", "https://dashboard.example.com"))},
		{name: "expired token without Origin",
			req:  envoyReq{host: "api.example.net", jwtFailure: expired},
			want: invalid401([]string{varyDenied, jsonHdr, challenge}, meta("decision", "deny", "reason", "token_invalid"))},
		{name: "a failed token beside a good one is a failed request",
			req:  envoyReq{host: "api.example.net", jwt: map[string]any{"sub": "u-1"}, jwtFailure: map[string]any{"code": 7, "message": "Jwt verification fails"}},
			want: invalid401([]string{varyDenied, jsonHdr, challenge}, meta("decision", "deny", "reason", "token_invalid"))},
		{name: "a malformed failure entry fails closed",
			req:  envoyReq{host: "api.example.net", jwtFailure: map[string]any{"message": "?"}},
			want: invalid401([]string{varyDenied, jsonHdr, challenge}, meta("decision", "deny", "reason", "token_invalid"))},
		{name: "disallowed origin: the CORS answer comes first",
			req:  envoyReq{host: "api.example.net", headers: hdr("origin", "https://evil.test"), jwtFailure: expired},
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://evil.test"))},
		{name: "no token: anonymous, allowed",
			req:  envoyReq{host: "api.example.net", jwtFailure: missing},
			want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},
		{name: "trusted headers do not replace a failed token",
			cfg: func() Config {
				c := testConfig()
				c.Identity.TrustedUserHeader = "x-auth-user"
				return c
			}(),
			req:  envoyReq{host: "api.example.net", headers: hdr("x-auth-user", "ceo"), jwtFailure: expired},
			want: invalid401([]string{varyDenied, jsonHdr, challenge}, meta("decision", "deny", "reason", "token_invalid"))},
		{name: "failure_key off: failures are not read",
			cfg:  noFailureKey,
			req:  envoyReq{host: "api.example.net", jwtFailure: expired},
			want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},
		{name: "preflight is answered before any token check",
			req: envoyReq{method: "OPTIONS", host: "api.example.net", jwtFailure: expired,
				headers: hdr("origin", "https://dashboard.example.com", "access-control-request-method", "PUT")},
			want: outcome{Code: codes.PermissionDenied, HTTP: 204, Response: []string{
				acao("https://dashboard.example.com"), credsHdr,
				"Access-Control-Allow-Methods: GET, POST, PUT, PATCH, DELETE, OPTIONS (overwrite)",
				"Access-Control-Allow-Headers: Content-Type, Authorization, X-Requested-With, X-CSRF-Token, X-Session-ID (overwrite)",
				"Access-Control-Max-Age: 86400 (overwrite)", varyPre,
			}, Meta: meta("decision", "preflight", "reason", "preflight_ok", "origin", "https://dashboard.example.com", "preflight", true)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if cfg.CORS.Mode == "" {
				cfg = testConfig()
			}
			srv, reg := newTestServer(t, cfg, nil)
			client := startGRPC(t, srv)
			resp, err := client.Check(t.Context(), tc.req.build(t, formHeaders))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, toOutcome(t, resp)); diff != "" {
				t.Errorf("Check answer (-want +got):\n%s", diff)
			}
			if tc.want.HTTP == 401 {
				if got := decisionCount(t, reg, "deny", "token_invalid"); got != 1 {
					t.Errorf("decisions_total{deny,token_invalid} = %v, want 1", got)
				}
			}
		})
	}
}

// decisionCount reads meshguard_extauthz_decisions_total{decision,reason}.
func decisionCount(t *testing.T, reg *prometheus.Registry, decision, reason string) float64 {
	t.Helper()
	v, _ := metrictest.Value(t, reg, "meshguard_extauthz_decisions_total", map[string]string{"decision": decision, "reason": reason})
	return v
}

// TestWarnings: every configuration that leans on Envoy, or gives up a
// guarantee, says so in words naming the key and what Envoy must do.
func TestWarnings(t *testing.T) {
	base := func() Config {
		c := testConfig()
		c.Identity.AccountKey = "0123456789abcdef0123456789abcdef"
		return c
	}
	cases := []struct {
		name string
		mod  func(*Config)
		want []string // substrings, one per warning, in order
	}{
		{name: "shipped settings: none", mod: func(*Config) {}},
		{name: "defaults without an account key", mod: func(c *Config) { c.Identity.AccountKey = "" },
			want: []string{"no account key (MESHGUARD_ACCOUNT_KEY or identity.account_key_file)"}},
		{name: "development needs no account key", mod: func(c *Config) { c.Identity.AccountKey = ""; c.Development = true }},
		{name: "trusted headers", mod: func(c *Config) {
			c.Identity.TrustedUserHeader = "X-Auth-User"
			c.Identity.TrustedRoleHeader = "x-auth-role"
		}, want: []string{
			`identity.trusted_user_header is "X-Auth-User": meshguard believes it on every request without a verified JWT, so Envoy must remove client copies before the filter that sets it runs (header_mutation ` + "`remove: x-auth-user`",
			`identity.trusted_role_header is "x-auth-role"`,
		}},
		{name: "no client address header in production", mod: func(c *Config) { c.Identity.ClientIPHeader = "" },
			want: []string{"identity.client_ip_header is empty: anonymous clients are keyed by the connection peer"}},
		{name: "no client address header in development", mod: func(c *Config) { c.Identity.ClientIPHeader = ""; c.Development = true }},
		{name: "another client address header", mod: func(c *Config) { c.Identity.ClientIPHeader = "x-real-ip" },
			want: []string{`identity.client_ip_header is "x-real-ip": Envoy must overwrite it on every request`}},
		{name: "failures not read", mod: func(c *Config) { c.Identity.JWTMetadata.FailureKey = "" },
			want: []string{"identity.jwt_metadata.failure_key is empty"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.mod(&c)
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			got := c.Warnings()
			if len(got) != len(tc.want) {
				t.Fatalf("%d warnings, want %d:\n%s", len(got), len(tc.want), strings.Join(got, "\n"))
			}
			for i, w := range tc.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("warning %d = %q, want it to contain %q", i, got[i], w)
				}
			}
		})
	}
}
