# meshguard — see README.md. Every target works on a fresh checkout.
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
BIN       := bin/meshguard
STATICCHECK_VERSION := v0.8.2

# Nested modules, test-only, that pin other library versions: compat checks
# the Envoy configs against the oldest supported Envoy API; platformtest
# renders the Helm chart and decodes the Istio and Envoy Gateway manifests
# with those projects' Go types. `go test ./...` does not enter them.
NESTED    := envoy/compat k8s/platformtest
IMAGE     ?= ghcr.io/meshguard/meshguard

.PHONY: run build test test-short bench lint fmt clean image

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
	@for m in $(NESTED); do echo "== $$m"; (cd $$m && $(GO) test -count=1 -timeout 20m ./...) || exit 1; done

# Unit tests only (no throwaway servers), for a quick loop.
test-short:
	$(GO) test -short -count=1 ./...
	@for m in $(NESTED); do (cd $$m && $(GO) test -short -count=1 ./...) || exit 1; done

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
	@for m in $(NESTED); do (cd $$m && $(GO) vet ./... && $(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...) || exit 1; done

fmt:
	gofmt -w $$(git ls-files '*.go')

# The container image (Dockerfile: distroless/static, non-root, bases pinned
# by digest). Needs a Docker engine with buildx; PUSH=1 pushes and prints
# the digest to pin in k8s/overlays/production.
image:
	@mkdir -p bin
	docker buildx build --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) --metadata-file bin/image.json $(if $(PUSH),--push,--load) .
	@echo "$(IMAGE):$(VERSION)@$$(sed -n 's/.*"containerimage.digest": *"\([^"]*\)".*/\1/p' bin/image.json)"

clean:
	rm -rf bin meshguard-spool meshguard-audit.db*
