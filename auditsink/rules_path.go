package auditsink

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// pathTemplate is a compiled RuleConfig.Path. It is immutable.
type pathTemplate struct {
	segs  []tseg
	names []string // capture names, by capture index
}

type segKind uint8

const (
	segLit     segKind = iota // literal, ASCII case-insensitive
	segAny                    // *
	segCapture                // {name}
	segRest                   // {name...}, last only
)

type tseg struct {
	kind    segKind
	lit     string
	capture int
}

// parsePathTemplate compiles a path template such as
// /api/{entity_type}/{id}/approve or /static/{rest...}.
func parsePathTemplate(s string) (*pathTemplate, error) {
	if len(s) > maxTemplateLen {
		return nil, fmt.Errorf("longer than %d characters", maxTemplateLen)
	}
	if !strings.HasPrefix(s, "/") {
		return nil, errors.New("must start with /")
	}
	if strings.ContainsAny(s, "?#") {
		return nil, errors.New("must not contain a query or fragment")
	}
	t := &pathTemplate{}
	body := strings.TrimSuffix(s[1:], "/")
	if body == "" {
		return t, nil
	}
	parts := strings.Split(body, "/")
	for i, p := range parts {
		switch {
		case p == "":
			return nil, fmt.Errorf("empty segment %d", i+1)
		case p == "*":
			t.segs = append(t.segs, tseg{kind: segAny})
		case strings.HasPrefix(p, "{") && strings.HasSuffix(p, "}"):
			name := p[1 : len(p)-1]
			kind := segCapture
			if n, ok := strings.CutSuffix(name, "..."); ok {
				if i != len(parts)-1 {
					return nil, fmt.Errorf("{%s} must be the last segment", name)
				}
				name, kind = n, segRest
			}
			if !isCaptureName(name) {
				return nil, fmt.Errorf("capture name %q must be a-z 0-9 _ starting with a letter", name)
			}
			if slices.Contains(t.names, name) {
				return nil, fmt.Errorf("capture {%s} appears twice", name)
			}
			if len(t.names) == maxCaptures {
				return nil, fmt.Errorf("more than %d captures", maxCaptures)
			}
			t.segs = append(t.segs, tseg{kind: kind, capture: len(t.names)})
			t.names = append(t.names, name)
		case strings.ContainsAny(p, "{}*"):
			return nil, fmt.Errorf("segment %q mixes literal text with a capture or *; a capture is a whole segment", p)
		default:
			t.segs = append(t.segs, tseg{kind: segLit, lit: p})
		}
	}
	return t, nil
}

func isCaptureName(s string) bool {
	if s == "" || s[0] < 'a' || s[0] > 'z' || len(s) > 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// maxSplitSegs is how many path segments splitPath keeps; longer paths
// are matched on the string itself.
const maxSplitSegs = 16

// splitPath is a request path cut into its non-empty segments once, so
// each rule's template compares segments instead of rescanning the path.
type splitPath struct {
	path     string
	n        int
	overflow bool
	seg      [maxSplitSegs]string
	start    [maxSplitSegs]int
}

func (sp *splitPath) split(path string) {
	sp.path, sp.n, sp.overflow = path, 0, false
	for i := 0; i < len(path); {
		if path[i] == '/' {
			i++
			continue
		}
		end := strings.IndexByte(path[i:], '/')
		if end < 0 {
			end = len(path)
		} else {
			end += i
		}
		if sp.n == maxSplitSegs {
			sp.overflow = true
			return
		}
		sp.seg[sp.n], sp.start[sp.n] = path[i:end], i
		sp.n++
		i = end
	}
}

// matchSplit is match over a split path. It does not allocate.
func (t *pathTemplate) matchSplit(sp *splitPath, caps *[maxCaptures]string) bool {
	if sp.overflow {
		return t.match(sp.path, caps)
	}
	for i := range t.segs {
		s := &t.segs[i]
		if s.kind == segRest {
			if i < sp.n {
				caps[s.capture] = strings.TrimRight(sp.path[sp.start[i]:], "/")
			} else {
				caps[s.capture] = ""
			}
			return true
		}
		if i >= sp.n {
			return false
		}
		switch s.kind {
		case segLit:
			if !equalFoldASCII(sp.seg[i], s.lit) {
				return false
			}
		case segCapture:
			caps[s.capture] = sp.seg[i]
		}
	}
	return len(t.segs) == sp.n
}

// equalFoldASCII compares case-insensitively in ASCII only, as routers do;
// Unicode folding (K for k) would let a path a router treats as distinct
// match an audit rule.
func equalFoldASCII(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if x == y {
			continue
		}
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// match reports whether path (without its query) matches t, filling caps
// with substrings of path. It does not allocate.
func (t *pathTemplate) match(path string, caps *[maxCaptures]string) bool {
	i := 0
	p := path
	for {
		for len(p) > 0 && p[0] == '/' {
			p = p[1:]
		}
		if p == "" {
			break
		}
		if i >= len(t.segs) {
			return false
		}
		s := &t.segs[i]
		if s.kind == segRest {
			caps[s.capture] = strings.TrimRight(p, "/")
			return true
		}
		end := strings.IndexByte(p, '/')
		if end < 0 {
			end = len(p)
		}
		seg := p[:end]
		switch s.kind {
		case segLit:
			if !equalFoldASCII(seg, s.lit) {
				return false
			}
		case segCapture:
			caps[s.capture] = seg
		}
		p = p[end:]
		i++
	}
	switch {
	case i == len(t.segs):
		return true
	case i == len(t.segs)-1 && t.segs[i].kind == segRest:
		caps[t.segs[i].capture] = ""
		return true
	}
	return false
}
