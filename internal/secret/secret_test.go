package secret

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestRedactURL(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"postgres://app:hunter2@db:5432/x?sslmode=require", "postgres://app:[REDACTED]@db:5432/x?sslmode=require"},
		{"postgres://app@db/x", "postgres://app@db/x"},
		{"redis://:pw@127.0.0.1:6379/0", "redis://:[REDACTED]@127.0.0.1:6379/0"},
		{"postgres://db/x?password=hunter2&sslmode=disable", "postgres://db/x?password=[REDACTED]&sslmode=disable"},
		{"host=db user=app password=hunter2 dbname=x", "host=db user=app password=[REDACTED] dbname=x"},
		{"postgres://a:b@[::1:bad", "[REDACTED]"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			if got := RedactURL(tc.in); got != tc.want {
				t.Errorf("RedactURL(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestSecretsNeverPrint(t *testing.T) {
	tok := String("s3cr3t-token")
	u := URL("postgres://app:s3cr3t-pw@db/x")
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("x", "token", tok, "url", u)
	j, _ := json.Marshal(map[string]any{"token": tok, "url": u})
	out := buf.String() + string(j) + fmt.Sprintf("%v %s %#v %+v", tok, u, tok, u)
	for _, s := range []string{"s3cr3t-token", "s3cr3t-pw"} {
		if strings.Contains(out, s) {
			t.Fatalf("secret %q leaked: %s", s, out)
		}
	}
	if tok.Reveal() != "s3cr3t-token" || u.Reveal() != "postgres://app:s3cr3t-pw@db/x" {
		t.Fatal("Reveal must return the value")
	}
}
