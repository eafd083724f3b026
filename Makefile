# meshguard — see README.md. Every target works on a fresh checkout.
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
BIN       := bin/meshguard
STATICCHECK_VERSION := v0.8.2

.PHONY: run build test test-short bench lint fmt clean

# Serve on embedded defaults: in-process quota store, SQLite audit trail,
# gRPC on 127.0.0.1:8081 and HTTP on 127.0.0.1:8080. No servers to install.
run:
	MESHGUARD_ENV=$${MESHGUARD_ENV:-development} $(GO) run -ldflags '$(LDFLAGS)' ./cmd/meshguard serve $(if $(CONFIG),--config $(CONFIG))

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/meshguard

# Everything, race detector on, integration tests against real redis-server,
# Redis Cluster and postgres started by the test harness.
test:
	$(GO) test -race -count=1 -timeout 40m ./...

# Unit tests only (no throwaway servers), for a quick loop.
test-short:
	$(GO) test -short -count=1 ./...

# Benchmarks: throughput, p50/p99 latency, CPU µs and allocations per decision.
# BENCH selects benchmarks, COUNT repeats them (use benchstat on the output).
BENCH ?= .
COUNT ?= 1
bench:
	$(GO) test -run '^$$' -bench '$(BENCH)' -benchmem -count $(COUNT) -timeout 60m ./...

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (gofmt -l $$(git ls-files '*.go'); echo 'gofmt: files above need formatting'; exit 1)
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin meshguard-spool meshguard-audit.db*
