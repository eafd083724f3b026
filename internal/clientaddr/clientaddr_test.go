package clientaddr

import (
	"net/netip"
	"strings"
	"testing"
)

func TestAppendKey(t *testing.T) {
	for _, tc := range []struct {
		in     string
		prefix int
		want   string
	}{
		{"203.0.113.9", 64, "ip:203.0.113.9"},
		{"::ffff:203.0.113.9", 64, "ip:203.0.113.9"},
		{"2001:db8:1:2::1", 64, "ip:2001:db8:1:2::/64"},
		{"2001:DB8:1:2:ffff:ffff:ffff:ffff", 64, "ip:2001:db8:1:2::/64"},
		{"2001:db8:1:3::1", 64, "ip:2001:db8:1:3::/64"},
		{"2001:db8:1:2::1", 48, "ip:2001:db8:1::/48"},
		{"2001:db8:1:2::1", 128, "ip:2001:db8:1:2::1"},
		{"fe80::1%eth0", 128, "ip:fe80::1"},
		{"", 64, "ip:unknown"},
		{"not-an-address", 64, "ip:unknown"},
		{"203.0.113.9:443", 64, "ip:unknown"},
		{strings.Repeat("1", MaxText+1), 64, "ip:unknown"},
	} {
		a, _ := Parse(tc.in)
		if got := string(AppendKey(nil, a, tc.prefix)); got != tc.want {
			t.Errorf("AppendKey(%q, /%d) = %q, want %q", tc.in, tc.prefix, got, tc.want)
		}
	}
}

func TestParseHostPort(t *testing.T) {
	for in, want := range map[string]string{
		"203.0.113.9:1234":        "203.0.113.9",
		"[::ffff:203.0.113.9]:80": "203.0.113.9",
		"[fe80::1%eth0]:80":       "fe80::1",
		"[2001:db8::1]:443":       "2001:db8::1",
		"2001:db8::1":             "2001:db8::1", // no port: the address alone
		"@":                       "invalid IP",
		"":                        "invalid IP",
		"host.example:80":         "invalid IP",
		strings.Repeat("9", 200):  "invalid IP",
	} {
		a, ok := ParseHostPort(in)
		if got := a.String(); got != want || ok != a.IsValid() {
			t.Errorf("ParseHostPort(%q) = %s, %v; want %s", in, got, ok, want)
		}
	}
}

// TestPrefixSameClient: addresses of one /64 are one client, in either
// spelling; the next /64 and other families are not.
func TestPrefixSameClient(t *testing.T) {
	p := func(s string) string {
		a, _ := Parse(s)
		return Prefix(a, 64).String()
	}
	if p("2001:db8:1:2::1") != p("2001:db8:1:2:abcd::9") {
		t.Error("two addresses of one /64 are two clients")
	}
	if p("2001:db8:1:2::1") == p("2001:db8:1:3::1") {
		t.Error("two /64s are one client")
	}
	if p("::ffff:198.51.100.1") != p("198.51.100.1") || p("198.51.100.1") == p("198.51.100.2") {
		t.Error("IPv4 keying: mapped and plain differ, or two addresses are one")
	}
	if got := Prefix(netip.Addr{}, 64); got.IsValid() {
		t.Errorf("no address: %v, want the zero prefix", got)
	}
}

// FuzzAddrKey: any string Envoy could put in the address header yields a
// bounded key that starts with ip: and never panics.
func FuzzAddrKey(f *testing.F) {
	for _, s := range []string{"2001:db8:1:2::1", "::ffff:203.0.113.9", "fe80::1%eth0", "", "1.2.3.4", "::", "%"} {
		f.Add(s, 64)
	}
	f.Fuzz(func(t *testing.T, s string, prefix int) {
		if prefix < MinIPv6Prefix || prefix > 128 {
			prefix = 64
		}
		a, _ := Parse(s)
		k := string(AppendKey(nil, a, prefix))
		if !strings.HasPrefix(k, "ip:") || len(k) > len("ip:")+MaxText {
			t.Fatalf("key %q for %q", k, s)
		}
		if a.IsValid() && (a.Zone() != "" || a.Is4In6()) {
			t.Fatalf("Parse(%q) = %v: zone or mapping kept", s, a)
		}
		if b, ok := ParseHostPort(s); ok && (b.Zone() != "" || b.Is4In6()) {
			t.Fatalf("ParseHostPort(%q) = %v: zone or mapping kept", s, b)
		}
	})
}
