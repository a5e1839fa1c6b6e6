# The operator image: a static binary on a distroless base, running as a non-root user.
# Built by CI on a machine with Docker (see .github/workflows/e2e.yaml); not buildable offline.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
# A member of the workspace: cargo reads its manifest even though the image does not build it.
COPY testkit testkit
RUN target="$(uname -m)-unknown-linux-musl" \
    && rustup target add "$target" \
    && cargo build --release --locked --bin warren --target "$target" \
    && cp "target/$target/release/warren" /warren

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /warren /warren
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/warren"]
CMD ["run"]
