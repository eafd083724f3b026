package extauthz

import (
	"net/netip"
	"strconv"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshguard/meshguard/internal/clientaddr"
)

// jwtMissing is jwt_verify's Status::JwtMissed, the code jwt_authn records
// under failed_status_in_metadata when a request carries no token at all
// (its authenticator reports every outcome there, a missing token too).
// Any other code is a token that was present and failed.
const jwtMissing = 1

// identify sets user and role (from jwt_authn metadata, else the operator's
// trusted headers), whether a presented token failed, and the two keys the
// rate limit service counts by: the client key (user:<id>, else the address
// key) and the address key ip:<address or IPv6 prefix>, which never comes
// from a client-supplied header.
func (s *Server) identify(attrs *authv3.AttributeContext, r *request, e *eval) {
	e.idSource = identityNone
	if s.p.jwtNS != "" {
		fields := attrs.GetMetadataContext().GetFilterMetadata()[s.p.jwtNS].GetFields()
		if s.p.jwtFailureKey != "" && tokenFailed(fields[s.p.jwtFailureKey]) {
			// A request with a good and a bad token has both; it is treated
			// as one with a bad token, as jwt_authn itself would.
			e.tokenInvalid = true
		} else if payload := fields[s.p.jwtKey].GetStructValue(); payload != nil {
			claims := payload.GetFields()
			user := claimString(claims[s.p.userClaim])
			if user != "" {
				if validIdentity(user, maxUserLen) {
					e.user, e.idSource = user, identityJWT
				} else {
					s.m.invalidID.Inc()
				}
			}
			if e.user != "" && s.p.roleClaim != "" {
				s.roleFromClaim(claims[s.p.roleClaim], e)
			}
		}
	}
	if e.user == "" && !e.tokenInvalid && r.nUser == 1 && r.userHdr != "" {
		if validIdentity(r.userHdr, maxUserLen) {
			e.user, e.idSource = r.userHdr, identityHeader
			if r.nRole == 1 && r.roleHdr != "" {
				if validIdentity(r.roleHdr, maxRoleLen*maxRoles) {
					e.role = r.roleHdr
				} else {
					s.m.invalidID.Inc()
				}
			}
		} else {
			s.m.invalidID.Inc()
		}
	}

	// The address Envoy derived for the client (when its header_mutation
	// sets the header), else the connection peer.
	addr, ok := netip.Addr{}, false
	if r.nClientIP == 1 {
		addr, ok = clientaddr.Parse(r.clientIP)
	}
	if !ok {
		addr, _ = clientaddr.Parse(attrs.GetSource().GetAddress().GetSocketAddress().GetAddress())
	}
	// Both keys in one allocation, as the client key alone used to be.
	var buf [len("user:") + maxUserLen + len("ip:") + clientaddr.MaxText]byte
	b := buf[:0]
	if e.user != "" {
		b = append(b, "user:"...)
		b = append(b, e.user...)
	}
	n := len(b)
	b = clientaddr.AppendKey(b, addr, s.p.ipv6Prefix)
	keys := string(b)
	e.ip = keys[n:]
	if e.user != "" {
		e.client = keys[:n]
	} else {
		e.client = e.ip
	}
}

// tokenFailed reports whether v, jwt_authn's failed_status_in_metadata
// entry, says a presented token failed verification. A malformed entry
// counts as a failure: only Envoy writes there.
func tokenFailed(v *structpb.Value) bool {
	f := v.GetStructValue()
	if f == nil {
		return false
	}
	code, ok := f.GetFields()["code"].GetKind().(*structpb.Value_NumberValue)
	return !ok || (code.NumberValue != jwtMissing && code.NumberValue != 0)
}

// roleFromClaim takes a string role or a list of string roles.
func (s *Server) roleFromClaim(v *structpb.Value, e *eval) {
	switch k := v.GetKind().(type) {
	case *structpb.Value_StringValue:
		if validIdentity(k.StringValue, maxRoleLen) && strings.IndexByte(k.StringValue, ',') < 0 {
			e.role = k.StringValue
		} else {
			s.m.invalidID.Inc()
		}
	case *structpb.Value_ListValue:
		vals := k.ListValue.GetValues()
		if len(vals) > maxRoles {
			vals = vals[:maxRoles]
			s.m.invalidID.Inc()
		}
		var b strings.Builder
		n := 0
		for _, rv := range vals {
			str := rv.GetStringValue()
			if !validIdentity(str, maxRoleLen) || strings.IndexByte(str, ',') >= 0 {
				s.m.invalidID.Inc()
				continue
			}
			if n == 0 {
				e.role = str
			} else {
				if n == 1 {
					b.WriteString(e.role)
				}
				b.WriteByte(',')
				b.WriteString(str)
			}
			n++
		}
		if n > 1 {
			e.role = b.String()
		}
	}
}

// claimString reads a string claim, or an integral number claim.
func claimString(v *structpb.Value) string {
	switch k := v.GetKind().(type) {
	case *structpb.Value_StringValue:
		return k.StringValue
	case *structpb.Value_NumberValue:
		if f := k.NumberValue; f == float64(int64(f)) && f >= 0 {
			return strconv.FormatInt(int64(f), 10)
		}
	}
	return ""
}

// validIdentity accepts 1..max visible ASCII bytes: the value goes into a
// header, a rate limit descriptor and the audit trail.
func validIdentity(s string, max int) bool {
	return len(s) > 0 && len(s) <= max && visibleASCII(s)
}

// hasRole reports whether the caller's roles (comma-separated in role)
// include any of the comma-separated required roles.
func hasRole(required, role string) bool {
	n := 0
	for required != "" && n < maxRequireRoles {
		var want string
		if i := strings.IndexByte(required, ','); i >= 0 {
			want, required = required[:i], required[i+1:]
		} else {
			want, required = required, ""
		}
		want = strings.TrimSpace(want)
		if want == "" {
			continue
		}
		n++
		for rs := role; rs != ""; {
			var got string
			if i := strings.IndexByte(rs, ','); i >= 0 {
				got, rs = rs[:i], rs[i+1:]
			} else {
				got, rs = rs, ""
			}
			if got == want {
				return true
			}
		}
	}
	return false
}
