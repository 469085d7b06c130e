//! Test images built as OCI content: random layers of chosen sizes, a config
//! and a manifest in OCI or Docker media types, and multi-platform indexes.

use std::collections::HashMap;

use bytes::Bytes;
use rand::{RngCore, SeedableRng, rngs::SmallRng};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::containerd::Containerd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaTypes {
    Oci,
    Docker,
}

impl MediaTypes {
    fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Oci => "application/vnd.oci.image.manifest.v1+json",
            MediaTypes::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }
    fn index(self) -> &'static str {
        match self {
            MediaTypes::Oci => "application/vnd.oci.image.index.v1+json",
            MediaTypes::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }
    fn config(self) -> &'static str {
        match self {
            MediaTypes::Oci => "application/vnd.oci.image.config.v1+json",
            MediaTypes::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
    fn layer(self) -> &'static str {
        match self {
            MediaTypes::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
            MediaTypes::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        }
    }
}

/// One piece of content with its digest and the gc labels containerd would
/// give it after a pull.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Bytes,
    pub gc_labels: HashMap<String, String>,
}

impl Blob {
    fn new(media_type: &str, data: Bytes) -> Self {
        Self { media_type: media_type.into(), digest: sha256(&data), data, gc_labels: HashMap::new() }
    }

    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A single-platform image: manifest, config and layers.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub os: String,
    pub architecture: String,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl PlatformImage {
    pub fn build(media: MediaTypes, layer_sizes: &[usize], os: &str, architecture: &str, seed: u64) -> Self {
        Self::assemble(media, random_layers(media, layer_sizes, seed), os, architecture, seed)
    }

    /// An image of `layers` (some may be another image's): config and
    /// manifest around them, labelled with `seed`.
    pub fn assemble(media: MediaTypes, layers: Vec<Blob>, os: &str, architecture: &str, seed: u64) -> Self {
        let config = json!({
            "architecture": architecture,
            "os": os,
            "config": { "Env": ["PATH=/usr/bin"], "Labels": { "seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>() },
        });
        let config = Blob::new(media.config(), serde_json::to_vec(&config).expect("json").into());
        let descriptor = |b: &Blob| json!({ "mediaType": b.media_type, "digest": b.digest, "size": b.size() });
        // Pretty-printed on purpose: a pusher that re-serializes the JSON
        // changes the digest, and the tests notice.
        let manifest = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": media.manifest(),
            "config": descriptor(&config),
            "layers": layers.iter().map(descriptor).collect::<Vec<_>>(),
        }))
        .expect("json");
        let mut manifest = Blob::new(media.manifest(), manifest.into());
        manifest.gc_labels.insert("containerd.io/gc.ref.content.config".into(), config.digest.clone());
        for (i, layer) in layers.iter().enumerate() {
            manifest.gc_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), layer.digest.clone());
        }
        Self { os: os.into(), architecture: architecture.into(), manifest, config, layers }
    }

    /// An OCI 1.1 artifact referring to `subject` (a signature, an SBOM):
    /// a manifest with `subject` and `artifactType`, one random layer.
    pub fn artifact(subject: &Blob, artifact_type: &str, seed: u64) -> Self {
        let media = MediaTypes::Oci;
        let layers = random_layers(media, &[1 << 10], seed);
        let config = Blob::new("application/vnd.oci.empty.v1+json", Bytes::from_static(b"{}"));
        let descriptor = |b: &Blob| json!({ "mediaType": b.media_type, "digest": b.digest, "size": b.size() });
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media.manifest(),
            "artifactType": artifact_type,
            "config": descriptor(&config),
            "layers": layers.iter().map(descriptor).collect::<Vec<_>>(),
            "subject": descriptor(subject),
        }))
        .expect("json");
        let manifest = Blob::new(media.manifest(), manifest.into());
        Self { os: String::new(), architecture: String::new(), manifest, config, layers }
    }

    /// The referrers index listing `artifacts`, as the OCI 1.1 tag
    /// fallback (`sha256-<hex>`) holds it.
    pub fn referrers_index(artifacts: &[(&PlatformImage, &str)]) -> Blob {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MediaTypes::Oci.index(),
            "manifests": artifacts.iter().map(|(a, artifact_type)| json!({
                "mediaType": a.manifest.media_type,
                "digest": a.manifest.digest,
                "size": a.manifest.size(),
                "artifactType": artifact_type,
            })).collect::<Vec<_>>(),
        }))
        .expect("json");
        Blob::new(MediaTypes::Oci.index(), index.into())
    }

    /// An image a real node can run: one uncompressed layer holding
    /// `files` (path in the image, content, mode), linux/amd64, with `cmd`.
    pub fn runnable(files: &[(&str, &[u8], u32)], cmd: &[&str]) -> anyhow::Result<Self> {
        let mut layer = tar::Builder::new(Vec::new());
        for (path, content, mode) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(*mode);
            header.set_mtime(0);
            layer.append_data(&mut header, path, *content)?;
        }
        let layer = Blob::new("application/vnd.oci.image.layer.v1.tar", layer.into_inner()?.into());
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
            // Uncompressed, so the layer's digest is its diff ID.
            "rootfs": { "type": "layers", "diff_ids": [layer.digest.clone()] },
        });
        let config = Blob::new(MediaTypes::Oci.config(), serde_json::to_vec(&config)?.into());
        let descriptor = |b: &Blob| json!({ "mediaType": b.media_type, "digest": b.digest, "size": b.size() });
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MediaTypes::Oci.manifest(),
            "config": descriptor(&config),
            "layers": [descriptor(&layer)],
        }))?;
        let manifest = Blob::new(MediaTypes::Oci.manifest(), manifest.into());
        Ok(Self { os: "linux".into(), architecture: "amd64".into(), manifest, config, layers: vec![layer] })
    }

    pub fn total_size(&self) -> u64 {
        self.manifest.size() + self.config.size() + self.layers.iter().map(Blob::size).sum::<u64>()
    }

    fn blobs(&self) -> Vec<&Blob> {
        let mut blobs: Vec<&Blob> = self.layers.iter().collect();
        blobs.push(&self.config);
        blobs.push(&self.manifest);
        blobs
    }
}

