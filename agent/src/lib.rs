//! The image-backup node agent: copies images out of the node's containerd
//! content store into the backup registry, so nothing is pulled from the
//! source registry again. The push engine and the daemon see the node
//! through the [`store::ContentStore`] trait; [`containerd`] is the real
//! one, [`store::memory`] one for tests.

pub mod cli;
pub mod containerd;
pub mod daemon;
pub mod guard;
pub mod link;
pub mod node_pods;
pub mod progress;
pub mod push;
pub mod store;
