//! tasker-e2e
