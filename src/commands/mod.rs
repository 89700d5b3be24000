//! The `distill` program's subcommands, as library functions (the binary only parses
//! arguments): the end-to-end job and its phases, seed sweeps, `predict`, `eval`, `bench` and `doctor`.

pub mod bench;
pub mod doctor;
pub mod job;
pub mod predict;
pub mod sweep;
