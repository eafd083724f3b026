package gctune

import (
	"io/fs"
	"runtime/debug"
	"testing"
)

func TestApply(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	files := func(m map[string]string) func(string) ([]byte, error) {
		return func(name string) ([]byte, error) {
			if v, ok := m[name]; ok {
				return []byte(v), nil
			}
			return nil, fs.ErrNotExist
		}
	}
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	for _, tc := range []struct {
		name      string
		env       map[string]string
		files     map[string]string
		wantGC    int
		wantLimit int64
	}{
		{"no cgroup limit", nil, map[string]string{"/sys/fs/cgroup/memory.max": "max\n"}, DefaultGCPercent, 0},
		{"cgroup v2 limit", nil, map[string]string{"/sys/fs/cgroup/memory.max": "536870912\n"}, DefaultGCPercent, 536870912 / 10 * 9},
		{"cgroup v1 limit", nil, map[string]string{"/sys/fs/cgroup/memory/memory.limit_in_bytes": "1073741824\n"}, DefaultGCPercent, 1073741824 / 10 * 9},
		{"cgroup v1 unlimited", nil, map[string]string{"/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"}, DefaultGCPercent, 0},
		{"unreadable", nil, map[string]string{"/sys/fs/cgroup/memory.max": "garbage"}, DefaultGCPercent, 0},
		{"no cgroup files", nil, nil, DefaultGCPercent, 0},
		{"operator's GOGC", map[string]string{"GOGC": "150"}, map[string]string{"/sys/fs/cgroup/memory.max": "536870912"}, 0, 536870912 / 10 * 9},
		{"operator's GOMEMLIMIT", map[string]string{"GOMEMLIMIT": "300MiB"}, map[string]string{"/sys/fs/cgroup/memory.max": "536870912"}, DefaultGCPercent, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			debug.SetGCPercent(100)
			debug.SetMemoryLimit(1 << 62)
			got := apply(env(tc.env), files(tc.files))
			if got.GCPercent != tc.wantGC || got.MemoryLimit != tc.wantLimit {
				t.Fatalf("Settings %+v, want GC %d limit %d", got, tc.wantGC, tc.wantLimit)
			}
			wantGC := tc.wantGC
			if wantGC == 0 {
				wantGC = 100 // left alone
			}
			if gc := debug.SetGCPercent(100); gc != wantGC {
				t.Errorf("runtime GOGC %d, want %d", gc, wantGC)
			}
			wantLimit := tc.wantLimit
			if wantLimit == 0 {
				wantLimit = 1 << 62 // left alone
			}
			if l := debug.SetMemoryLimit(-1); l != wantLimit {
				t.Errorf("runtime memory limit %d, want %d", l, wantLimit)
			}
		})
	}
}
