//! Who may read jobs through JobService: whoever the cluster's RBAC allows
//! the verb `inspect` on `imagebackups.backup.k8slab.io`. The caller sends
//! a token made for the coordinator's own audience (`kubectl create token
//! NAME --audience image-backup.k8slab.io`): a token the API server itself
//! accepts would let the coordinator, or whoever took it from the
//! coordinator, act as the caller everywhere. The coordinator asks the API
//! server who that is (TokenReview, for that audience only) and whether
//! they may (SubjectAccessReview), and remembers the answer a short while
//! (never past the token's expiry) so a `watch` of grpcurl calls costs no
//! API load; a WatchJobs stream asks again as often.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tonic::{Status, metadata::MetadataMap};
use tracing::{debug, warn};

/// The RBAC verb, resource and group JobService reads need.
pub const VERB: &str = "inspect";
pub const RESOURCE: &str = "imagebackups";
pub const GROUP: &str = "backup.k8slab.io";

/// How long an allowed answer is reused (never past the token's expiry),
/// and how often a WatchJobs stream asks again.
const ALLOWED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Callers remembered at once; beyond that the oldest answers go.
const REMEMBERED: usize = 1024;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadRefusal {
    #[error(
        "JobService needs a bearer token (for example `kubectl create token`) of someone allowed to {VERB} {RESOURCE}.{GROUP}"
    )]
    Anonymous,
    #[error(
        "the token is not valid for audience {audience} (make one with `kubectl create token NAME --audience {audience}`): {reason}"
    )]
    Invalid { audience: String, reason: String },
    #[error("{user} may not {VERB} {RESOURCE}.{GROUP}{reason}")]
    Forbidden { user: String, reason: String },
    #[error("cannot check the caller's access: {0}")]
    Unavailable(String),
}

// === impl ReadRefusal ===

impl ReadRefusal {
    pub fn status(&self) -> Status {
        match self {
            Self::Anonymous | Self::Invalid { .. } => Status::unauthenticated(self.to_string()),
            Self::Forbidden { .. } => Status::permission_denied(self.to_string()),
            Self::Unavailable(_) => Status::unavailable(self.to_string()),
        }
    }
}

/// An answer (the caller's name, or why not), until when it holds.
type Answer = (Instant, Result<String, ReadRefusal>);

/// Decides JobService calls.
pub struct Readers {
    client: Client,
    allow_anonymous: bool,
    /// The audience callers' tokens must be made for.
    audience: String,
    /// How long an allowed answer is reused, and how often streams ask.
    recheck: Duration,
    /// By the token's sha256: no token is kept in memory longer than a call.
    answers: Mutex<HashMap<[u8; 32], Answer>>,
}

// === impl Readers ===

impl Readers {
    /// `allow_anonymous` lets calls without a token through (a cluster whose
    /// gRPC port only trusted people reach); a token sent is checked anyway.
    pub fn new(client: Client, allow_anonymous: bool, audience: &str) -> Self {
        Self::with_recheck(client, allow_anonymous, audience, ALLOWED_FOR)
    }

    /// As [`Readers::new`], reusing an allowed answer for `recheck` only.
    pub fn with_recheck(client: Client, allow_anonymous: bool, audience: &str, recheck: Duration) -> Self {
        let audience = audience.to_string();
        Self { client, allow_anonymous, audience, recheck, answers: Mutex::default() }
    }

    /// How often a stream asks again whether its caller may read: as often
    /// as an answer is reused, so an expired token ends it within that.
    pub fn recheck_every(&self) -> Duration {
        self.recheck
    }

    /// Allows the call, or says why not.
    pub async fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(token) = super::bearer(metadata) else {
            return if self.allow_anonymous { Ok(()) } else { Err(ReadRefusal::Anonymous.status()) };
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(answer) = self.remembered(&key) {
            return answer.map(|_| ()).map_err(|refusal| refusal.status());
        }
        let answer = self.ask(token).await;
        match &answer {
            Ok(user) => debug!(%user, "JobService caller allowed"),
            Err(refusal) => warn!(error = %refusal, "JobService call refused"),
        }
        // An API server that did not answer is asked again next time.
        if !matches!(answer, Err(ReadRefusal::Unavailable(_))) {
            self.remember(key, answer.clone(), super::token_expiry(token));
        }
        answer.map(|_| ()).map_err(|refusal| refusal.status())
    }

    fn remembered(&self, key: &[u8; 32]) -> Option<Result<String, ReadRefusal>> {
        let answers = self.answers.lock();
        let (until, answer) = answers.get(key)?;
        (Instant::now() < *until).then(|| answer.clone())
    }

    fn remember(&self, key: [u8; 32], answer: Result<String, ReadRefusal>, expiry: Option<std::time::SystemTime>) {
        let now = Instant::now();
        let mut until = now + if answer.is_ok() { self.recheck } else { REFUSED_FOR.min(self.recheck) };
        if let Some(left) = expiry.map(|at| at.duration_since(std::time::SystemTime::now()).unwrap_or_default()) {
            until = until.min(now + left);
        }
        let mut answers = self.answers.lock();
        if answers.len() >= REMEMBERED {
            answers.retain(|_, (until, _)| *until > now);
            if answers.len() >= REMEMBERED {
                answers.clear();
            }
        }
        answers.insert(key, (until, answer));
    }

    /// Who the token is, and whether RBAC lets them inspect jobs.
    async fn ask(&self, token: &str) -> Result<String, ReadRefusal> {
        let unavailable = |e: kube::Error| ReadRefusal::Unavailable(e.to_string());
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(vec![self.audience.clone()]) },
            ..TokenReview::default()
        };
        let status = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?
            .status
            .unwrap_or_default();
        let invalid = |reason: String| ReadRefusal::Invalid { audience: self.audience.clone(), reason };
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => return Err(invalid(status.error.unwrap_or_else(|| "not accepted".into()))),
        };
        // An authenticator that ignores audiences answers without them.
        if !status.audiences.iter().flatten().any(|a| *a == self.audience) {
            return Err(invalid("the API server accepted it for other audiences only".into()));
        }
        let name = user.username.clone().unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(RESOURCE.into()),
                    verb: Some(VERB.into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let decision = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
            .map_err(unavailable)?
            .status
            .unwrap_or_default();
        if decision.allowed {
            Ok(name)
        } else {
            let reason = decision.reason.filter(|r| !r.is_empty()).map(|r| format!(": {r}")).unwrap_or_default();
            Err(ReadRefusal::Forbidden { user: name, reason })
        }
    }
}
