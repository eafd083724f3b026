package audittrail

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestStoreFilterByIDAndIP: the console's detail page reads one row by id
// and its list filters by client IP, on both stores.
func TestStoreFilterByIDAndIP(t *testing.T) {
	bothStores(t, DefaultConfig(), func(t *testing.T, s testStore) {
		start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
		recs := genRecords(20, start, "f")
		for i := range recs {
			if i%4 == 0 {
				recs[i].IPAddress = "2001:db8::7"
			}
		}
		mustWrite(t, s, newChain("c1", testKey), recs)
		got, _, err := s.List(t.Context(), Filter{IPAddress: "2001:db8::7"}, Cursor{}, 100)
		if err != nil || len(got) != 5 {
			t.Fatalf("IP filter: %d rows, %v; want 5", len(got), err)
		}
		want := got[2]
		one, _, err := s.List(t.Context(), Filter{ID: want.ID}, Cursor{}, 2)
		if err != nil || len(one) != 1 || one[0].ID != want.ID || one[0].Seq != want.Seq {
			t.Fatalf("ID filter: %+v, %v; want row id %d", one, err, want.ID)
		}
		if none, _, err := s.List(t.Context(), Filter{ID: want.ID + 1000}, Cursor{}, 2); err != nil || len(none) != 0 {
			t.Fatalf("unknown id: %d rows, %v", len(none), err)
		}
	})
}

// TestStoreHourlyCounts: counts per hour and severity (or action) come from
// one aggregate query and agree with the rows written.
func TestStoreHourlyCounts(t *testing.T) {
	bothStores(t, DefaultConfig(), func(t *testing.T, s testStore) {
		hc, ok := s.(interface {
			HourlyCounts(ctx context.Context, f Filter, by string) ([]HourCount, error)
		})
		if !ok {
			t.Fatalf("%T has no HourlyCounts", s)
		}
		start := time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC)
		// 3 rows in hour 10 (2 LOW, 1 HIGH), 2 in hour 12 (HIGH), 1 outside the window.
		recs := genRecords(6, start, "h")
		at := []time.Duration{5 * time.Minute, 30 * time.Minute, 59 * time.Minute, 2*time.Hour + time.Minute, 2*time.Hour + 50*time.Minute, 5 * time.Hour}
		sev := []string{SeverityLow, SeverityHigh, SeverityLow, SeverityHigh, SeverityHigh, SeverityLow}
		for i := range recs {
			recs[i].CreatedAt, recs[i].Severity = start.Add(at[i]), sev[i]
		}
		mustWrite(t, s, newChain("c1", testKey), recs)
		got, err := hc.HourlyCounts(t.Context(), Filter{From: start, To: start.Add(4 * time.Hour)}, "severity")
		if err != nil {
			t.Fatal(err)
		}
		want := []HourCount{
			{Hour: start, Group: SeverityHigh, Count: 1},
			{Hour: start, Group: SeverityLow, Count: 2},
			{Hour: start.Add(2 * time.Hour), Group: SeverityHigh, Count: 2},
		}
		if d := cmp.Diff(want, got); d != "" {
			t.Fatalf("HourlyCounts by severity (-want +got):\n%s", d)
		}
		byAction, err := hc.HourlyCounts(t.Context(), Filter{From: start, To: start.Add(4 * time.Hour), Actions: []string{"LOGIN_FAILURE"}}, "action")
		if err != nil {
			t.Fatal(err)
		}
		// genRecords: action i%4 == 0 is LOGIN_FAILURE (rows 0 and 4).
		want = []HourCount{{Hour: start, Group: "LOGIN_FAILURE", Count: 1}, {Hour: start.Add(2 * time.Hour), Group: "LOGIN_FAILURE", Count: 1}}
		if d := cmp.Diff(want, byAction); d != "" {
			t.Fatalf("HourlyCounts by action (-want +got):\n%s", d)
		}
		if _, err := hc.HourlyCounts(t.Context(), Filter{}, "user_id; DROP TABLE audit_logs"); err == nil {
			t.Fatal("HourlyCounts grouped by an arbitrary column")
		}
	})
}

// TestVerifyMaxRows: a range whose chains hold more rows than MaxRows is
// refused with a TooManyRowsError, not half-verified; within the bound the
// same range verifies.
func TestVerifyMaxRows(t *testing.T) {
	bothStores(t, Config{}, func(t *testing.T, s testStore) {
		start := time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC)
		mustWrite(t, s, newChain("a", testKey), genRecords(1500, start, "a"))
		mustWrite(t, s, newChain("b", testKey), genRecords(1500, start, "b"))
		_, err := Verify(t.Context(), s, VerifyOptions{Keys: testKeyring, MaxRows: 2000})
		var tm *TooManyRowsError
		if !errors.As(err, &tm) || tm.Max != 2000 || tm.Chains != 2 {
			t.Fatalf("Verify over 3000 rows with MaxRows 2000: %v, want TooManyRowsError{2000, 2 chains}", err)
		}
		rep, err := Verify(t.Context(), s, VerifyOptions{Keys: testKeyring, MaxRows: 3000})
		if err != nil || !rep.OK || rep.Rows != 3000 {
			t.Fatalf("Verify with MaxRows 3000: %+v, %v", rep, err)
		}
	})
}
