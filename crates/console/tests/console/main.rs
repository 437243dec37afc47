//! The console's tests, in one binary: key handling, rendering snapshots from a fixed scene, and
//! the overview read from a real database.

mod fixture;
mod keys;
mod real_database;
mod render;
