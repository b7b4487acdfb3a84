//! LocalModel operator. Today: placement as pure functions; the controllers build on it.

pub mod placement;
