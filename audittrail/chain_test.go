package audittrail

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestCanonicalJSON(t *testing.T) {
	cases := []struct{ in, want string }{
		{`{"b": 1, "a": [1, 2.50, -0.0, 1e2, 1E-7]}`, `{"a":[1,2.5,0,100,1e-07],"b":1}`},
		{` {"k":"v"} `, `{"k":"v"}`},
		{`{"a":1,"a":2}`, `{"a":2}`},
		{`{"é":"\u00e9\/\"\\\n"}`, `{"é":"é/\"\\\n"}`},
		{`"\u0000x"`, `"` + "\uFFFD" + `x"`},
		{`"\ud83d\ude00"`, `"😀"`},
		{`{"z":{"y":true,"x":null},"a":false}`, `{"a":false,"z":{"x":null,"y":true}}`},
		{`123456789012345678901234567890`, `1.2345678901234568e+29`},
		{`1e400`, `"1e400"`},
		{`[]`, `[]`},
		{`{}`, `{}`},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := canonicalJSON([]byte(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("canonicalJSON(%s) = %s, want %s", tc.in, got, tc.want)
			}
		})
	}
	for _, bad := range []string{``, `{`, `{"a"}`, `[1,]`, `01`, `1.`, `"\x"`, `{"a":1}x`, `tru`, "\"a\x01\""} {
		if _, err := canonicalJSON([]byte(bad)); err == nil {
			t.Errorf("canonicalJSON(%q) succeeded, want an error", bad)
		}
	}
	// The outermost value is depth 0: maxJSONDepth+1 levels pass, one more does not.
	deep := strings.Repeat("[", maxJSONDepth+2) + strings.Repeat("]", maxJSONDepth+2)
	if _, err := canonicalJSON([]byte(deep[1 : len(deep)-1])); err != nil {
		t.Errorf("canonicalJSON of %d nested arrays: %v", maxJSONDepth+1, err)
	}
	if _, err := canonicalJSON([]byte(deep)); !errors.Is(err, errTooDeep) {
		t.Errorf("canonicalJSON of %d nested arrays = %v, want errTooDeep", maxJSONDepth+2, err)
	}
}

// FuzzCanonicalJSON: the canonical form of any valid JSON is valid JSON,
// means the same (as encoding/json reads it, numbers as float64), and is a
// fixed point.
func FuzzCanonicalJSON(f *testing.F) {
	for _, s := range []string{`{"b":1,"a":[1,2.5,"x"]}`, `"\u00e9"`, `{"a":{"a":{}}}`, `-0.5e3`, `[null,true]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if !json.Valid(in) || !bytes.Equal(bytes.ToValidUTF8(in, nil), in) || bytes.Contains(in, []byte(`\u0000`)) || bytes.Contains(in, []byte(`\ud`)) || bytes.Contains(in, []byte(`\uD`)) {
			return
		}
		c, err := canonicalJSON(in)
		if errors.Is(err, errTooDeep) {
			t.Skip() // refused on purpose: normalize stores it wrapped as a string
		}
		if err != nil {
			t.Fatalf("canonicalJSON refused valid JSON %s: %v", in, err)
		}
		if !json.Valid(c) {
			t.Fatalf("canonical form of %s is not JSON: %s", in, c)
		}
		var a, b any
		if json.Unmarshal(in, &a) != nil {
			return // out of float64 range: stored as a string
		}
		if err := json.Unmarshal(c, &b); err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(a, b); d != "" {
			t.Fatalf("canonical form changes the value of %s (-in +canonical):\n%s", in, d)
		}
		again, err := canonicalJSON(c)
		if err != nil || !bytes.Equal(again, c) {
			t.Fatalf("canonical form is not a fixed point: %s -> %s", c, again)
		}
	})
}

// TestJSONBRoundTrip: what PostgreSQL's jsonb returns canonicalises to the
// same bytes as what was written, so hashes verify after a round trip.
func TestJSONBRoundTrip(t *testing.T) {
	docs := []string{
		`{"z": 1, "a": {"y": [3, 2.50, 1e2, -0], "x": "é\u00e9\/"}, "long key first": null}`,
		`{"a":1,"a":2}`,
		`{"n": 12345678901234567890, "f": 0.1, "g": 1.0e-10, "t": true}`,
		`{"emoji": "\ud83d\ude00", "tab": "a\tb", "ctl": "\u0001"}`,
		`[1, "two", {"three": 3}]`,
	}
	bothStores(t, Config{}, func(t *testing.T, s testStore) {
		recs := genRecords(len(docs), time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC), "j")
		for i, d := range docs {
			recs[i].Metadata = json.RawMessage(d)
			recs[i].NewValues = json.RawMessage(d)
		}
		mustWrite(t, s, newChain("j", testKey), recs)
		i := 0
		err := s.Scan(t.Context(), Filter{}, func(r *Record) error {
			if !bytes.Equal(r.Metadata, recs[i].Metadata) {
				t.Errorf("doc %d: stored %s, read back %s", i, recs[i].Metadata, r.Metadata)
			}
			i++
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		checkVerifies(t, s)
	})
}

func TestNormalize(t *testing.T) {
	r := Record{
		CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.FixedZone("x", 3600)),
		Action:    "A\x00B", UserAgent: "bad\xffutf8", Metadata: json.RawMessage(`not json`),
		EntityID: strings.Repeat("é", 300),
	}
	normalize(&r)
	want := Record{
		CreatedAt: time.Date(2026, 1, 2, 2, 4, 5, 123456000, time.UTC),
		Action:    "A\uFFFDB", UserAgent: "bad\uFFFDutf8", Metadata: json.RawMessage(`{"_invalid_json":"not json"}`),
		EntityID: strings.Repeat("é", 256),
	}
	if d := cmp.Diff(want, r); d != "" {
		t.Fatalf("normalize (-want +got):\n%s", d)
	}
}
