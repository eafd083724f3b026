package extauthz

import (
	"errors"
	"net/netip"
	"strings"
)

// maxOriginLen bounds an Origin value: a 253-byte host plus scheme and port
// fits with room to spare; anything longer is not an origin a browser sends.
const maxOriginLen = 512

// Origin parse errors. They are values so the hot path returns them without
// allocating; config validation wraps them with the field name.
var (
	errOriginEmpty     = errors.New("is empty")
	errOriginTooLong   = errors.New("is longer than 512 bytes")
	errOriginNoScheme  = errors.New("must be scheme://host[:port]")
	errOriginScheme    = errors.New("has an invalid scheme")
	errOriginNoHost    = errors.New("has no host")
	errOriginPath      = errors.New("must not have a path, query, fragment or trailing slash")
	errOriginUserinfo  = errors.New("must not have user information")
	errOriginPort      = errors.New("has an invalid port (want 1-65535, no leading zeros)")
	errOriginHost      = errors.New("has an invalid host (want lower-case-insensitive DNS labels, an IPv4 address or a bracketed IPv6 address)")
	errOriginWildcard  = errors.New("wildcard must be the whole first label, as in https://*.example.com")
	errOriginWildShort = errors.New("wildcard must be followed by at least two labels, as in https://*.example.com")
)

// origin is a normalised serialised origin: scheme "://" host [":" port],
// scheme and host lower-case, default port dropped. The zero value is "no
// origin". s[:hostStart-3] is the scheme, s[hostStart:hostEnd] the host and
// s[hostEnd+1:] the port when hostEnd < len(s).
type origin struct {
	s         string
	hostStart int
	hostEnd   int
	null      bool
}

func (o origin) scheme() string { return o.s[:o.hostStart-3] }
func (o origin) host() string   { return o.s[o.hostStart:o.hostEnd] }
func (o origin) port() string {
	if o.hostEnd >= len(o.s) {
		return ""
	}
	return o.s[o.hostEnd+1:]
}

// parseOrigin parses and normalises an Origin header value. The literal
// "null" parses as the opaque origin. When s is already normal (as browsers
// send it) the result shares s and nothing is allocated.
func parseOrigin(s string) (origin, error) {
	return parseOriginPattern(s, false)
}

// parseOriginPattern is parseOrigin that also accepts a "*." first label when
// wildcard is true (config patterns only).
func parseOriginPattern(s string, wildcard bool) (origin, error) {
	if s == "" {
		return origin{}, errOriginEmpty
	}
	if len(s) > maxOriginLen {
		return origin{}, errOriginTooLong
	}
	if s == "null" {
		return origin{s: "null", null: true}, nil
	}
	i := strings.Index(s, "://")
	if i < 0 {
		return origin{}, errOriginNoScheme
	}
	schemeStr := s[:i]
	if schemeStr == "" {
		return origin{}, errOriginNoScheme
	}
	lower := true
	for j := 0; j < len(schemeStr); j++ {
		c := schemeStr[j]
		switch {
		case c >= 'a' && c <= 'z':
		case c >= 'A' && c <= 'Z':
			lower = false
		case j > 0 && (c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.'):
		default:
			return origin{}, errOriginScheme
		}
	}
	rest := s[i+3:]
	if rest == "" {
		return origin{}, errOriginNoHost
	}
	if strings.ContainsAny(rest, "/?#\\") {
		return origin{}, errOriginPath
	}
	if strings.IndexByte(rest, '@') >= 0 {
		return origin{}, errOriginUserinfo
	}
	var host, port string
	if rest[0] == '[' {
		j := strings.IndexByte(rest, ']')
		if j < 0 {
			return origin{}, errOriginHost
		}
		host, port = rest[:j+1], rest[j+1:]
		if port != "" {
			if port[0] != ':' {
				return origin{}, errOriginHost
			}
			port = port[1:]
			if port == "" {
				return origin{}, errOriginPort
			}
		}
	} else if j := strings.LastIndexByte(rest, ':'); j >= 0 {
		host, port = rest[:j], rest[j+1:]
		if port == "" {
			return origin{}, errOriginPort
		}
	} else {
		host = rest
	}
	if host == "" {
		return origin{}, errOriginNoHost
	}
	if port != "" && !validPort(port) {
		return origin{}, errOriginPort
	}
	if isDefaultPort(schemeStr, port) {
		port = ""
		lower = false // the normal form differs: rebuild it
	}
	var canonIPv6 string
	if host[0] == '[' {
		a, err := netip.ParseAddr(host[1 : len(host)-1])
		if err != nil || !a.Is6() || a.Zone() != "" {
			return origin{}, errOriginHost
		}
		if c := a.String(); c != host[1:len(host)-1] {
			canonIPv6 = "[" + c + "]"
			lower = false
		}
	} else {
		h := host
		if strings.HasPrefix(h, "*") {
			if !wildcard || !strings.HasPrefix(h, "*.") {
				return origin{}, errOriginWildcard
			}
			h = h[2:]
			if strings.IndexByte(h, '.') < 0 {
				return origin{}, errOriginWildShort
			}
		}
		up, ok := validRegName(h)
		if !ok {
			if strings.IndexByte(h, '*') >= 0 {
				return origin{}, errOriginWildcard
			}
			return origin{}, errOriginHost
		}
		if up {
			lower = false
		}
	}
	if lower {
		return origin{s: s, hostStart: i + 3, hostEnd: i + 3 + len(host)}, nil
	}
	// Rebuild the normal form; only reached for non-canonical input, which
	// browsers do not send.
	var b strings.Builder
	b.Grow(len(s))
	for j := 0; j < len(schemeStr); j++ {
		b.WriteByte(toLower(schemeStr[j]))
	}
	b.WriteString("://")
	start := b.Len()
	if canonIPv6 != "" {
		b.WriteString(canonIPv6)
	} else {
		for j := 0; j < len(host); j++ {
			b.WriteByte(toLower(host[j]))
		}
	}
	end := b.Len()
	if port != "" {
		b.WriteByte(':')
		b.WriteString(port)
	}
	return origin{s: b.String(), hostStart: start, hostEnd: end}, nil
}

func toLower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// validPort reports whether p is a decimal port 1-65535 without leading zeros.
func validPort(p string) bool {
	if len(p) == 0 || len(p) > 5 || p[0] == '0' {
		return false
	}
	n := 0
	for i := 0; i < len(p); i++ {
		c := p[i]
		if c < '0' || c > '9' {
			return false
		}
		n = n*10 + int(c-'0')
	}
	return n <= 65535
}

// isDefaultPort reports whether port is the default for scheme (compared
// case-insensitively), which the serialised origin leaves out.
func isDefaultPort(scheme, port string) bool {
	switch port {
	case "80":
		return strings.EqualFold(scheme, "http") || strings.EqualFold(scheme, "ws")
	case "443":
		return strings.EqualFold(scheme, "https") || strings.EqualFold(scheme, "wss")
	}
	return false
}

// validRegName checks a DNS-style host: dot-separated labels of letters,
// digits, '-' and '_', each 1-63 bytes, 253 in all. It reports whether any
// letter is upper-case.
func validRegName(h string) (upper, ok bool) {
	if len(h) == 0 || len(h) > 253 {
		return false, false
	}
	label := 0
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			label++
		case c >= 'A' && c <= 'Z':
			upper = true
			label++
		case c == '.':
			if label == 0 {
				return false, false
			}
			label = 0
			continue
		default:
			return false, false
		}
		if label > 63 {
			return false, false
		}
	}
	return upper, label > 0
}

