# meshguard's container image: a static binary on distroless/static, run as
# the image's non-root user (65532, as the Kubernetes manifests expect).
# Every base is pinned by digest (a tag can be moved); refresh a pin
# deliberately, e.g. with `crane digest gcr.io/distroless/static-debian12:nonroot`.
# Build with `make image` (needs a Docker engine with buildx); k8s/image_test.go
# checks this file's rules where no engine runs.

FROM --platform=$BUILDPLATFORM golang:1.26.8-bookworm@sha256:a688600ca24f8a4d3ca77f95b0dd40704a9fc787c826660eb7ba0b641b8b175d AS build
ARG TARGETOS
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download && go mod verify
COPY . .
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/meshguard ./cmd/meshguard

FROM gcr.io/distroless/static-debian12:nonroot@sha256:d093aa3e30dbadd3efe1310db061a14da60299baff8450a17fe0ccc514a16639
COPY --from=build /out/meshguard /usr/local/bin/meshguard
USER 65532:65532
EXPOSE 8081 8082 8080
ENTRYPOINT ["/usr/local/bin/meshguard"]
CMD ["serve"]
