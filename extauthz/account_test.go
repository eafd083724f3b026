package extauthz

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
)

const testAccountKey = "0123456789abcdef0123456789abcdef"

func accountConfig() Config {
	c := testConfig()
	c.Identity.AccountKey = testAccountKey
	return c
}

// login is a POST to a route whose context_extensions say the body names
// the account in field "email", as envoy/envoy.yaml's login route does.
func login(contentType, body string) envoyReq {
	r := envoyReq{method: "POST", host: "app.example.com", path: "/api/auth/login",
		ext: map[string]string{"account": "email", "csp": "off"}, body: body}
	if contentType != "" {
		r.headers = hdr("content-type", contentType)
	}
	return r
}

// TestAccountKey: the same account, however it is spelled, has one key; the
// key is a keyed hash (never the name) in x-meshguard-account and the
// metadata; other accounts and other keys give other keys.
func TestAccountKey(t *testing.T) {
	var logs bytes.Buffer
	srv, err := New(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})), prometheus.NewRegistry(), accountConfig(), nil)
	if err != nil {
		t.Fatal(err)
	}
	client := startGRPC(t, srv)
	key := func(t *testing.T, r envoyReq, form string) (string, *authv3.CheckResponse) {
		t.Helper()
		resp, err := client.Check(t.Context(), r.build(t, form))
		if err != nil {
			t.Fatal(err)
		}
		if c := codes.Code(resp.GetStatus().GetCode()); c != codes.OK {
			t.Fatalf("status %v, body %s; want allowed", c, resp.GetDeniedResponse().GetBody())
		}
		k := upstreamHeader(resp, "x-meshguard-account")
		if m := resp.GetDynamicMetadata().GetFields()["account"].GetStringValue(); m != k {
			t.Errorf("metadata account %q, header %q", m, k)
		}
		return k, resp
	}
	alice, resp := key(t, login("application/json", `{"email":"alice@example.com","password":"hunter2"}`), formHeaders)
	if !strings.HasPrefix(alice, "account:") || len(alice) != len("account:")+22 {
		t.Fatalf("account key %q: want account: and 22 base64url characters (128 bits)", alice)
	}
	if got := upstreamHeader(resp, "x-meshguard-client"); got != "ip:203.0.113.7" {
		t.Errorf("x-meshguard-client = %q: a login is anonymous, keyed by address", got)
	}
	same := []struct {
		name string
		req  envoyReq
	}{
		{"upper case and spaces", login("application/json", `{"password":"x","email":"  ALICE@Example.COM "}`)},
		{"charset parameter", login("application/json; charset=utf-8", `{"email":"alice@example.com"}`)},
		{"+json media type", login("application/vnd.api+json", `{"email":"alice@example.com"}`)},
		{"field name in another case", login("application/json", `{"Email":"alice@example.com"}`)},
		{"escaped field name", login("application/json", `{"\u0065mail":"alice@example.com"}`)},
		{"full-width letters (NFKC)", login("application/json", `{"email":"ａｌｉｃｅ@example.com"}`)},
		{"form", login("application/x-www-form-urlencoded", "email=Alice%40example.com&password=x")},
		{"form with plus for space", login("application/x-www-form-urlencoded", "password=x&email=+alice%40example.com+")},
		{"body as a string (no pack_as_bytes)", func() envoyReq {
			r := login("application/json", `{"email":"alice@example.com"}`)
			r.bodyAsString = true
			return r
		}()},
		{"nested values are skipped", login("application/json", `{"meta":{"email":"mallory@example.com","x":[1,{"a":null}]},"email":"alice@example.com"}`)},
	}
	for _, tc := range same {
		for _, form := range []string{formHeaders, formHeaderMap} {
			t.Run(tc.name+"/"+form, func(t *testing.T) {
				if k, _ := key(t, tc.req, form); k != alice {
					t.Errorf("key %q, want alice's %q", k, alice)
				}
			})
		}
	}
	bob, _ := key(t, login("application/json", `{"email":"bob@example.com"}`), formHeaders)
	num, _ := key(t, login("application/json", `{"email":12345}`), formHeaders)
	if bob == alice || num == alice || num == bob {
		t.Errorf("keys alice %q, bob %q, 12345 %q: want three", alice, bob, num)
	}
	other := accountConfig()
	other.Identity.AccountKey = "another key, 32 bytes long......"
	srv2, _ := newTestServer(t, other, nil)
	resp2, err := startGRPC(t, srv2).Check(t.Context(), login("application/json", `{"email":"alice@example.com"}`).build(t, formHeaders))
	if err != nil {
		t.Fatal(err)
	}
	if k := upstreamHeader(resp2, "x-meshguard-account"); k == alice || k == "" {
		t.Errorf("another secret gave key %q, alice's is %q: the hash must be keyed", k, alice)
	}
	for _, plain := range []string{"alice", "bob", "12345", "hunter2"} {
		if strings.Contains(strings.ToLower(logs.String()), plain) {
			t.Errorf("the log holds %q:\n%s", plain, logs.String())
		}
	}

	t.Run("methods without a login body get no account key", func(t *testing.T) {
		r := login("", "")
		r.method = "GET"
		resp, err := client.Check(t.Context(), r.build(t, formHeaders))
		if err != nil {
			t.Fatal(err)
		}
		if codes.Code(resp.GetStatus().GetCode()) != codes.OK || upstreamHeader(resp, "x-meshguard-account") != "" {
			t.Fatalf("GET: %v", resp)
		}
		removed := false
		for _, h := range resp.GetOkResponse().GetHeadersToRemove() {
			removed = removed || h == "x-meshguard-account"
		}
		if !removed {
			t.Error("x-meshguard-account is not removed when meshguard sets none")
		}
	})
}

