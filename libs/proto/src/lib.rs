//! Generated gRPC types for the MedAI Flow services. Nothing but generated code (and the codec
//! it is generated with) lives here; services convert to their own domain types at the edge.

#![allow(clippy::all, missing_docs)]

pub mod codec;

pub mod common {
    pub mod v1 {
        tonic::include_proto!("medai.common.v1");
    }
}
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("medai.auth.v1");
    }
}
pub mod validation {
    pub mod v1 {
        tonic::include_proto!("medai.validation.v1");
    }
}
pub mod inference {
    pub mod v1 {
        tonic::include_proto!("medai.inference.v1");
    }
}
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("medai.audit.v1");

        /// The most events one `AppendBatch` carries: the audit service refuses more, and the
        /// ledger client batches within it.
        pub const APPEND_BATCH_MAX_EVENTS: usize = 512;
        /// The most bytes of fields one `AppendBatch` carries (512 events of 2 KiB each),
        /// counted by [`AppendRequest::field_bytes`].
        pub const APPEND_BATCH_MAX_BYTES: usize = 1024 * 1024;

        impl AppendRequest {
            /// The bytes of the fields an event carries, as `AppendBatch`'s bound counts them.
            pub fn field_bytes(&self) -> usize {
                self.actor.len()
                    + self.action.len()
                    + self.resource.len()
                    + self.outcome.len()
                    + self.context_json.len()
            }
        }
    }
}
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("medai.gateway.v1");
    }
}
/// KServe v2 / Open Inference Protocol, as Triton serves it (package `inference`).
pub mod kserve {
    tonic::include_proto!("inference");
}

/// Every message and service above, encoded as a FileDescriptorSet (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/medai_descriptor.bin"));
