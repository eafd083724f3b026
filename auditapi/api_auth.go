package auditapi

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

// tokenFileCheckInterval is how often, at most, the token file is stat'ed
// for a change. A rotated token takes effect within it.
const tokenFileCheckInterval = time.Second

const bearerChallenge = `Bearer realm="meshguard-audit"`

// authorizer decides who may call the admin API. It is safe for concurrent
// use.
//
// The caller is whoever holds a configured admin token; the actor recorded
// for its reads is derived from which token matched (never from a client
// header: a header reaching meshguard's listener directly can say anything).
// A verified mTLS peer identity would be one more credential here, checked
// in authorize before the bearer token and named in principal the same way.
type authorizer struct {
	log       *slog.Logger
	envToken  *[sha256.Size]byte // nil: MESHGUARD_ADMIN_TOKEN unset
	tokenFile string
	now       func() time.Time

	mu        sync.Mutex
	checked   time.Time // last stat of tokenFile
	fileStamp fileStamp
	fileToken *[sha256.Size]byte // nil: no usable token in the file
}

type fileStamp struct {
	mod  time.Time
	size int64
	ok   bool
}

// denial is a refused request: the status, the challenge to send, the
// message and the metric reason.
type denial struct {
	status    int
	challenge string
	msg       string
	reason    string
}

func newAuthorizer(log *slog.Logger, cfg Config, now func() time.Time) (*authorizer, error) {
	z := &authorizer{log: log, tokenFile: cfg.AdminTokenFile, now: now}
	if t := cfg.AdminToken.Reveal(); t != "" {
		h := sha256.Sum256([]byte(t))
		z.envToken = &h
	}
	if z.tokenFile != "" {
		st, tok, err := readTokenFile(z.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("audit.admin_token_file: %w", err)
		}
		z.fileStamp, z.fileToken, z.checked = st, tok, now()
	}
	return z, nil
}

// enabled reports whether any credential could be accepted. A configured
// token file counts even while it is empty, since it may be filled later.
func (z *authorizer) enabled() bool {
	return z.envToken != nil || z.tokenFile != ""
}

// authorize returns the caller, or why it is refused: a matching admin
// token admits; a presented token that matches none is invalid; no
// credentials at all get the challenge.
func (z *authorizer) authorize(r *http.Request) (principal, *denial) {
	if !z.enabled() {
		return principal{}, &denial{status: http.StatusServiceUnavailable, reason: "disabled",
			msg: "audit admin API disabled: configure MESHGUARD_ADMIN_TOKEN or audit.admin_token_file"}
	}
	authz := r.Header.Get("Authorization")
	scheme, tok, _ := strings.Cut(authz, " ")
	tok = strings.TrimSpace(tok)
	bearer := strings.EqualFold(scheme, "Bearer") && tok != ""
	if bearer {
		if p, ok := z.tokenPrincipal(tok); ok {
			return p, nil
		}
	}
	switch {
	case bearer:
		return principal{}, &denial{status: http.StatusUnauthorized, reason: "invalid_token",
			challenge: bearerChallenge + `, error="invalid_token"`, msg: "invalid bearer token"}
	case authz != "":
		return principal{}, &denial{status: http.StatusUnauthorized, reason: "invalid_token",
			challenge: bearerChallenge + `, error="invalid_request"`, msg: "Authorization must be a Bearer token"}
	}
	return principal{}, &denial{status: http.StatusUnauthorized, reason: "missing", challenge: bearerChallenge,
		msg: "authentication required: send Authorization: Bearer <admin token>"}
}

// Actors recorded for the two token sources.
const (
	actorEnvToken  = "admin:env-token"
	actorFileToken = "admin:file-token"
)

// tokenPrincipal compares SHA-256 hashes of the presented and configured
// tokens in constant time, so neither content nor length leaks through
// timing, and every configured token is compared, match or not. The actor
// is the matching token's source; its fingerprint (the first 48 bits of its
// hash, which reveal nothing usable of a long random token) tells rotated
// tokens apart in the trail.
func (z *authorizer) tokenPrincipal(tok string) (principal, bool) {
	if len(tok) > maxTokenLen {
		return principal{}, false
	}
	return z.hashPrincipal(sha256.Sum256([]byte(tok)))
}

// hashPrincipal is tokenPrincipal of a token's SHA-256. The console keeps
// the hash of the token that opened a session and asks again on every
// request, so a rotated token ends its sessions.
func (z *authorizer) hashPrincipal(got [sha256.Size]byte) (principal, bool) {
	env, file := 0, 0
	if z.envToken != nil {
		env = subtle.ConstantTimeCompare(got[:], z.envToken[:])
	}
	if ft := z.currentFileToken(); ft != nil {
		file = subtle.ConstantTimeCompare(got[:], ft[:])
	}
	fp := "sha256:" + hex.EncodeToString(got[:6])
	switch {
	case env == 1:
		return principal{user: actorEnvToken, via: "token", token: fp}, true
	case file == 1:
		return principal{user: actorFileToken, via: "token", token: fp}, true
	}
	return principal{}, false
}

// currentFileToken returns the token file's hash, re-reading the file when
// its modification time or size changed. A file that becomes unreadable or
// empty admits nobody (fail closed) until it is fixed.
func (z *authorizer) currentFileToken() *[sha256.Size]byte {
	if z.tokenFile == "" {
		return nil
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	now := z.now()
	if d := now.Sub(z.checked); d >= 0 && d < tokenFileCheckInterval { // a clock step back re-checks
		return z.fileToken
	}
	z.checked = now
	fi, err := os.Stat(z.tokenFile)
	if err != nil {
		if z.fileStamp.ok || z.fileToken != nil {
			z.log.Warn("audit admin token file unreadable; file token disabled", "path", z.tokenFile, "err", err)
		}
		z.fileStamp, z.fileToken = fileStamp{}, nil
		return nil
	}
	if st := (fileStamp{mod: fi.ModTime(), size: fi.Size(), ok: true}); st == z.fileStamp {
		return z.fileToken
	}
	st, tok, err := readTokenFile(z.tokenFile)
	if err != nil {
		z.log.Warn("audit admin token file unreadable; file token disabled", "path", z.tokenFile, "err", err)
		z.fileStamp, z.fileToken = fileStamp{}, nil
		return nil
	}
	z.log.Info("audit admin token file reloaded", "path", z.tokenFile, "has_token", tok != nil)
	z.fileStamp, z.fileToken = st, tok
	return tok
}

// readTokenFile reads a token file: the token on its own, surrounding
// whitespace ignored. An empty file holds no token.
func readTokenFile(path string) (fileStamp, *[sha256.Size]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return fileStamp{}, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fileStamp{}, nil, err
	}
	if !fi.Mode().IsRegular() {
		return fileStamp{}, nil, fmt.Errorf("%s is not a regular file", path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxTokenLen+2))
	if err != nil {
		return fileStamp{}, nil, err
	}
	st := fileStamp{mod: fi.ModTime(), size: fi.Size(), ok: true}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return st, nil, nil
	}
	if err := checkToken(tok); err != nil {
		return fileStamp{}, nil, fmt.Errorf("token in %s: %w", path, err)
	}
	h := sha256.Sum256([]byte(tok))
	return st, &h, nil
}
