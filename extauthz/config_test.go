package extauthz

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// testFile is the part of meshguard's config file that extauthz owns,
// decoded the way cmd/meshguard decodes it: strictly, over the defaults.
type testFile struct {
	Environment string         `yaml:"environment"`
	CORS        CORSConfig     `yaml:"cors"`
	Identity    IdentityConfig `yaml:"identity"`
	CSP         CSPConfig      `yaml:"csp"`
}

func loadTestConfig(t *testing.T, path string) (Config, error) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f := testFile{Environment: "production", CORS: DefaultCORSConfig(), Identity: DefaultIdentityConfig(), CSP: DefaultCSPConfig()}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, err
	}
	cfg := Config{Development: f.Environment == "development", CORS: f.CORS, Identity: f.Identity, CSP: f.CSP}
	return cfg, cfg.Validate()
}

func TestValidateDefaults(t *testing.T) {
	cfg := Config{CORS: DefaultCORSConfig(), Identity: DefaultIdentityConfig(), CSP: DefaultCSPConfig()}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	if _, err := loadTestConfig(t, "testdata/good.yaml"); err != nil {
		t.Fatalf("testdata/good.yaml: %v", err)
	}
}

func TestValidateBad(t *testing.T) {
	cases := map[string][]string{
		"bad_mode.yaml": {`cors.mode: must be enforce or report, got "block"`},
		"bad_origins.yaml": {
			`cors.allowed_origins[0]: "https://dashboard.example.com/" must not have a path, query, fragment or trailing slash`,
			`cors.allowed_origins[1]: "dashboard.example.com" must be scheme://host[:port]`,
			`cors.allowed_origins[2]: "https://*example.com" wildcard must be the whole first label, as in https://*.example.com`,
			`cors.allowed_origins[3]: "https://a.*.example.com" wildcard must be the whole first label`,
			`cors.allowed_origins[4]: "https://*.com" wildcard must be followed by at least two labels`,
			`cors.allowed_origins[5]: "https://user@example.com" must not have user information`,
			`cors.allowed_origins[6]: "https://example.com:99999" has an invalid port`,
			`cors.allowed_origins[7]: "https://example.com:0443" has an invalid port`,
			`cors.allowed_origins[8]: "https://exa mple.com" has an invalid host`,
			`cors.allowed_origins[9]: "ht tp://example.com" has an invalid scheme`,
			`cors.allowed_origins[10]: "https://" has no host`,
		},
		"bad_null_credentials.yaml": {`cors.allowed_origins[0]: "null" cannot be allowed while cors.allow_credentials is true`},
		"bad_star_credentials.yaml": {`cors.allowed_origins[0]: "*" cannot be used while cors.allow_credentials is true`},
		"bad_public_origin.yaml":    {`cors.public_origin: "https://app.example.com/app" must not have a path`},
		"bad_tenants.yaml": {
			`cors.tenants.acme[1]: "*" is only allowed in cors.allowed_origins, without credentials`,
			`cors.tenants.acme[2]: "https://acme.example.com?x" must not have a path, query`,
			`cors.tenants: tenant id "bad tenant" must be 1-253 visible ASCII characters`,
			`cors.tenants_table: "Tenant-Origins" must be lower-case SQL identifiers`,
			`cors.tenants_reload: must be at least 1s, got 100ms`,
		},
		"bad_lists.yaml": {
			`cors.allowed_methods[1]: "*" is not supported; list the methods`,
			`cors.allowed_methods[2]: "BAD METHOD" is not an HTTP method token`,
			`cors.allowed_headers[1]: "*" is not supported; list the header names`,
			`cors.allowed_headers[2]: "X Bad" is not a header name`,
			`cors.exposed_headers[0]: "X:Bad" is not a header name`,
			`cors.max_age: must be between 0 and 24h, got 48h0m0s`,
			`cors.tenant_header: "x tenant" is not a header name`,
		},
		"bad_identity.yaml": {
			`identity.jwt_metadata.key: must be set when identity.jwt_metadata.namespace is "envoy.filters.http.jwt_authn"`,
			`identity.jwt_metadata.user_claim: must be set`,
			`identity.trusted_user_header: "x-meshguard-user" is a header meshguard sets itself`,
			`identity.trusted_role_header: "x role" is not a header name`,
			`identity.client_ip_header: "X-Meshguard-Client" is a header meshguard sets itself`,
		},
		"bad_identity_keys.yaml": {
			`identity.jwt_metadata.failure_key: "jwt_payload" is also identity.jwt_metadata.key`,
			`identity.ipv6_prefix: must be between 32 and 128, got 16`,
			`identity.account_key_file: not a file path, got "key\nfile"`,
		},
		"bad_csp.yaml": {
			`csp.directives: directive name "Default-Src" must be lower-case letters, digits and '-'`,
			`csp.directives.report-uri: set csp.report_uri / csp.report_to instead`,
			`csp.directives.script-src[0]: "'self';" must be a non-empty source expression without spaces, ';' or ','`,
			`csp.directives.script-src[1]: "'nonce-abc'": nonces are issued per request`,
			`csp.nonce_directives[0]: directive "style-src" is not in csp.directives`,
			`csp.report_uri: "/csp reports" must be a URL without spaces`,
			`csp.report_to: "csp endpoint" is not a reporting group name`,
		},
		"bad_unknown_key.yaml": {`field allowed_origin not found`},
	}
	files, _ := filepath.Glob("testdata/bad_*.yaml")
	if len(files) != len(cases) {
		t.Errorf("%d testdata/bad_*.yaml files, %d table rows: every bad file needs a row", len(files), len(cases))
	}
	for name, wants := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := loadTestConfig(t, filepath.Join("testdata", name))
			if err == nil {
				t.Fatal("accepted, want an error")
			}
			lines := strings.Split(err.Error(), "\n")
			for _, w := range wants {
				found := false
				for _, l := range lines {
					found = found || strings.Contains(l, w)
				}
				if !found {
					t.Errorf("error lacks %q; got:\n%v", w, err)
				}
			}
			if len(wants) > 1 && len(lines) != len(wants) {
				t.Errorf("%d error lines, want %d (one per problem):\n%v", len(lines), len(wants), err)
			}
		})
	}
}

// TestCSPTemplate checks the policy built from directives with two nonce
// directives and both reporting mechanisms.
func TestCSPTemplate(t *testing.T) {
	cfg, err := loadTestConfig(t, "testdata/good.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p, err := compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	value, nonce := p.csp.build()
	got := strings.ReplaceAll(value, nonce, "N")
	want := "default-src 'self'; img-src 'self' data:; script-src 'self' 'strict-dynamic' 'nonce-N'; style-src 'self' 'nonce-N'; upgrade-insecure-requests; report-uri /v1/csp-reports; report-to csp-endpoint"
	if got != want {
		t.Errorf("CSP:\n got %s\nwant %s", got, want)
	}
	if p.csp.report != `csp-endpoint="https://app.example.com/v1/csp-reports"` {
		t.Errorf("Reporting-Endpoints = %s", p.csp.report)
	}
	if len(nonce) != 24 {
		t.Errorf("nonce %q: want 24 base64 characters (128 bits)", nonce)
	}
}
