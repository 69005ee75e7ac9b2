//! tasker-store
