package extauthz

import (
	"context"
	"testing"
)

// BenchmarkCheckDecisionAnonymous measures one decision for an anonymous
// caller, whose keys come from the address Envoy derived: the address key
// (IPv6 by prefix) must cost no allocation beyond the one the client key
// always took.
func BenchmarkCheckDecisionAnonymous(b *testing.B) {
	for _, tc := range []struct{ name, addr string }{{"ipv4", "203.0.113.7"}, {"ipv6", "2001:db8:1:2::1"}} {
		b.Run(tc.name, func(b *testing.B) {
			srv, _ := newTestServer(b, testConfig(), nil)
			req := envoyReq{host: "api.example.net", path: "/api/v1/orders?page=2", headers: hdr(
				"origin", "https://dashboard.example.com", "x-meshguard-client-ip", tc.addr,
				"accept", "application/json", "sec-fetch-site", "same-site")}.build(b, formHeaders)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := srv.Check(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkCheckLogin measures a login decision: the body's account read,
// normalised and hashed.
func BenchmarkCheckLogin(b *testing.B) {
	cfg := testConfig()
	cfg.Identity.AccountKey = "0123456789abcdef0123456789abcdef"
	srv, _ := newTestServer(b, cfg, nil)
	req := login("application/json", `{"email":"Alice@Example.com","password":"correct horse battery staple","remember":true}`).build(b, formHeaders)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		resp, err := srv.Check(ctx, req)
		if err != nil || resp.GetStatus().GetCode() != 0 {
			b.Fatal(err, resp)
		}
	}
}
