package extauthz

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/url"
	"os"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/cases"
	"golang.org/x/text/unicode/norm"
)

// A route whose context_extensions name an account field (account: email)
// is a login: Envoy sends meshguard the request body (the route's
// check_settings.with_request_body), meshguard reads the account named in
// it and sets x-meshguard-account to account:<key>, which the route's rate
// limit counts per account. The key is a keyed hash: the name itself never
// reaches Redis, a header, the metadata or a log.
const (
	// MaxAccountBodyBytes is the largest body meshguard reads for the
	// account name; a route's with_request_body.max_request_bytes must not
	// be larger (Envoy answers 413 itself above its own limit).
	MaxAccountBodyBytes = 8 << 10
	// maxAccountLen bounds the normalised name (an e-mail address is at most
	// 254 bytes).
	maxAccountLen = 320
	// maxAccountField bounds the field name a route names.
	maxAccountField = 64
	// accountKeyBytes is how much of the HMAC-SHA256 the key keeps: 128
	// bits, far beyond any chance of two accounts sharing a bucket.
	accountKeyBytes = 16
)

// accountMethod reports whether requests with method m carry a login body.
// Other methods get no account key (the route's per-address limit still
// applies).
func accountMethod(m string) bool {
	return m == "POST" || m == "PUT" || m == "PATCH"
}

// validAccountField reports whether f can name a JSON or form field in a
// context_extensions value.
func validAccountField(f string) bool {
	return len(f) <= maxAccountField && tokenRE.MatchString(f)
}

// account reads the account the body names in field and returns its key,
// or the reason the request is refused. Envoy sends the body as raw (with
// pack_as_bytes) or as a string; its size is checked before anything is
// copied or parsed.
func (s *Server) account(field string, r *request, raw []byte, str string) (string, reason) {
	switch n := max(len(raw), len(str)); {
	case n > MaxAccountBodyBytes:
		return "", reasonBodyTooLarge
	case n == 0:
		return "", reasonAccountInvalid
	}
	body := raw
	if len(body) == 0 {
		body = []byte(str)
	}
	if r.nContentType != 1 {
		return "", reasonBodyUnsupported
	}
	mt, _, err := mime.ParseMediaType(r.contentType)
	if err != nil {
		return "", reasonBodyUnsupported
	}
	var name string
	var ok bool
	switch {
	case mt == "application/json" || strings.HasSuffix(mt, "+json"):
		name, ok = jsonAccount(body, field)
	case mt == "application/x-www-form-urlencoded":
		name, ok = formAccount(body, field)
	default:
		return "", reasonBodyUnsupported
	}
	if !ok {
		return "", reasonAccountInvalid
	}
	name, ok = normalizeAccount(name)
	if !ok {
		return "", reasonAccountInvalid
	}
	mac := hmac.New(sha256.New, s.accountKey)
	mac.Write([]byte(name))
	sum := mac.Sum(nil)
	return "account:" + base64.RawURLEncoding.EncodeToString(sum[:accountKeyBytes]), reasonNone
}

// jsonAccount returns the string (or number) value of field in a JSON
// object. Field names match case-insensitively and a field present twice
// is refused: applications differ in which of two copies they read (Go's
// encoding/json takes the last case-insensitive match), and any copy the
// key skipped would be a fresh quota for the same account.
func jsonAccount(body []byte, field string) (string, bool) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return "", false
	}
	var name string
	n := 0
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return "", false
		}
		k, _ := t.(string)
		if !strings.EqualFold(k, field) {
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return "", false
			}
			continue
		}
		v, err := dec.Token()
		if err != nil {
			return "", false
		}
		switch v := v.(type) {
		case string:
			name = v
		case json.Number:
			name = v.String()
		default: // null, a bool, an object or a list names no account
			return "", false
		}
		n++
	}
	if t, err := dec.Token(); err != nil || t != json.Delim('}') {
		return "", false
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return "", false // something after the object
	}
	return name, n == 1
}

// formAccount returns the value of field in an
// application/x-www-form-urlencoded body, by the same rules as jsonAccount.
func formAccount(body []byte, field string) (string, bool) {
	q, err := url.ParseQuery(string(body))
	if err != nil {
		return "", false
	}
	var name string
	n := 0
	for k, vs := range q {
		if strings.EqualFold(k, field) {
			n += len(vs)
			name = vs[0]
		}
	}
	return name, n == 1
}

// normalizeAccount maps the spellings of one account that applications
// commonly treat as the same (surrounding spaces, letter case, Unicode
// compatibility forms: NFKC case folding) to one name, so an attacker
// cannot get a fresh per-account quota by changing how the name is written.
// Two accounts an application keeps apart may share a quota; that only
// makes the limit stricter.
func normalizeAccount(s string) (string, bool) {
	if len(s) > 4*maxAccountLen || !utf8.ValidString(s) {
		return "", false
	}
	s = strings.TrimSpace(s)
	s = norm.NFKC.String(cases.Fold().String(norm.NFKC.String(s)))
	if s == "" || len(s) > maxAccountLen {
		return "", false
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return "", false
		}
	}
	return s, true
}

// loadAccountKey returns the key account names are hashed with:
// MESHGUARD_ACCOUNT_KEY, else the key file, else a random key that only
// this process knows (Config.Warnings says what that costs).
func loadAccountKey(id IdentityConfig) ([]byte, error) {
	if k := id.AccountKey.Reveal(); k != "" {
		return []byte(k), nil
	}
	if path := id.AccountKeyFile; path != "" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("identity.account_key_file: %w", err)
		}
		defer f.Close()
		const maxKeyFile = 4 << 10
		b, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
		if err != nil {
			return nil, fmt.Errorf("identity.account_key_file: %w", err)
		}
		k := bytes.TrimRight(b, "\r\n")
		switch {
		case len(b) > maxKeyFile:
			return nil, fmt.Errorf("identity.account_key_file: %s is larger than %d bytes", path, maxKeyFile)
		case len(k) < minAccountKey:
			return nil, fmt.Errorf("identity.account_key_file: %s holds %d bytes, want at least %d", path, len(k), minAccountKey)
		}
		return k, nil
	}
	k := make([]byte, 32)
	rand.Read(k) // never fails (Go 1.24+)
	return k, nil
}
