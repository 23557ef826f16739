//! Library target so that `routing-agent` can name this crate as a build dependency
//! (aya-template layout); the programs live in `main.rs`.
#![no_std]