fn random_layers(media: MediaTypes, sizes: &[usize], seed: u64) -> Vec<Blob> {
    let mut rng = SmallRng::seed_from_u64(seed);
    sizes
        .iter()
        .map(|&size| {
            let mut data = vec![0u8; size];
            rng.fill_bytes(&mut data);
            Blob::new(media.layer(), data.into())
        })
        .collect()
}

/// An image as a registry would serve it: one platform, or an index over
/// several.
#[derive(Clone, Debug)]
pub struct TestImage {
    pub media: MediaTypes,
    pub platforms: Vec<PlatformImage>,
    /// buildx attestation manifests (`unknown/unknown`), one per platform:
    /// in the index, never pulled by containerd.
    pub attestations: Vec<PlatformImage>,
    pub index: Option<Blob>,
}

impl TestImage {
    pub fn single(media: MediaTypes, layer_sizes: &[usize], seed: u64) -> Self {
        Self::of(media, PlatformImage::build(media, layer_sizes, "linux", "amd64", seed))
    }

    /// One platform's image alone, no index.
    pub fn of(media: MediaTypes, platform: PlatformImage) -> Self {
        Self { media, platforms: vec![platform], attestations: Vec::new(), index: None }
    }

    /// An index over `architectures`, each with its own random layers.
    pub fn multi_platform(media: MediaTypes, layer_sizes: &[usize], architectures: &[&str], seed: u64) -> Self {
        let platforms: Vec<PlatformImage> = architectures
            .iter()
            .enumerate()
            .map(|(i, arch)| {
                PlatformImage::build(media, layer_sizes, "linux", arch, seed.wrapping_add(i as u64 * 7919))
            })
            .collect();
        Self::indexed(media, platforms, Vec::new())
    }

