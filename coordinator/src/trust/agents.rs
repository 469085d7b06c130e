//! Agent authentication. An agent presents the token the kubelet projects
//! into its pod, with an audience of our own so that no other token of the
//! cluster (and no token of ours anywhere else) works here. The API server
//! checks it (TokenReview) and names the pod it is bound to; the pod's
//! `spec.nodeName` is then the only node that agent may speak for.

use std::time::SystemTime;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use tonic::Status;

/// Audience of agent tokens unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "image-backup.k8slab.io";

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The ServiceAccount agents run as, and the audience of their tokens.
#[derive(Clone, Debug)]
pub struct AgentAccount {
    pub namespace: String,
    pub service_account: String,
    pub audience: String,
}

impl AgentAccount {
    fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }
}

/// Who an authenticated agent is: its pod, and the node that pod runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    pub pod: String,
    pub node: String,
    /// When the token stops being valid; the session ends then and the
    /// agent comes back with the token the kubelet has rotated in.
    pub expires: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentRefusal {
    #[error("no bearer token: agents present their projected ServiceAccount token (audience {audience})")]
    NoToken { audience: String },
    #[error("the token is not valid for audience {audience}: {reason}")]
    Invalid { audience: String, reason: String },
    #[error("the token is {user}'s, not the agent ServiceAccount {expected}'s")]
    OtherAccount { user: String, expected: String },
    #[error("the token of {user} is not bound to a pod: agents use a projected token")]
    NotBound { user: String },
    #[error("pod {namespace}/{pod} that the token is bound to no longer exists")]
    PodGone { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} is not scheduled to a node")]
    NotScheduled { namespace: String, pod: String },
    #[error("agent pod {pod} runs on node {node}, not on {claimed}")]
    OtherNode { pod: String, node: String, claimed: String },
    #[error("cannot check the agent's token: {0}")]
    Review(#[source] kube::Error),
}

// === impl AgentRefusal ===

impl AgentRefusal {
    /// The gRPC status the agent sees: it says what is wrong, never more
    /// than the agent sent.
    pub fn status(&self) -> Status {
        match self {
            Self::NoToken { .. } | Self::Invalid { .. } => Status::unauthenticated(self.to_string()),
            Self::Review(_) => Status::unavailable(self.to_string()),
            _ => Status::permission_denied(self.to_string()),
        }
    }
}

/// Checks agents' tokens with the API server.
pub struct AgentAuthenticator {
    client: Client,
    account: AgentAccount,
}

// === impl AgentAuthenticator ===

impl AgentAuthenticator {
    pub fn new(client: Client, account: AgentAccount) -> Self {
        Self { client, account }
    }

    /// The agent behind `token`, if it is the agent of `claimed_node`.
    pub async fn authenticate(&self, token: Option<&str>, claimed_node: &str) -> Result<AgentIdentity, AgentRefusal> {
        let audience = &self.account.audience;
        let token = token.ok_or_else(|| AgentRefusal::NoToken { audience: audience.clone() })?;
        let user = self.review(token).await?;
        let expected = self.account.username();
        let username = user.username.unwrap_or_default();
        if username != expected {
            return Err(AgentRefusal::OtherAccount { user: username, expected });
        }
        let extra = user.extra.unwrap_or_default();
        let single = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
        let (Some(pod), Some(uid)) = (single(POD_NAME), single(POD_UID)) else {
            return Err(AgentRefusal::NotBound { user: username });
        };
        let namespace = self.account.namespace.clone();
        let found = Api::<Pod>::namespaced(self.client.clone(), &namespace)
            .get_opt(&pod)
            .await
            .map_err(AgentRefusal::Review)?
            // A pod of the same name made after the token's is another pod.
            .filter(|found| found.metadata.uid.as_deref() == Some(uid.as_str()))
            .ok_or_else(|| AgentRefusal::PodGone { namespace: namespace.clone(), pod: pod.clone() })?;
        let node = found
            .spec
            .and_then(|spec| spec.node_name)
            .ok_or_else(|| AgentRefusal::NotScheduled { namespace, pod: pod.clone() })?;
        if node != claimed_node {
            return Err(AgentRefusal::OtherNode { pod, node, claimed: claimed_node.to_string() });
        }
        Ok(AgentIdentity { pod, node, expires: super::token_expiry(token) })
    }

    async fn review(&self, token: &str) -> Result<UserInfo, AgentRefusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(vec![self.account.audience.clone()]) },
            ..TokenReview::default()
        };
        let status = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AgentRefusal::Review)?
            .status
            .unwrap_or_default();
        let audience = &self.account.audience;
        match (status.authenticated, status.user) {
            // An authenticator that ignores audiences answers without them.
            (Some(true), Some(_)) if !status.audiences.iter().flatten().any(|a| a == audience) => {
                Err(AgentRefusal::Invalid {
                    audience: audience.clone(),
                    reason: "the API server accepted it for other audiences only".into(),
                })
            }
            (Some(true), Some(user)) => Ok(user),
            _ => Err(AgentRefusal::Invalid {
                audience: audience.clone(),
                reason: status.error.unwrap_or_else(|| "the API server did not accept it".into()),
            }),
        }
    }
}