// TestAccountRefused: a login body that does not name exactly one account
// gets a precise 4xx and is counted; the request never reaches the app.
func TestAccountRefused(t *testing.T) {
	const (
		invalid     = `{"error":"Bad request: the body must name the account exactly once"}`
		tooLarge    = `{"error":"Request body too large"}`
		unsupported = `{"error":"Unsupported media type: send application/json or application/x-www-form-urlencoded"}`
	)
	big := `{"email":"alice@example.com","pad":"` + strings.Repeat("x", MaxAccountBodyBytes) + `"}`
	cases := []struct {
		name   string
		req    envoyReq
		status int32
		body   string
		reason string
	}{
		{"no body", login("application/json", ""), 400, invalid, "account_invalid"},
		{"no field", login("application/json", `{"user":"alice"}`), 400, invalid, "account_invalid"},
		{"field twice", login("application/json", `{"email":"mallory@example.com","email":"alice@example.com"}`), 400, invalid, "account_invalid"},
		{"field twice in two cases", login("application/json", `{"email":"mallory@example.com","EMAIL":"alice@example.com"}`), 400, invalid, "account_invalid"},
		{"null", login("application/json", `{"email":null}`), 400, invalid, "account_invalid"},
		{"object", login("application/json", `{"email":{"$ne":""}}`), 400, invalid, "account_invalid"},
		{"list", login("application/json", `{"email":["a","b"]}`), 400, invalid, "account_invalid"},
		{"empty name", login("application/json", `{"email":"   "}`), 400, invalid, "account_invalid"},
		{"control character", login("application/json", `{"email":"alice\u0000@example.com"}`), 400, invalid, "account_invalid"},
		{"name too long", login("application/json", `{"email":"`+strings.Repeat("a", maxAccountLen+1)+`"}`), 400, invalid, "account_invalid"},
		{"not an object", login("application/json", `["email","alice"]`), 400, invalid, "account_invalid"},
		{"not JSON", login("application/json", `email=alice`), 400, invalid, "account_invalid"},
		{"truncated JSON", login("application/json", `{"email":"alice@example.com"`), 400, invalid, "account_invalid"},
		{"a second document after the object", login("application/json", `{"email":"a@example.com"} {"email":"b@example.com"}`), 400, invalid, "account_invalid"},
		{"form field twice", login("application/x-www-form-urlencoded", "email=a%40example.com&email=b%40example.com"), 400, invalid, "account_invalid"},
		{"form field twice in two cases", login("application/x-www-form-urlencoded", "email=a%40example.com&Email=b%40example.com"), 400, invalid, "account_invalid"},
		{"form with a bad escape", login("application/x-www-form-urlencoded", "email=%zz"), 400, invalid, "account_invalid"},
		{"form with invalid UTF-8", login("application/x-www-form-urlencoded", "email=%ff%fe"), 400, invalid, "account_invalid"},
		{"text/plain", login("text/plain", "alice@example.com"), 415, unsupported, "body_unsupported_media_type"},
		{"multipart", login("multipart/form-data; boundary=x", "--x\r\n"), 415, unsupported, "body_unsupported_media_type"},
		{"no content type", login("", `{"email":"alice@example.com"}`), 415, unsupported, "body_unsupported_media_type"},
		{"bad content type", login("application/json; =", `{"email":"alice@example.com"}`), 415, unsupported, "body_unsupported_media_type"},
		{"two content types", func() envoyReq {
			r := login("application/json", `{"email":"alice@example.com"}`)
			r.headers = append(r.headers, [2]string{"content-type", "text/plain"})
			return r
		}(), 415, unsupported, "body_unsupported_media_type"},
		{"larger than meshguard reads", login("application/json", big), 413, tooLarge, "body_too_large"},
		{"larger than meshguard reads, as a string", func() envoyReq {
			r := login("application/json", big)
			r.bodyAsString = true
			return r
		}(), 413, tooLarge, "body_too_large"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv, reg := newTestServer(t, accountConfig(), nil)
			resp, err := startGRPC(t, srv).Check(t.Context(), tc.req.build(t, formHeaders))
			if err != nil {
				t.Fatal(err)
			}
			d := resp.GetDeniedResponse()
			if code := codes.Code(resp.GetStatus().GetCode()); code != codes.InvalidArgument || int32(d.GetStatus().GetCode()) != tc.status || d.GetBody() != tc.body {
				t.Fatalf("answer %v %d %s, want InvalidArgument %d %s", code, d.GetStatus().GetCode(), d.GetBody(), tc.status, tc.body)
			}
			if got := resp.GetDynamicMetadata().GetFields()["reason"].GetStringValue(); got != tc.reason {
				t.Errorf("metadata reason %q, want %q", got, tc.reason)
			}
			if got := decisionCount(t, reg, "deny", tc.reason); got != 1 {
				t.Errorf("decisions_total{deny,%s} = %v, want 1", tc.reason, got)
			}
		})
	}

	t.Run("a route naming an impossible field is a 500", func(t *testing.T) {
		srv, _ := newTestServer(t, accountConfig(), nil)
		r := login("application/json", `{"email":"alice@example.com"}`)
		r.ext = map[string]string{"account": "e mail"}
		resp, err := startGRPC(t, srv).Check(t.Context(), r.build(t, formHeaders))
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.GetDeniedResponse().GetStatus().GetCode(); got != 500 {
			t.Fatalf("status %d, want 500", got)
		}
	})
}

