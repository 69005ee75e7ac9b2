//! step-worker
