package pgtest

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func query(t *testing.T, url string) (int, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	var n int
	err = conn.QueryRow(ctx, "SELECT 40 + 2").Scan(&n)
	return n, err
}

func TestLifecycle(t *testing.T) {
	s := Start(t)
	if n, err := query(t, s.URL()); err != nil || n != 42 {
		t.Fatalf("query = %d, %v", n, err)
	}
	db := s.NewDatabase(t)
	if n, err := query(t, db); err != nil || n != 42 {
		t.Fatalf("query on new database = %d, %v", n, err)
	}
	s.Kill()
	if _, err := query(t, s.URL()); err == nil {
		t.Fatal("a killed server answered")
	}
	s.Restart(t)
	if n, err := query(t, db); err != nil || n != 42 {
		t.Fatalf("query after restart = %d, %v", n, err)
	}
	s.Stop()
	if _, err := query(t, s.URL()); err == nil {
		t.Fatal("a stopped server answered")
	}
}

func TestTwoServersAtOnce(t *testing.T) {
	a, b := Start(t), Start(t)
	if a.Port() == b.Port() {
		t.Fatal("two servers share a port")
	}
	for _, s := range []*Server{a, b} {
		if _, err := query(t, s.URL()); err != nil {
			t.Fatal(err)
		}
	}
}
