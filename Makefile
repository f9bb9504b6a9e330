# A handful of one-liners; the scripts hold the logic.
.PHONY: dev test lint bench schemas servers-down

dev:            ## run every role on http://127.0.0.1:8000 with local servers
	./scripts/dev.sh

test:           ## every test, against real local servers
	./scripts/test.sh

lint:           ## formatting and clippy, as CI runs them
	cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings

bench:          ## benchmarks (see benches/README.md)
	cargo build --release --bin mozaiks && cargo bench

schemas:        ## regenerate schemas/ from the Rust types
	cargo run -q -- schemas

servers-down:   ## stop the local servers started by dev
	./scripts/servers.sh down
