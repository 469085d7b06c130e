//! Images made up for a [`MemoryStore`] to hold: a config and layers of
//! chosen sizes per platform, one manifest each, under an index when there
//! are several platforms. The bytes follow from a seed, so two images with
//! different seeds share no blob, and the same seed gives the same digests.

use bytes::Bytes;
use serde_json::{Value, json};

use image_backup_oci::media::sha256_digest;

use super::{Descriptor, memory::MemoryStore};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Content and its descriptor.
#[derive(Clone, Debug)]
pub struct SampleBlob {
    pub descriptor: Descriptor,
    pub bytes: Bytes,
}

/// One platform's image.
#[derive(Clone, Debug)]
pub struct SamplePlatform {
    /// `amd64`, `arm64`, ...; the OS is linux.
    pub architecture: String,
    pub manifest: SampleBlob,
    pub config: SampleBlob,
    pub layers: Vec<SampleBlob>,
}

/// An image: one platform's manifest, or an index of several.
#[derive(Clone, Debug)]
pub struct SampleImage {
    pub index: Option<SampleBlob>,
    pub platforms: Vec<SamplePlatform>,
}

// === impl SampleBlob ===

impl SampleBlob {
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let descriptor =
            Descriptor { media_type: media_type.to_string(), digest: sha256_digest(&bytes), size: bytes.len() as u64 };
        Self { descriptor, bytes }
    }

    pub fn digest(&self) -> &str {
        &self.descriptor.digest
    }

    fn json(&self) -> Value {
        json!({ "mediaType": self.descriptor.media_type, "digest": self.descriptor.digest, "size": self.descriptor.size })
    }
}

// === impl SamplePlatform ===

impl SamplePlatform {
    fn new(architecture: &str, layer_sizes: &[usize], seed: u8) -> Self {
        let layers: Vec<SampleBlob> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| SampleBlob::new(OCI_LAYER, noise(size, &format!("{seed}/{architecture}/{i}"))))
            .collect();
        let config = json!({
            "architecture": architecture,
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.digest()).collect::<Vec<_>>() },
            "config": { "Labels": { "seed": seed.to_string() } },
        });
        let config = SampleBlob::new(OCI_CONFIG, to_vec(&config));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.json(),
            "layers": layers.iter().map(SampleBlob::json).collect::<Vec<_>>(),
        });
        let manifest = SampleBlob::new(OCI_MANIFEST, to_vec(&manifest));
        Self { architecture: architecture.to_string(), manifest, config, layers }
    }

    /// The manifest, config and layers, in that order.
    pub fn blobs(&self) -> impl Iterator<Item = &SampleBlob> {
        [&self.manifest, &self.config].into_iter().chain(&self.layers)
    }
}

// === impl SampleImage ===

impl SampleImage {
    /// A single-platform (linux/amd64) image.
    pub fn single(layer_sizes: &[usize], seed: u8) -> Self {
        Self { index: None, platforms: vec![SamplePlatform::new("amd64", layer_sizes, seed)] }
    }

    /// An OCI index of one linux image per architecture, each with layers
    /// of the same sizes (and different bytes).
    pub fn multi_platform(layer_sizes: &[usize], architectures: &[&str], seed: u8) -> Self {
        let platforms: Vec<SamplePlatform> =
            architectures.iter().map(|arch| SamplePlatform::new(arch, layer_sizes, seed)).collect();
        let manifests: Vec<Value> = platforms
            .iter()
            .map(|p| {
                let mut entry = p.manifest.json();
                entry["platform"] = json!({ "architecture": p.architecture, "os": "linux" });
                entry
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        Self { index: Some(SampleBlob::new(OCI_INDEX, to_vec(&index))), platforms }
    }

    /// What an image record points at: the index, else the manifest.
    pub fn root(&self) -> &Descriptor {
        match (&self.index, self.platforms.first()) {
            (Some(index), _) => &index.descriptor,
            (None, Some(platform)) => &platform.manifest.descriptor,
            (None, None) => panic!("a sample image has a platform"),
        }
    }

    pub fn digest(&self) -> &str {
        &self.root().digest
    }

    /// The platform of `architecture`.
    pub fn platform(&self, architecture: &str) -> &SamplePlatform {
        self.platforms
            .iter()
            .find(|p| p.architecture == architecture)
            .unwrap_or_else(|| panic!("the sample image has no {architecture} platform"))
    }
}

// === impl MemoryStore ===

impl MemoryStore {
    /// Holds `image` under `name` as a node that pulled it for
    /// `architectures` (every one when empty) does: the index, and those
    /// platforms' manifests, configs and layers, except the `dropped` blobs
    /// (layers containerd skipped or discarded).
    pub fn import(&self, image: &SampleImage, name: &str, architectures: &[&str], dropped: &[&str]) {
        if let Some(index) = &image.index {
            self.add_blob(index.bytes.clone());
        }
        let pulled =
            image.platforms.iter().filter(|p| architectures.is_empty() || architectures.contains(&&*p.architecture));
        for blob in pulled.flat_map(SamplePlatform::blobs) {
            if !dropped.contains(&blob.digest()) {
                self.add_blob(blob.bytes.clone());
            }
        }
        self.set_image(name, image.root().clone());
    }
}

/// `size` bytes that follow from `seed`, unlike any other seed's.
fn noise(size: usize, seed: &str) -> Vec<u8> {
    let hash = sha256_digest(seed.as_bytes());
    // A digest's hex has 64 digits: the first 16 make the state.
    let mut state = u64::from_str_radix(&hash["sha256:".len()..][..16], 16).unwrap_or(1) | 1;
    (0..size)
        .map(|_| {
            // xorshift64: cheap, and enough to make every seed's bytes differ.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn to_vec(value: &Value) -> Vec<u8> {
    // Serializing a `Value` cannot fail: its keys are strings.
    serde_json::to_vec(value).unwrap_or_default()
}
