//! What the agent and the coordinator share about images and registries:
//! references normalized as the kubelet does, media types and indexes, where
//! backups go, and the OCI distribution client with its settings. Nothing
//! here knows containerd or Kubernetes, so the coordinator links neither
//! containerd's client nor the push engine.

pub mod access;
pub mod index;
pub mod media;
pub mod reference;
pub mod registry;
pub mod target;

pub use reference::{ImageRef, ParseRefError};
pub use target::{BackupTarget, digest_tag};
