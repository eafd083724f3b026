package auditapi

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/meshguard/meshguard/internal/clientaddr"
)

// Console sessions live in memory on the server: the cookie carries only a
// random id, so sign-out and expiry end a session at once (nothing a
// client kept stays valid), and a restart ends them all. The store is
// bounded; when full, expired sessions go first, then the least recently
// used one.
const (
	sessionIdle      = 15 * time.Minute // no request for this long ends a session
	sessionLifetime  = 8 * time.Hour    // and none lives longer
	sessionMax       = 256
	sessionIDBytes   = 32
	maxSessionCookie = 64 // longer cookie values are forged: ours are 43 characters
)

// session is one signed-in console user.
type session struct {
	csrf      string            // the token every form of this session carries
	tokenHash [sha256.Size]byte // the admin token that opened it: rotating it away ends the session
	p         principal
	created   time.Time
	lastSeen  time.Time
}

// sessionState is why a cookie did not name a live session.
type sessionState int

const (
	sessionOK sessionState = iota
	sessionUnknown
	sessionIdleExpired
	sessionLifetimeExpired
)

type sessionStore struct {
	mu sync.Mutex
	m  map[[sha256.Size]byte]*session // by the SHA-256 of the cookie value
}

func newSessionStore() *sessionStore {
	return &sessionStore{m: map[[sha256.Size]byte]*session{}}
}

// randomToken is n random bytes, base64url.
func randomToken(n int) string {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand panics rather than return short)
	return base64.RawURLEncoding.EncodeToString(b)
}

// create stores a new session and returns the cookie value that names it.
func (s *sessionStore) create(p principal, tokenHash [sha256.Size]byte, now time.Time) (string, *session) {
	id := randomToken(sessionIDBytes)
	ss := &session{csrf: randomToken(32), tokenHash: tokenHash, p: p, created: now, lastSeen: now}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.m) >= sessionMax {
		s.evict(now)
	}
	s.m[sha256.Sum256([]byte(id))] = ss
	return id, ss
}

// evict drops every expired session, or when none is, the least recently
// used one. s.mu is held.
func (s *sessionStore) evict(now time.Time) {
	var oldestKey [sha256.Size]byte
	var oldest *session
	n := len(s.m)
	for k, ss := range s.m {
		if expiry(ss, now) != sessionOK {
			delete(s.m, k)
			continue
		}
		if oldest == nil || ss.lastSeen.Before(oldest.lastSeen) {
			oldestKey, oldest = k, ss
		}
	}
	if len(s.m) == n && oldest != nil {
		delete(s.m, oldestKey)
	}
}

func expiry(ss *session, now time.Time) sessionState {
	switch {
	case now.Sub(ss.created) >= sessionLifetime:
		return sessionLifetimeExpired
	case now.Sub(ss.lastSeen) >= sessionIdle:
		return sessionIdleExpired
	}
	return sessionOK
}

// lookup returns the live session the cookie value names and marks it
// used, or why there is none. An expired session is removed.
func (s *sessionStore) lookup(id string, now time.Time) (*session, sessionState) {
	if id == "" || len(id) > maxSessionCookie {
		return nil, sessionUnknown
	}
	k := sha256.Sum256([]byte(id))
	s.mu.Lock()
	defer s.mu.Unlock()
	ss, ok := s.m[k]
	if !ok {
		return nil, sessionUnknown
	}
	if st := expiry(ss, now); st != sessionOK {
		delete(s.m, k)
		return nil, st
	}
	ss.lastSeen = now
	return ss, sessionOK
}

// remove ends the session the cookie value names.
func (s *sessionStore) remove(id string) {
	if id == "" || len(id) > maxSessionCookie {
		return
	}
	k := sha256.Sum256([]byte(id))
	s.mu.Lock()
	delete(s.m, k)
	s.mu.Unlock()
}

func (s *sessionStore) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// Sign-in attempts are rate-limited per client and overall, so the token
// cannot be guessed quickly from one address or from many, and one client
// cannot spend the overall budget alone. A client is what clientaddr makes
// of the peer: an IPv4 address or an IPv6 /64 (one subscriber's whole
// prefix; per-address keys would give it 2^64 budgets).
const (
	signinPerIPEvery = 3 * time.Second
	signinPerIPBurst = 5
	signinGlobalRate = 2 // per second
	signinGlobalMax  = 20
	signinMaxIPs     = 4096 // tracked clients; the table is reset when full
	signinIPv6Prefix = 64
)

type signinLimiter struct {
	mu     sync.Mutex
	global *rate.Limiter
	perIP  map[netip.Prefix]*rate.Limiter
}

func newSigninLimiter() *signinLimiter {
	return &signinLimiter{global: rate.NewLimiter(signinGlobalRate, signinGlobalMax), perIP: map[netip.Prefix]*rate.Limiter{}}
}

// allow reports whether one more attempt from the peer remoteAddr
// (host:port) may be checked now.
func (l *signinLimiter) allow(remoteAddr string, now time.Time) bool {
	addr, _ := clientaddr.ParseHostPort(remoteAddr)
	client := clientaddr.Prefix(addr, signinIPv6Prefix) // the zero Prefix pools every unparsable peer
	l.mu.Lock()
	defer l.mu.Unlock()
	lim, ok := l.perIP[client]
	if !ok {
		if len(l.perIP) >= signinMaxIPs {
			clear(l.perIP)
		}
		lim = rate.NewLimiter(rate.Every(signinPerIPEvery), signinPerIPBurst)
		l.perIP[client] = lim
	}
	return lim.AllowN(now, 1) && l.global.AllowN(now, 1)
}
