//! Scoped access: the role an API token or administrator holds, and the one table
//! ([`ROUTE_ROLES`]) saying which role each route of the HTTP API needs.
//!
//! Roles are ordered: `read` < `operate` < `admin`; a caller may use a route when its
//! role is at least the route's. `read` sees (views, metrics, the audit log);
//! `operate` also changes what is distributed (publish, push, cancel, a rollout's pause,
//! resume, approve and abort, content groups, policies); `admin` also changes who belongs (enrolment and enrolment tokens, agent
//! placement and revocation). API tokens and administrators are made with `baton admin`, which is
//! local to the manager's database and so is itself `admin`. The admin token in
//! `<data-dir>/admin.token` is `admin`; tokens and administrators made before roles
//! existed are `admin` too, so nothing breaks on upgrade.

use std::fmt;
use std::str::FromStr;

use axum::http::Method;
use serde::{Deserialize, Serialize};

/// What a credential may do; later variants may do everything earlier ones may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Views and metrics.
    Read,
    /// Also publish, push, cancel, content groups and policies.
    Operate,
    /// Also enrolment, enrolment tokens and agent placement.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Read, Role::Operate, Role::Admin];

    /// The role's name as stored and shown (`read`, `operate`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }

    /// Whether a caller holding `self` may use a route that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not `read`, `operate` or `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: give read, operate or admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// Every authenticated route (method, path pattern as the router and the OpenAPI
/// document spell it) with the role it needs: the one place access is decided.
/// A route missing here needs `admin` (see [`required_role`]); a test checks that every
/// route of the OpenAPI document is listed.
pub const ROUTE_ROLES: &[(&str, &str, Role)] = &[
    // Views.
    ("GET", "/api/v1/me", Role::Read),
    ("GET", "/api/v1/status", Role::Read),
    ("GET", "/metrics", Role::Read),
    ("GET", "/api/v1/agents", Role::Read),
    ("GET", "/api/v1/agents/{id}", Role::Read),
    ("GET", "/api/v1/enrolment-tokens", Role::Read),
    ("GET", "/api/v1/jobs", Role::Read),
    ("GET", "/api/v1/jobs/{id}", Role::Read),
    ("GET", "/api/v1/jobs/{id}/events", Role::Read),
    ("GET", "/api/v1/segments", Role::Read),
    ("GET", "/api/v1/segments/{name}", Role::Read),
    ("GET", "/api/v1/groups", Role::Read),
    ("GET", "/api/v1/groups/{name}", Role::Read),
    ("GET", "/api/v1/policies", Role::Read),
    ("GET", "/api/v1/policies/{name}", Role::Read),
    ("GET", "/api/v1/audit", Role::Read),
    ("GET", "/api/v1/trust", Role::Read),
    // What is distributed, and how.
    ("POST", "/api/v1/jobs", Role::Operate),
    ("POST", "/api/v1/jobs/{id}/cancel", Role::Operate),
    ("POST", "/api/v1/jobs/{id}/pause", Role::Operate),
    ("POST", "/api/v1/jobs/{id}/resume", Role::Operate),
    ("POST", "/api/v1/jobs/{id}/approve", Role::Operate),
    ("POST", "/api/v1/jobs/{id}/abort", Role::Operate),
    ("POST", "/api/v1/uploads", Role::Operate),
    ("POST", "/api/v1/groups", Role::Operate),
    ("PUT", "/api/v1/groups/{name}", Role::Operate),
    ("DELETE", "/api/v1/groups/{name}", Role::Operate),
    ("POST", "/api/v1/policies", Role::Operate),
    ("PUT", "/api/v1/policies/{name}", Role::Operate),
    ("DELETE", "/api/v1/policies/{name}", Role::Operate),
    // Who belongs to the fleet.
    ("POST", "/api/v1/agents", Role::Admin),
    ("PATCH", "/api/v1/agents/{id}", Role::Admin),
    ("POST", "/api/v1/agents/{id}/revoke", Role::Admin),
    ("POST", "/api/v1/enrolment-tokens", Role::Admin),
    ("DELETE", "/api/v1/enrolment-tokens/{id}", Role::Admin),
    // Which publishers agents trust (the document is root-signed; the manager only relays it).
    ("PUT", "/api/v1/trust", Role::Admin),
];

/// The role `method` on the route `pattern` is listed with in [`ROUTE_ROLES`] (`HEAD`
/// as `GET`), or `None` if it is not listed.
pub fn listed_role(method: &Method, pattern: &str) -> Option<Role> {
    let method = if *method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTE_ROLES
        .iter()
        .find(|(m, p, _)| *m == method && *p == pattern)
        .map(|(_, _, role)| *role)
}

/// The role `method` on the route `pattern` needs: as listed, else `admin` (a route
/// someone forgot to list is closed rather than open).
pub fn required_role(method: &Method, pattern: &str) -> Role {
    listed_role(method, pattern).unwrap_or(Role::Admin)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Admin.allows(Role::Operate));
        assert!(Role::Operate.allows(Role::Read));
        assert!(Role::Read.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Operate));
        assert!(!Role::Operate.allows(Role::Admin));
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(serde_json::to_value(role).unwrap(), role.as_str());
        }
        assert!("root".parse::<Role>().is_err());
        assert!("Admin".parse::<Role>().is_err());
    }

    #[test]
    fn the_table_gives_each_kind_of_route_its_role() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(required_role(&get, "/api/v1/agents"), Role::Read);
        assert_eq!(required_role(&Method::HEAD, "/api/v1/jobs"), Role::Read);
        assert_eq!(required_role(&get, "/metrics"), Role::Read);
        assert_eq!(required_role(&get, "/api/v1/audit"), Role::Read);
        assert_eq!(required_role(&post, "/api/v1/jobs"), Role::Operate);
        for action in ["pause", "resume", "approve", "abort"] {
            assert_eq!(
                required_role(&post, &format!("/api/v1/jobs/{{id}}/{action}")),
                Role::Operate
            );
        }
        assert_eq!(required_role(&post, "/api/v1/uploads"), Role::Operate);
        assert_eq!(
            required_role(&post, "/api/v1/jobs/{id}/cancel"),
            Role::Operate
        );
        assert_eq!(
            required_role(&Method::DELETE, "/api/v1/policies/{name}"),
            Role::Operate
        );
        assert_eq!(required_role(&post, "/api/v1/agents"), Role::Admin);
        assert_eq!(
            required_role(&Method::PATCH, "/api/v1/agents/{id}"),
            Role::Admin
        );
        assert_eq!(
            required_role(&post, "/api/v1/enrolment-tokens"),
            Role::Admin
        );
        assert_eq!(
            listed_role(&post, "/api/v1/agents/{id}/revoke"),
            Some(Role::Admin)
        );
        // Unlisted: closed.
        assert_eq!(listed_role(&post, "/api/v1/new-thing"), None);
        assert_eq!(required_role(&post, "/api/v1/new-thing"), Role::Admin);
        assert_eq!(required_role(&Method::PUT, "/api/v1/agents"), Role::Admin);
    }

    #[test]
    fn the_table_lists_each_route_once() {
        for (i, (m, p, _)) in ROUTE_ROLES.iter().enumerate() {
            assert!(
                !ROUTE_ROLES[..i]
                    .iter()
                    .any(|(m2, p2, _)| m == m2 && p == p2),
                "{m} {p} listed twice"
            );
        }
    }
}
