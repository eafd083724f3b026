// Package clientaddr turns the client address Envoy derived (or a
// connection's peer) into the unit meshguard limits by: one IPv4 address,
// or one IPv6 prefix, since one subscriber usually holds a whole /64 and
// per-address keys would give one client 2^64 quotas. ext_authz's rate
// limit keys, the CSP report limiter and the console's sign-in limiter all
// use it, so a client is the same client to each.
package clientaddr

import (
	"net/netip"
)

// ShippedHeader is the request header envoy/envoy.yaml's header_mutation
// overwrites, on every route, with the address Envoy derived for the client
// (%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%, after its original IP
// detection).
const ShippedHeader = "x-meshguard-client-ip"

// MaxText bounds an address as Envoy writes it: 45 bytes of IPv6 text plus
// a zone.
const MaxText = 64

// MinIPv6Prefix is the shortest IPv6 prefix a client may be keyed by; a
// shorter one would put whole providers in one key.
const MinIPv6Prefix = 32

// Parse parses an address as Envoy writes it, without a port. A zone is
// dropped (it names the receiving host's interface, not the client) and an
// IPv4-mapped IPv6 address is unmapped, so one client is one client
// whichever way a dual-stack listener or a load balancer spelled it.
func Parse(s string) (netip.Addr, bool) {
	if len(s) == 0 || len(s) > MaxText {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.WithZone("").Unmap(), true
}

// ParseHostPort parses a connection's peer as net/http gives it
// (Request.RemoteAddr, "host:port"), with Parse's normalisation.
func ParseHostPort(s string) (netip.Addr, bool) {
	if len(s) == 0 || len(s) > MaxText+len("[]:65535") {
		return netip.Addr{}, false
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return Parse(s)
	}
	return ap.Addr().WithZone("").Unmap(), true
}

// Prefix is the client a (from Parse) belongs to: the address itself for
// IPv4 (a /32) and IPv6 at ipv6Prefix 128, else its IPv6 prefix. The zero
// Prefix stands for no address. ipv6Prefix must be MinIPv6Prefix..128.
func Prefix(a netip.Addr, ipv6Prefix int) netip.Prefix {
	switch {
	case !a.IsValid():
		return netip.Prefix{}
	case a.Is6():
		p, err := a.Prefix(ipv6Prefix)
		if err != nil {
			return netip.Prefix{}
		}
		return p
	default:
		return netip.PrefixFrom(a, 32)
	}
}

// AppendKey appends the rate limit key of a to b: ip:<IPv4 address>,
// ip:<IPv6 prefix>/<bits> (the address itself at 128), or ip:unknown for no
// address. It never exceeds len("ip:")+MaxText bytes.
func AppendKey(b []byte, a netip.Addr, ipv6Prefix int) []byte {
	b = append(b, "ip:"...)
	switch p := Prefix(a, ipv6Prefix); {
	case !p.IsValid():
		return append(b, "unknown"...)
	case a.Is6() && ipv6Prefix < 128:
		return p.AppendTo(b)
	default:
		return a.AppendTo(b)
	}
}
