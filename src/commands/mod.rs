//! The `distill` program's subcommands, as library functions (the binary only parses
//! arguments): the end-to-end job and its phases, seed sweeps, `predict`, `eval` and `bench`.

pub mod bench;
pub mod job;
pub mod predict;
pub mod sweep;
