//! tasker-messaging
