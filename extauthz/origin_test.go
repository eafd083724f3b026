package extauthz

import (
	"net/url"
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"
)

func TestParseOrigin(t *testing.T) {
	cases := []struct {
		in, want string
		err      error
	}{
		{in: "https://app.example.com", want: "https://app.example.com"},
		{in: "HTTPS://App.Example.COM", want: "https://app.example.com"},
		{in: "https://app.example.com:443", want: "https://app.example.com"},
		{in: "http://app.example.com:80", want: "http://app.example.com"},
		{in: "http://app.example.com:443", want: "http://app.example.com:443"},
		{in: "wss://x.example.com:443", want: "wss://x.example.com"},
		{in: "http://localhost:3000", want: "http://localhost:3000"},
		{in: "http://[::1]:8080", want: "http://[::1]:8080"},
		{in: "http://[2001:DB8:0:0::1]", want: "http://[2001:db8::1]"},
		{in: "chrome-extension://abcdef", want: "chrome-extension://abcdef"},
		{in: "null", want: "null"},
		{in: "", err: errOriginEmpty},
		{in: strings.Repeat("a", 600), err: errOriginTooLong},
		{in: "app.example.com", err: errOriginNoScheme},
		{in: "://app.example.com", err: errOriginNoScheme},
		{in: "1http://x.example.com", err: errOriginScheme},
		{in: "https://", err: errOriginNoHost},
		{in: "https://app.example.com/", err: errOriginPath},
		{in: "https://app.example.com/path", err: errOriginPath},
		{in: "https://app.example.com?q", err: errOriginPath},
		{in: "https://app.example.com#f", err: errOriginPath},
		{in: `https://app.example.com\`, err: errOriginPath},
		{in: "https://u:p@app.example.com", err: errOriginUserinfo},
		{in: "https://app.example.com:", err: errOriginPort},
		{in: "https://app.example.com:0", err: errOriginPort},
		{in: "https://app.example.com:65536", err: errOriginPort},
		{in: "https://app.example.com:08080", err: errOriginPort},
		{in: "https://app.example.com:8x", err: errOriginPort},
		{in: "https://app..example.com", err: errOriginHost},
		{in: "https://.example.com", err: errOriginHost},
		{in: "https://app.example.com.", err: errOriginHost},
		{in: "https://exa mple.com", err: errOriginHost},
		{in: "https://ex\xffample.com", err: errOriginHost},
		{in: "https://[fe80::1%25eth0]", err: errOriginHost},
		{in: "https://[::1", err: errOriginHost},
		{in: "https://[::1]x", err: errOriginHost},
		{in: "https://[1.2.3.4]", err: errOriginHost},
		{in: "https://a.example.com,https://b.example.com", err: errOriginPath},
		{in: "https://a.example.com,b", err: errOriginHost},
		{in: "https://*.example.com", err: errOriginWildcard},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			o, err := parseOrigin(tc.in)
			if err != tc.err {
				t.Fatalf("parseOrigin(%q) error = %v, want %v", tc.in, err, tc.err)
			}
			if err == nil && o.s != tc.want {
				t.Fatalf("parseOrigin(%q) = %q, want %q", tc.in, o.s, tc.want)
			}
		})
	}
}

func TestParseOriginNoAllocWhenNormal(t *testing.T) {
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := parseOrigin("https://dashboard.example.com:8443"); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("parseOrigin allocates %v times for a normal origin, want 0", allocs)
	}
}

func TestOriginSet(t *testing.T) {
	var set originSet
	for _, e := range []string{"https://app.example.com", "https://*.example.com", "http://*.dev.example.net:8080", "HTTPS://Upper.Example.ORG:443"} {
		if err := set.add(e, false, false); err != nil {
			t.Fatalf("add(%q): %v", e, err)
		}
	}
	cases := map[string]bool{
		"https://app.example.com":           true,
		"https://x.example.com":             true,
		"https://a.b.example.com":           true,
		"https://example.com":               false,
		"https://evilexample.com":           false,
		"https://example.com.evil.net":      false,
		"https://x.example.com.evil.net":    false,
		"http://x.example.com":              false,
		"https://x.example.com:444":         false,
		"http://a.dev.example.net:8080":     true,
		"http://a.dev.example.net":          false,
		"http://dev.example.net:8080":       false,
		"https://upper.example.org":         true,
		"null":                              false,
		"https://app.example.com.":          false, // does not parse
		"https://xn--bcher-kva.example.com": true,
	}
	for in, want := range cases {
		o, err := parseOrigin(in)
		got := err == nil && set.allows(o)
		if got != want {
			t.Errorf("allows(%q) = %v, want %v (parse err %v)", in, got, want, err)
		}
	}
}

func TestSameOrigin(t *testing.T) {
	cases := []struct {
		origin, scheme, authority string
		want                      bool
	}{
		{"https://app.example.com", "https", "app.example.com", true},
		{"https://app.example.com", "https", "APP.example.com:443", true},
		{"https://app.example.com", "http", "app.example.com", false},
		{"https://app.example.com:8443", "https", "app.example.com:8443", true},
		{"https://app.example.com:8443", "https", "app.example.com", false},
		{"http://[::1]:8080", "http", "[::1]:8080", true},
		{"http://[::1]", "http", "[::1]:80", true},
		{"null", "https", "null", false},
		{"https://app.example.com", "https", "", false},
	}
	for _, tc := range cases {
		o, err := parseOrigin(tc.origin)
		if err != nil {
			t.Fatal(err)
		}
		if got := sameOrigin(o, tc.scheme, tc.authority); got != tc.want {
			t.Errorf("sameOrigin(%q, %q, %q) = %v, want %v", tc.origin, tc.scheme, tc.authority, got, tc.want)
		}
	}
}

// FuzzOrigin checks parsing and matching against a direct reading of the
// rules: a parsed origin is normal (idempotent, lower-case, no default port,
// no path), agrees with net/url, and is allowed by a subdomain pattern only
// when its host really is a subdomain.
func FuzzOrigin(f *testing.F) {
	for _, s := range []string{
		"https://app.example.com", "HTTPS://A.EXAMPLE.COM:443", "https://evilexample.com", "https://example.com.evil.net",
		"http://[::1]:3000", "null", "https://a.example.com/", "https://*.example.com", "https://a.example.com:0", "ws://x:80",
		"https://a.example.com,https://b.example.com", "https://user@a.example.com", "h://a", "https://a.b.c.example.com:8443",
	} {
		f.Add(s)
	}
	var set originSet
	for _, e := range []string{"https://app.example.com", "https://*.example.com", "http://*.example.net:8080"} {
		if err := set.add(e, false, false); err != nil {
			f.Fatal(err)
		}
	}
	f.Fuzz(func(t *testing.T, in string) {
		o, err := parseOrigin(in)
		if err != nil {
			if set.allows(o) {
				t.Fatalf("zero origin allowed after error %v", err)
			}
			return
		}
		if o.null {
			if in != "null" || set.allows(o) {
				t.Fatalf("%q parsed as null (allowed %v)", in, set.allows(o))
			}
			return
		}
		o2, err := parseOrigin(o.s)
		if err != nil || o2.s != o.s {
			t.Fatalf("not idempotent: %q -> %q -> %q (%v)", in, o.s, o2.s, err)
		}
		if o.s != strings.ToLower(o.s) || !strings.EqualFold(o.s, in) && !strings.HasSuffix(in, ":80") && !strings.HasSuffix(in, ":443") && !strings.Contains(in, "[") {
			t.Fatalf("%q normalised to %q", in, o.s)
		}
		if o.s != o.scheme()+"://"+o.host()+portSuffix(o.port()) {
			t.Fatalf("%q: parts %q %q %q do not rebuild %q", in, o.scheme(), o.host(), o.port(), o.s)
		}
		if isDefaultPort(o.scheme(), o.port()) {
			t.Fatalf("%q kept its default port", o.s)
		}
		u, err := url.Parse(o.s)
		if err != nil || u.Scheme != o.scheme() || u.Path != "" || u.RawQuery != "" || u.User != nil || u.Opaque != "" {
			t.Fatalf("net/url reads %q differently: %+v, %v", o.s, u, err)
		}
		want := o.s == "https://app.example.com" ||
			(o.scheme() == "https" && o.port() == "" && strings.HasSuffix(o.host(), ".example.com")) ||
			(o.scheme() == "http" && o.port() == "8080" && strings.HasSuffix(o.host(), ".example.net"))
		if got := set.allows(o); got != want {
			t.Fatalf("allows(%q) = %v, want %v", o.s, got, want)
		}
	})
}

func portSuffix(p string) string {
	if p == "" {
		return ""
	}
	return ":" + p
}

// FuzzCheck feeds arbitrary header values, in both request forms, through
// Check: it must always answer (never an error or panic), and the answer
// must marshal, which proves every string in it is valid UTF-8.
func FuzzCheck(f *testing.F) {
	f.Add("OPTIONS", "api.example.net", "https://dashboard.example.com", "PUT", "content-type", "tenant1", "u-1", "203.0.113.7", "skip", true)
	f.Add("GET", "app.example.com:443", "null", "", "", "", "", "::1", "", false)
	f.Add("POST", "x", "https://\xff.example.com", "GE\x00T", "a,,b,\xfe", "t\xff", "user name", "\xff", "report", true)
	cfg := testConfig()
	cfg.Identity.TrustedUserHeader = "x-auth-user"
	srv, _ := newTestServer(f, cfg, nil)
	f.Fuzz(func(t *testing.T, method, host, origin, acrm, acrh, tenant, user, source, corsRoute string, rawForm bool) {
		req := envoyReq{method: method, host: host, source: source, ext: map[string]string{"cors": corsRoute, "tenant": tenant},
			headers: hdr("origin", origin, "access-control-request-method", acrm, "access-control-request-headers", acrh,
				"x-tenant-id", tenant, "x-auth-user", user)}
		form := formHeaders
		if rawForm {
			form = formHeaderMap
		}
		resp, err := srv.Check(t.Context(), req.build(t, form))
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		wire, err := proto.Marshal(resp)
		if err != nil {
			t.Fatalf("answer does not marshal: %v", err)
		}
		var got authv3.CheckResponse // as Envoy reads it: strings must be UTF-8
		if err := proto.Unmarshal(wire, &got); err != nil {
			t.Fatalf("answer does not decode: %v", err)
		}
		if got.GetDeniedResponse() == nil && got.GetOkResponse() == nil {
			t.Fatal("neither allowed nor denied")
		}
		if got.GetDynamicMetadata().GetFields()["decision"].GetStringValue() == "" {
			t.Fatalf("no decision in dynamic metadata: %v", got.GetDynamicMetadata())
		}
	})
}