// sameOrigin reports whether o is the origin of a request to scheme://authority
// (as Envoy reports :scheme and :authority), comparing normal forms.
func sameOrigin(o origin, scheme, authority string) bool {
	if o.null || o.s == "" || authority == "" || !strings.EqualFold(o.scheme(), scheme) {
		return false
	}
	host, port := authority, ""
	if authority[0] == '[' {
		j := strings.IndexByte(authority, ']')
		if j < 0 {
			return false
		}
		host = authority[:j+1]
		if rest := authority[j+1:]; rest != "" {
			if rest[0] != ':' {
				return false
			}
			port = rest[1:]
		}
	} else if j := strings.LastIndexByte(authority, ':'); j >= 0 {
		host, port = authority[:j], authority[j+1:]
	}
	if isDefaultPort(scheme, port) {
		port = ""
	}
	return strings.EqualFold(o.host(), host) && o.port() == port
}

// wildcardOrigin is a "scheme://*.suffix[:port]" pattern. suffix keeps its
// leading dot so that "evilexample.com" never matches "*.example.com".
type wildcardOrigin struct {
	scheme string
	suffix string
	port   string
}

// originSet is a compiled list of allowed origins. It is immutable once
// built and safe for concurrent use.
type originSet struct {
	exact map[string]struct{}
	wild  []wildcardOrigin
	null  bool
	any   bool // "*": every origin, only without credentials
}

// allows reports whether the normalised origin o is in the set.
func (p *originSet) allows(o origin) bool {
	if p == nil || o.s == "" {
		return false
	}
	if o.null {
		return p.null || p.any
	}
	if p.any {
		return true
	}
	if _, ok := p.exact[o.s]; ok {
		return true
	}
	if len(p.wild) == 0 {
		return false
	}
	sch, host, port := o.scheme(), o.host(), o.port()
	for _, w := range p.wild {
		if w.scheme == sch && w.port == port && len(host) > len(w.suffix) && strings.HasSuffix(host, w.suffix) {
			return true
		}
	}
	return false
}

// add compiles one configured entry into the set. allowNull and allowAny
// say whether "null" and "*" may appear here.
func (p *originSet) add(entry string, allowNull, allowAny bool) error {
	switch entry {
	case "*":
		if !allowAny {
			return errors.New("is only allowed in cors.allowed_origins, without credentials")
		}
		p.any = true
		return nil
	case "null":
		if !allowNull {
			return errors.New("cannot be allowed while cors.allow_credentials is true (every sandboxed document sends Origin: null)")
		}
		p.null = true
		return nil
	}
	o, err := parseOriginPattern(entry, true)
	if err != nil {
		return err
	}
	if h := o.host(); strings.HasPrefix(h, "*.") {
		p.wild = append(p.wild, wildcardOrigin{scheme: o.scheme(), suffix: h[1:], port: o.port()})
		return nil
	}
	if p.exact == nil {
		p.exact = make(map[string]struct{})
	}
	p.exact[o.s] = struct{}{}
	return nil
}
