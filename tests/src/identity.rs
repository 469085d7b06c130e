//! Agent identities as a cluster gives them: a pod of the agent
//! ServiceAccount on its node, and a token bound to that pod with the
//! coordinator's audience, which is what the kubelet projects into an
//! agent pod (it asks the API server for exactly this TokenRequest).

use std::path::Path;

use image_backup_coordinator::trust::agents::DEFAULT_AUDIENCE;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

use crate::cluster::create;

/// Where agents run, and as whom.
pub const AGENT_NAMESPACE: &str = "image-backup";
pub const AGENT_ACCOUNT: &str = "image-backup-agent";

/// A pod `name` of `account` on `node` (made anew if one is left over).
/// Nothing runs it on a server without a kubelet; on a real node, give a
/// pullable `image`, and `projected` mounts the agent's token as the agent
/// DaemonSet does (volume `agent-token`, file `token`).
pub async fn pod(admin: &Client, name: &str, account: &str, node: &str, image: &str, projected: bool) -> Pod {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), AGENT_NAMESPACE);
    create(&accounts, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}})).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), AGENT_NAMESPACE);
    if pods.get_opt(name).await.expect("look for a pod left over").is_some() {
        pods.delete(name, &DeleteParams::default().grace_period(0)).await.expect("delete the pod left over");
        crate::cluster::eventually(&format!("pod {name} is gone"), std::time::Duration::from_secs(30), || async {
            match pods.get_opt(name).await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "image-backup-agent"}},
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": false,
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "agent", "image": image}],
        },
    });
    if projected {
        pod["spec"]["volumes"] = json!([{
            "name": "agent-token",
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": DEFAULT_AUDIENCE, "expirationSeconds": 3600, "path": "token",
            }}]},
        }]);
        pod["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "agent-token", "mountPath": "/var/run/secrets/image-backup", "readOnly": true}]);
    }
    let pod: Pod = serde_json::from_value(pod).expect("a pod");
    pods.create(&PostParams::default(), &pod).await.expect("create the agent pod")
}

/// A token of `pod`'s ServiceAccount for `audience`, bound to the pod.
pub async fn bound_token(admin: &Client, pod: &Pod, audience: &str) -> String {
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).expect("the pod's account");
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.metadata.uid.clone(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), AGENT_NAMESPACE)
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .expect("a bound token")
        .status
        .and_then(|status| status.token)
        .expect("TokenRequest answers with a token")
}

/// The token an agent on `node` presents: its pod's, for the coordinator.
pub async fn agent_token(admin: &Client, node: &str) -> String {
    let pod = pod(admin, &format!("agent-{node}"), AGENT_ACCOUNT, node, "k8s-cluster.local/pause:3.9", false).await;
    bound_token(admin, &pod, DEFAULT_AUDIENCE).await
}

/// Writes `token` where an agent reads it, as the kubelet would.
pub fn write_token(dir: &Path, node: &str, token: &str) -> std::path::PathBuf {
    let path = dir.join(format!("token-{node}"));
    std::fs::write(&path, token).expect("write the agent token");
    path
}
