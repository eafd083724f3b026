package audittrail

import (
	"crypto/hmac"
	"crypto/sha256"
	"testing"

	"golang.org/x/mod/sumdb/note"
)

// testSigningKey is the tests' signing key, made once per test binary
// (and handed to helper processes); testKeyring holds it.
var testSigningKey, _, _ = GenerateKey("meshguard-test")

var testKeyring, testKey = func() (*Keyring, *Key) {
	kr, err := LoadKeyring(KeySource{Key: testSigningKey}, false)
	if err != nil {
		panic(err)
	}
	return kr, kr.Current
}()

// newTestKey makes another key (an attacker's, a rotated one).
func newTestKey(t testing.TB, name string) *Key {
	t.Helper()
	skey, _, err := GenerateKey(name)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ParseKey(skey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// macOf is the hash column a row gets under k.
func macOf(k *Key, r *Record) []byte {
	leaf, _ := rowLeaf(r, nil)
	return rowMAC(hmac.New(sha256.New, k.mac), leaf)
}

func TestParseKey(t *testing.T) {
	skey, vkey, err := GenerateKey("meshguard-unit")
	if err != nil {
		t.Fatal(err)
	}
	k, err := ParseKey(skey + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if k.VerifierKey() != vkey {
		t.Fatalf("VerifierKey = %q, want %q", k.VerifierKey(), vkey)
	}
	v, _ := note.NewVerifier(vkey)
	if k.ID() != keyID(v.Name(), v.KeyHash()) {
		t.Fatalf("ID = %q", k.ID())
	}
	for _, bad := range []string{"", vkey, "PRIVATE+KEY+x+00000000+AAAA", skey[:len(skey)-4] + "AAAA"} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}
