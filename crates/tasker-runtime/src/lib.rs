//! tasker-runtime
