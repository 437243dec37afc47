//! End-to-end tests: the real `membrane` binary, real Postgres, real WASM.

mod chaos;
mod check;
mod console;
mod hot_reload;
mod import;
mod live;
mod plugins;
mod reads;
mod scale;
mod segment_client;
mod support;
mod webhook_tls;
mod webhooks;
