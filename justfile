# Thin wrappers: the logic lives in crates/xtask (`cargo xtask help`), so nobody needs `just`.

# List the recipes.
default:
    @just --list

# Install the Debian packages tests, benches and the demo need (idempotent).
setup:
    cargo xtask setup

# Setup, then every test of the workspace; extra args go to `cargo test`.
test *args:
    cargo xtask test {{args}}

# rustfmt --check, clippy -D warnings, buf lint.
lint:
    cargo xtask lint

# PostgreSQL + NATS + `keel serve --target all` with a registered local instance (`just demo --once` to stop after).
demo *args:
    cargo xtask demo {{args}}

# The registry benchmark; extra args go to `cargo bench`.
bench *args:
    cargo xtask bench {{args}}

# Format the whole workspace.
fmt:
    cargo fmt --all

# Lint the protobuf contracts under proto/.
proto-lint:
    npx --yes @bufbuild/buf lint
