#!/usr/bin/env bash
# Rebuilds every plugin crate in plugins/ for wasm32-unknown-unknown and copies each module to
# plugins/<name>.wasm, the files bucket files point at. Needs the target:
#   rustup target add wasm32-unknown-unknown
# crates/wasm-host/tests/plugins.rs checks the committed modules against fresh builds.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="$root/target/plugins"
for manifest in "$root"/plugins/*/Cargo.toml; do
    name="$(basename "$(dirname "$manifest")")"
    cargo build --release --target wasm32-unknown-unknown \
        --manifest-path "$manifest" --target-dir "$target_dir"
    cp "$target_dir/wasm32-unknown-unknown/release/${name//-/_}.wasm" "$root/plugins/$name.wasm"
    echo "plugins/$name.wasm: $(wc -c < "$root/plugins/$name.wasm") bytes"
done
