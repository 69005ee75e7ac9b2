//! tasker-test-support
