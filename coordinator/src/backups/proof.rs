//! Whether the backup registry holds a reduced index that is provably a
//! reduction of the source index the pods run. Any node can push to the
//! backup registry, so what a reduced index says of itself is not trusted:
//! it must carry the source index's own bytes, which hash to the digest the
//! kubelet reported, and each of its children must be one of theirs.

use image_backup_oci::{
    index::check_reduced,
    media::sha256_digest,
    registry::{Registry, RegistryError},
};

/// `Ok(Ok(()))` when `repository` of the backup registry serves `digest` as
/// a reduction of the index `source`; `Ok(Err(why))` when it does not;
/// `Err` when the registry could not say now.
pub async fn reduction(
    registry: &Registry,
    repository: &str,
    digest: &str,
    source: &str,
) -> Result<Result<(), String>, RegistryError> {
    let Some((_, bytes)) = registry.manifest(repository, digest).await? else {
        return Ok(Err(format!("the backup registry does not hold {digest}")));
    };
    let served = sha256_digest(&bytes);
    if served != digest {
        return Ok(Err(format!("the backup registry serves {served} for {digest}")));
    }
    Ok(check_reduced(&bytes, source).map_err(|why| format!("{digest} is not a reduction of {source}: {why}")))
}
