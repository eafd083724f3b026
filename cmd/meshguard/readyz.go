package main

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"sync"
	"time"
)

// readinessCheck is one dependency that /readyz reports.
type readinessCheck struct {
	name string
	// required: when unhealthy, /readyz answers 503. Optional dependencies are
	// reported but do not take the replica out of rotation.
	required bool
	check    func(ctx context.Context) dependencyStatus
}

// dependencyStatus is one dependency's entry in the /readyz document.
type dependencyStatus struct {
	Healthy   bool    `json:"healthy"`
	Required  bool    `json:"required"`
	LatencyMS float64 `json:"latency_ms"`
	Error     string  `json:"error,omitempty"`
	Details   any     `json:"details,omitempty"`
}

type readyDoc struct {
	Status       string                      `json:"status"`
	Dependencies map[string]dependencyStatus `json:"dependencies"`
}

// newReadyHandler answers /readyz: every check runs concurrently within a
// deadline; 200 when every required dependency is healthy, else 503.
func newReadyHandler(checks []readinessCheck) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		doc := readyDoc{Status: "ready", Dependencies: make(map[string]dependencyStatus, len(checks))}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, c := range checks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				start := time.Now()
				st := c.check(ctx)
				if st.LatencyMS == 0 {
					st.LatencyMS = float64(time.Since(start).Microseconds()) / 1000
				}
				st.Required = c.required
				st.Error = redactError(st.Error)
				mu.Lock()
				doc.Dependencies[c.name] = st
				if c.required && !st.Healthy {
					doc.Status = "not_ready"
				}
				mu.Unlock()
			}()
		}
		wg.Wait()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		if doc.Status != "ready" {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(w).Encode(doc)
	})
}

var (
	urlPassword = regexp.MustCompile(`([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*@`)
	kvPassword  = regexp.MustCompile(`(?i)(password\s*=\s*)('[^']*'|[^\s&]*)`)
)

// maxErrorLen bounds a dependency's error text in /readyz.
const maxErrorLen = 512

// redactError is the last guard before an error reaches /readyz: checks
// already redact their own errors, but a driver message that quotes a
// connection URL or a password=... setting loses the password here, and the
// text is bounded.
func redactError(s string) string {
	if s == "" {
		return s
	}
	s = urlPassword.ReplaceAllString(s, "${1}[REDACTED]@")
	s = kvPassword.ReplaceAllString(s, "${1}[REDACTED]")
	if len(s) > maxErrorLen {
		s = s[:maxErrorLen] + "..."
	}
	return s
}
