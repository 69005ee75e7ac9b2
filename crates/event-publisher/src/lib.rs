//! event-publisher