    /// An index as buildx makes it: every platform on a shared base layer
    /// of `base` bytes plus its own `layer_sizes`, and an attestation
    /// manifest per platform.
    pub fn buildx(media: MediaTypes, base: usize, layer_sizes: &[usize], architectures: &[&str], seed: u64) -> Self {
        let base = random_layers(media, &[base], seed.wrapping_add(104_729));
        let platforms: Vec<PlatformImage> = architectures
            .iter()
            .enumerate()
            .map(|(i, arch)| {
                let seed = seed.wrapping_add(i as u64 * 7919);
                let layers = base.iter().cloned().chain(random_layers(media, layer_sizes, seed)).collect();
                PlatformImage::assemble(media, layers, "linux", arch, seed)
            })
            .collect();
        let attestations = (0..platforms.len())
            .map(|i| PlatformImage::build(media, &[2 << 10], "unknown", "unknown", seed.wrapping_add(31 + i as u64)))
            .collect();
        Self::indexed(media, platforms, attestations)
    }

    /// An index over `platforms`, with an attestation entry for each of
    /// `attestations` (paired with the platforms in order).
    pub fn indexed(media: MediaTypes, platforms: Vec<PlatformImage>, attestations: Vec<PlatformImage>) -> Self {
        let entry = |p: &PlatformImage| {
            json!({
                "mediaType": p.manifest.media_type,
                "digest": p.manifest.digest,
                "size": p.manifest.size(),
                "platform": { "os": p.os, "architecture": p.architecture },
            })
        };
        let attestation = |(a, p): (&PlatformImage, &PlatformImage)| {
            let mut entry = entry(a);
            entry["annotations"] = json!({
                "vnd.docker.reference.digest": p.manifest.digest,
                "vnd.docker.reference.type": "attestation-manifest",
            });
            entry
        };
        let index = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": media.index(),
            "manifests": platforms.iter().map(entry)
                .chain(attestations.iter().zip(&platforms).map(attestation))
                .collect::<Vec<_>>(),
        }))
        .expect("json");
        let mut index = Blob::new(media.index(), index.into());
        for (i, p) in platforms.iter().chain(&attestations).enumerate() {
            index.gc_labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), p.manifest.digest.clone());
        }
        Self { media, platforms, attestations, index: Some(index) }
    }

    /// The descriptor the image name points at (index or manifest).
    pub fn root(&self) -> &Blob {
        self.index.as_ref().unwrap_or(&self.platforms[0].manifest)
    }

    pub fn digest(&self) -> &str {
        &self.root().digest
    }

    /// Bytes a full copy moves.
    pub fn total_size(&self) -> u64 {
        self.platforms.iter().map(PlatformImage::total_size).sum::<u64>() + self.index.as_ref().map_or(0, Blob::size)
    }

    pub fn platform(&self, architecture: &str) -> &PlatformImage {
        self.platforms.iter().find(|p| p.architecture == architecture).expect("platform in test image")
    }

    /// Puts the image into containerd as a kubelet pull of `reference`
    /// (`host/repo:tag`) leaves it: only the platforms in `pulled` (all for a
    /// single-platform image), recorded under the tag and under
    /// `name@digest`. `skip` leaves blobs out, as a node whose GC took them.
    pub async fn import(
        &self,
        containerd: &Containerd,
        reference: &str,
        pulled: &[&str],
        skip: &[&str],
    ) -> anyhow::Result<()> {
        let mut blobs: Vec<&Blob> = Vec::new();
        for p in &self.platforms {
            if self.index.is_none() || pulled.contains(&p.architecture.as_str()) {
                blobs.extend(p.blobs());
            }
        }
        blobs.extend(self.index.iter());
        let mut seen = std::collections::HashSet::new();
        blobs.retain(|b| seen.insert(b.digest.as_str()));
        blobs.retain(|b| !skip.contains(&b.digest.as_str()));
        let name = reference.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(reference, |(n, _)| n);
        let names = [reference.to_string(), format!("{name}@{}", self.digest())];
        containerd.import(&blobs, &names, self.root()).await
    }
}
