package k8s

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// dockerInstruction is one instruction of a Dockerfile, continuation lines
// joined.
type dockerInstruction struct {
	line int
	cmd  string // upper case
	args string
}

// parseDockerfile splits a Dockerfile into instructions (comments and blank
// lines dropped, backslash continuations joined).
func parseDockerfile(data string) []dockerInstruction {
	var out []dockerInstruction
	var cur strings.Builder
	start := 0
	for i, raw := range strings.Split(data, "\n") {
		l := strings.TrimSpace(raw)
		if cur.Len() == 0 && (l == "" || strings.HasPrefix(l, "#")) {
			continue
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		cont := strings.HasSuffix(l, "\\")
		cur.WriteString(strings.TrimSuffix(l, "\\") + " ")
		if cont {
			continue
		}
		f := strings.Fields(cur.String())
		out = append(out, dockerInstruction{start, strings.ToUpper(f[0]), strings.Join(f[1:], " ")})
		cur.Reset()
	}
	return out
}

// TestDockerfile: there is no Docker engine to build the image here, so its
// rules are checked on the file: every base pinned by digest, a static
// binary (no cgo) on distroless/static, run as the numeric non-root user
// the Deployments set, exec-form entrypoint, nothing fetched by URL.
func TestDockerfile(t *testing.T) {
	data, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	ins := parseDockerfile(string(data))
	pinned := regexp.MustCompile(`^(--platform=\S+ )?[a-z0-9./-]+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}( AS \w+)?$`)
	var froms []dockerInstruction
	var user, entrypoint string
	var goBuild string
	for _, in := range ins {
		switch in.cmd {
		case "FROM":
			froms = append(froms, in)
			user = "" // USER is per stage
			if !pinned.MatchString(in.args) {
				t.Errorf("Dockerfile:%d: FROM %s is not pinned by digest (image:tag@sha256:...)", in.line, in.args)
			}
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		case "ADD":
			if strings.Contains(in.args, "://") {
				t.Errorf("Dockerfile:%d: ADD from a URL", in.line)
			}
		case "RUN":
			if strings.Contains(in.args, "go build") {
				goBuild = in.args
			}
		}
	}
	if len(froms) < 2 {
		t.Fatalf("want a build stage and a runtime stage, got %d FROM", len(froms))
	}
	if final := froms[len(froms)-1].args; !strings.HasPrefix(final, "gcr.io/distroless/static") || !strings.Contains(final, ":nonroot@") {
		t.Errorf("runtime stage %q: want gcr.io/distroless/static...:nonroot", final)
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "./cmd/meshguard"} {
		if !strings.Contains(goBuild, want) {
			t.Errorf("go build %q lacks %s (a static, reproducible binary)", goBuild, want)
		}
	}
	if !strings.HasPrefix(entrypoint, "[") {
		t.Errorf("ENTRYPOINT %s: want exec form (signals reach meshguard, no shell in the image)", entrypoint)
	}
	// The user is numeric and the one the Deployments and the Job run as.
	uid, _, _ := strings.Cut(user, ":")
	n, err := strconv.Atoi(uid)
	if err != nil || n == 0 {
		t.Fatalf("final USER %q: want a numeric non-root uid", user)
	}
	o := build(t, "base")
	for name, d := range o.deployments {
		if name != "meshguard" {
			continue
		}
		if u := d.Spec.Template.Spec.SecurityContext.RunAsUser; u == nil || *u != int64(n) {
			t.Errorf("Deployment %s runs as %v, the image's user is %d", name, u, n)
		}
	}
	for name, j := range o.jobs {
		if u := j.Spec.Template.Spec.SecurityContext.RunAsUser; u == nil || *u != int64(n) {
			t.Errorf("Job %s runs as %v, the image's user is %d", name, u, n)
		}
	}
}

func TestParseDockerfile(t *testing.T) {
	got := parseDockerfile("# c\nFROM a:1@sha256:x AS b\n\nRUN x \\\n  && y\nUSER 1:1\n")
	if len(got) != 3 || got[1].cmd != "RUN" || got[1].args != "x && y" || got[1].line != 4 || got[2].args != "1:1" {
		t.Errorf("parseDockerfile = %+v", got)
	}
}
