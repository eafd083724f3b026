// Package secret holds values that must never reach a log line, an error
// message or a JSON document by accident: tokens, passwords and URLs that
// carry credentials.
package secret

import (
	"log/slog"
	"net/url"
	"strings"
)

const redacted = "[REDACTED]"

// String is a secret string. Its String, GoString, LogValue and MarshalJSON
// methods all redact it; Reveal returns the value. The zero value is an unset
// secret.
type String string

// Reveal returns the secret itself. Call it only where the value is used.
func (s String) Reveal() string { return string(s) }

// IsSet reports whether the secret is non-empty.
func (s String) IsSet() bool { return s != "" }

// String returns a redacted placeholder.
func (s String) String() string {
	if s == "" {
		return ""
	}
	return redacted
}

// GoString keeps %#v from printing the value.
func (s String) GoString() string { return s.String() }

// LogValue keeps slog from printing the value.
func (s String) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalJSON writes the redacted placeholder.
func (s String) MarshalJSON() ([]byte, error) { return []byte(`"` + s.String() + `"`), nil }

// MarshalText writes the redacted placeholder (YAML, text encoders).
func (s String) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// URL is a connection URL that may carry a password (redis://, postgres://).
// It prints with the password replaced; Reveal returns it whole.
type URL string

// Reveal returns the URL with its credentials.
func (u URL) Reveal() string { return string(u) }

// IsSet reports whether the URL is non-empty.
func (u URL) IsSet() bool { return u != "" }

// String returns the URL with any password redacted.
func (u URL) String() string { return RedactURL(string(u)) }

// GoString keeps %#v from printing the password.
func (u URL) GoString() string { return u.String() }

// LogValue keeps slog from printing the password.
func (u URL) LogValue() slog.Value { return slog.StringValue(u.String()) }

// MarshalJSON writes the redacted URL.
func (u URL) MarshalJSON() ([]byte, error) {
	return []byte(`"` + strings.ReplaceAll(u.String(), `"`, `\"`) + `"`), nil
}

// MarshalText writes the redacted URL.
func (u URL) MarshalText() ([]byte, error) { return []byte(u.String()), nil }

// RedactURL replaces the password of a URL (and a password= parameter in its
// query or in a libpq key=value string) with a placeholder. A string it cannot
// parse is redacted whole, since it may still hold a secret.
func RedactURL(raw string) string {
	if raw == "" {
		return ""
	}
	if !strings.Contains(raw, "://") {
		// libpq key=value form: host=... password=...
		fields := strings.Fields(raw)
		for i, f := range fields {
			if k, _, ok := strings.Cut(f, "="); ok && strings.EqualFold(k, "password") {
				fields[i] = k + "=" + redacted
			}
		}
		return strings.Join(fields, " ")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return redacted
	}
	if u.User != nil {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
	}
	q := u.Query()
	changed := false
	for k := range q {
		if strings.EqualFold(k, "password") {
			q.Set(k, "xxxxx")
			changed = true
		}
	}
	if changed {
		u.RawQuery = q.Encode()
	}
	return strings.ReplaceAll(u.String(), "xxxxx", redacted)
}
