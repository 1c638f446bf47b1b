//! The generated protobuf and gRPC code of `proto/allot/v1`, and its descriptor set for
//! server reflection.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod allot {
    pub mod v1 {
        tonic::include_proto!("allot.v1");
    }
}

pub use allot::v1;

/// The encoded `FileDescriptorSet` of every Allot proto (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("allot_descriptor");
