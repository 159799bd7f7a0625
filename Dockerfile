# pgfly as a container image: a static binary in a minimal image that runs as a non-root user.
#
#   docker build -t pgfly .
#   docker run --rm pgfly help
#
# The usual way to run pgfly on Fly is inside the app's own image, as the app's parent
# process (`pgfly run`). Copy the binary from this image into the app's Dockerfile:
#
#   FROM pgfly AS pgfly                # the image built above (or your registry's copy of it)
#
#   FROM ruby:3.3-slim                 # the app's own base image, unchanged
#   ...
#   COPY --from=pgfly /usr/local/bin/pgfly /usr/local/bin/pgfly
#   CMD ["pgfly", "run", "--", "bin/rails", "server"]
#
# The binary needs nothing from the image it lands in (no libc, no CA bundle unless the
# database uses verify-full TLS with a public CA). deploy/ has a fly.toml for that setup, a
# two-container setup (deploy/compose) and a Kubernetes pod (deploy/kubernetes), which use
# this image as it is.

FROM golang:1.26 AS build
WORKDIR /src
# Dependencies first, so that a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# CGO_ENABLED=0: a static binary, with Go's own DNS resolver; -trimpath and -s -w: no local
# paths and no symbol tables in it.
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/pgfly ./cmd/pgfly

# distroless/static: CA certificates, /etc/passwd with a nonroot user (uid 65532), no shell.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/pgfly /usr/local/bin/pgfly
USER nonroot:nonroot
# 8080: the HTTP shim; 9187: /health and /metrics (listen on :9187 to reach them from
# outside the container). The Postgres relay listens on 127.0.0.1:5432, for the app beside it.
EXPOSE 8080 9187
ENTRYPOINT ["/usr/local/bin/pgfly"]
CMD ["serve"]
