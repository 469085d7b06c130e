//! Docker configs as pull secrets carry them (`.dockerconfigjson`, or the
//! older `.dockercfg`), read as the kubelet reads them: the entry for a
//! registry host under any of the keys found in the wild, and only its
//! credential fields. A config from someone else's Secret is never handed
//! whole to `docker_credential`: a `credsStore` or `credHelpers` in it
//! would make the reader run a program it names.

use serde_json::{Map, Value};

use super::Credentials;

/// Fields of an entry that hold credentials; anything else is dropped.
const ENTRY_FIELDS: [&str; 4] = ["auth", "username", "password", "identitytoken"];

/// The keys a docker config may file `host` under: bare, with a scheme,
/// and for Docker Hub every name it goes by.
pub fn keys_for(host: &str) -> Vec<String> {
    let mut keys = vec![host.to_string(), format!("https://{host}"), format!("http://{host}")];
    if host == "docker.io" || host == "index.docker.io" {
        keys.extend(
            [
                "docker.io",
                "index.docker.io",
                "https://index.docker.io/v1/",
                "registry-1.docker.io",
                "https://registry-1.docker.io",
            ]
            .map(String::from),
        );
    }
    keys.dedup();
    keys
}

/// A `config.json` from a pull secret's data: `.dockerconfigjson` as is,
/// or `.dockercfg` (the `auths` map alone) wrapped into one.
pub fn from_pull_secret(json: Option<&[u8]>, legacy: Option<&[u8]>) -> Option<Vec<u8>> {
    match (json, legacy) {
        (Some(json), _) => Some(json.to_vec()),
        (None, Some(cfg)) => Some(format!("{{\"auths\":{}}}", String::from_utf8_lossy(cfg)).into_bytes()),
        (None, None) => None,
    }
}

/// The entry for `host` in `config`, with its credential fields only.
pub fn entry(config: &[u8], host: &str) -> Option<Value> {
    let config: Value = serde_json::from_slice(config).ok()?;
    let auths = config.get("auths")?.as_object()?;
    let entry = keys_for(host).iter().find_map(|key| auths.get(key))?.as_object()?;
    let kept: Map<String, Value> =
        entry.iter().filter(|(k, _)| ENTRY_FIELDS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    (!kept.is_empty()).then_some(Value::Object(kept))
}

/// A config holding only the entry for `host` of `config`, if it has one:
/// what may go to whoever reads `host` for the pods.
pub fn only(config: &[u8], host: &str) -> Option<Vec<u8>> {
    let entry = entry(config, host)?;
    Some(serde_json::json!({ "auths": { host: entry } }).to_string().into_bytes())
}

/// Credentials for `host` in `config`, from its credential fields alone.
/// The error text never holds the secret itself.
pub fn credentials(config: &[u8], host: &str) -> Result<Option<Credentials>, String> {
    let Some(config) = only(config, host) else { return Ok(None) };
    match docker_credential::get_credential_from_reader(config.as_slice(), host) {
        Ok(docker_credential::DockerCredential::UsernamePassword(username, password)) => {
            Ok(Some(Credentials::Basic { username, password }))
        }
        Ok(docker_credential::DockerCredential::IdentityToken(token)) => Ok(Some(Credentials::IdentityToken(token))),
        Err(docker_credential::CredentialRetrievalError::NoCredentialConfigured) => Ok(None),
        Err(e) => Err(format!("entry for {host}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bytes(value: Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    #[test]
    fn finds_the_host_under_any_key_and_keeps_only_credentials() {
        let config = bytes(json!({
            "auths": {
                "https://registry.example:5000": { "auth": "dTpw", "email": "x@y" },
                "other.example": { "auth": "b3RoZXI6cA==" },
            },
            "credsStore": "evil",
        }));
        assert_eq!(entry(&config, "registry.example:5000"), Some(json!({ "auth": "dTpw" })));
        let only = only(&config, "registry.example:5000").unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&only).unwrap(),
            json!({ "auths": { "registry.example:5000": { "auth": "dTpw" } } })
        );
        assert_eq!(entry(&bytes(json!({ "auths": {} })), "quay.io"), None);
    }

    #[test]
    fn docker_hub_goes_by_every_name() {
        for key in ["index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io", "docker.io"] {
            let config = bytes(json!({ "auths": { key: { "username": "u", "password": "p" } } }));
            let found = credentials(&config, "docker.io").unwrap();
            assert!(matches!(found, Some(Credentials::Basic { ref username, .. }) if username == "u"), "{key}");
        }
    }

    #[test]
    fn reads_both_pull_secret_formats() {
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "puller:s3cret");
        let json = bytes(json!({ "auths": { "backup.example:5000": { "auth": auth } } }));
        let config = from_pull_secret(Some(&json), None).unwrap();
        let Ok(Some(Credentials::Basic { username, .. })) = credentials(&config, "backup.example:5000") else {
            panic!()
        };
        assert_eq!(username, "puller");
        let legacy = bytes(json!({ "https://backup.example:5000": { "auth": auth } }));
        let config = from_pull_secret(None, Some(&legacy)).unwrap();
        assert!(credentials(&config, "backup.example:5000").unwrap().is_some());
        assert!(credentials(&config, "other.example").unwrap().is_none());
    }

    #[test]
    fn a_credential_helper_named_in_a_secret_is_never_run() {
        // Were the config read whole, the helper would be looked up and run.
        let config = bytes(json!({ "auths": {}, "credHelpers": { "registry.example": "evil" } }));
        assert!(matches!(credentials(&config, "registry.example"), Ok(None)));
    }
}
