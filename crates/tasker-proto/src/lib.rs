//! Generated protobuf code: the public gRPC API (`tasker.v1`) and the internal AMQP
//! commands (`tasker.messages.v1`). Compiled at build time by protox; no `protoc` needed.

#![allow(clippy::all, missing_docs, unreachable_pub)]

/// The public gRPC API.
pub mod v1 {
    tonic::include_proto!("tasker.v1");
}

/// Internal commands exchanged over AMQP.
pub mod messages {
    tonic::include_proto!("tasker.messages.v1");
}

/// The encoded file descriptor set of every proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tasker_descriptor.bin"));
