package ratelimitsvc

import (
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Run watches ratelimit.config_dir until ctx is done. A change is applied once
// the directory has stayed the same for one reload_interval (an editor's or
// a ConfigMap's several writes count once). A configuration that does not
// load is logged, counted and reported by ConfigError, and the one in force
// stays. Without a config_dir Run just waits.
func (s *Server) Run(ctx context.Context) error {
	if s.cfg.ConfigDir == "" {
		<-ctx.Done()
		return nil
	}
	applied := s.loadedFP
	pending := applied
	t := time.NewTicker(s.cfg.ReloadInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		fp := dirFingerprint(s.cfg.ConfigDir)
		switch {
		case fp == applied:
			pending = applied
		case fp != pending:
			pending = fp // changed since the last look: wait until it settles
		default:
			s.reload()
			applied = fp
		}
		s.looks.Add(1)
	}
}

// reload compiles the whole configuration again and puts it in force, or
// keeps the old one and records why.
func (s *Server) reload() {
	l, err := s.cfg.compile()
	s.reloadMu.Lock()
	s.reloadErr = err
	s.reloadMu.Unlock()
	if err != nil {
		s.m.reloads.WithLabelValues("error").Inc()
		s.m.configOK.Set(0)
		s.log.Error("rate limit configuration not reloaded; the previous one stays in force",
			"config_dir", s.cfg.ConfigDir, "err", err)
		return
	}
	s.install(l)
	s.m.reloads.WithLabelValues("success").Inc()
	s.m.configOK.Set(1)
	s.log.Info("rate limit configuration reloaded", "config_dir", s.cfg.ConfigDir, "domains", len(l.domains))
}

// ConfigError is the error of the last reload of config_dir, or nil when the
// configuration in force is the latest on disk.
func (s *Server) ConfigError() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	return s.reloadErr
}

// dirFingerprint hashes the names and contents of the config files in dir
// (and any error listing or reading them), so any change is seen, including
// a ConfigMap's symlink swap that leaves modification times alone.
func dirFingerprint(dir string) [32]byte {
	h := sha256.New()
	entries, err := os.ReadDir(dir)
	if err != nil {
		h.Write([]byte("error: " + err.Error()))
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		n := e.Name()
		if !strings.HasPrefix(n, ".") && (strings.HasSuffix(n, ".yaml") || strings.HasSuffix(n, ".yml")) {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		h.Write([]byte(n))
		h.Write([]byte{0})
		data, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			h.Write([]byte("error: " + err.Error()))
		} else if len(data) <= maxConfigFileSize {
			h.Write(data)
		}
		h.Write([]byte{0})
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}