// TestAccountKeySources: MESHGUARD_ACCOUNT_KEY, else the key file (a
// trailing newline is not part of the key), else a key of this process;
// bad files fail New with the key's name.
func TestAccountKeySources(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	keyOf := func(t *testing.T, id IdentityConfig) string {
		t.Helper()
		cfg := testConfig()
		cfg.Identity = id
		srv, _ := newTestServer(t, cfg, nil)
		resp, err := startGRPC(t, srv).Check(t.Context(), login("application/json", `{"email":"alice@example.com"}`).build(t, formHeaders))
		if err != nil {
			t.Fatal(err)
		}
		return upstreamHeader(resp, "x-meshguard-account")
	}
	env := DefaultIdentityConfig()
	env.AccountKey = testAccountKey
	file := DefaultIdentityConfig()
	file.AccountKeyFile = write("key", testAccountKey+"\n")
	random := DefaultIdentityConfig()
	fromEnv, fromFile := keyOf(t, env), keyOf(t, file)
	if fromEnv == "" || fromEnv != fromFile {
		t.Errorf("key from the environment %q, from the file %q: want the same", fromEnv, fromFile)
	}
	if r1, r2 := keyOf(t, random), keyOf(t, random); r1 == fromEnv || r1 == r2 {
		t.Errorf("random keys %q and %q (configured: %q): want a fresh key per process", r1, r2, fromEnv)
	}

	for _, tc := range []struct{ name, path, want string }{
		{"missing", filepath.Join(dir, "none"), "identity.account_key_file: open " + filepath.Join(dir, "none")},
		{"short", write("short", "abc\n"), "holds 3 bytes, want at least 16"},
		{"huge", write("huge", strings.Repeat("k", 5000)), "is larger than 4096 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.Identity.AccountKeyFile = tc.path
			_, err := New(slog.New(slog.DiscardHandler), prometheus.NewRegistry(), cfg, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want an error containing %q", err, tc.want)
			}
		})
	}
	t.Run("short key from the environment", func(t *testing.T) {
		cfg := testConfig()
		cfg.Identity.AccountKey = "short"
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "MESHGUARD_ACCOUNT_KEY: must be at least 16 bytes") {
			t.Fatalf("Validate: %v", err)
		}
		if strings.Contains(cfg.Validate().Error(), "short") {
			t.Error("the error quotes the secret")
		}
	})
}

// FuzzAccountBody: the body parsers face the network; whatever they are
// given, they return at most one bounded, normalised name and never panic.
func FuzzAccountBody(f *testing.F) {
	for _, s := range []string{
		`{"email":"alice@example.com"}`, `{"email":1e999}`, `{"a":[[[[{}]]]],"email":"x"}`, `{"email":"\ud800"}`,
		"email=a%40b&x=1", "email=%", `{"email":"a","email":"b"}`, "\xff",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, parse := range []func([]byte, string) (string, bool){jsonAccount, formAccount} {
			name, ok := parse(body, "email")
			if !ok {
				continue
			}
			if n, ok := normalizeAccount(name); ok && (n == "" || len(n) > maxAccountLen) {
				t.Fatalf("normalised %q to %q", name, n)
			}
		}
	})
}
