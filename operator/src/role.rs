//! An agent's role, as the StatefulSets, the placement and the status name it.

use std::fmt;

use crate::crd::{BaseModel, RoleSpec, ServingMode};

/// `unified` agents do both phases; `prefill` agents compute prompts for `decode` agents,
/// which own requests (clients reach them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Unified,
    Prefill,
    Decode,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Unified, Role::Prefill, Role::Decode];

    /// The agent's `--role` value, the label value and the child-name suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unified => "unified",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The roles a model runs, with their specs (a missing `unified` spec means one default
/// replica), in a fixed order.
pub fn roles(model: &BaseModel) -> Vec<(Role, RoleSpec)> {
    let s = &model.spec.serving;
    match s.mode {
        ServingMode::Unified => vec![(Role::Unified, s.unified.clone().unwrap_or_default())],
        ServingMode::Disaggregated => vec![
            (Role::Prefill, s.prefill.clone().unwrap_or_default()),
            (Role::Decode, s.decode.clone().unwrap_or_default()),
        ],
    }
}

/// Replicas asked of a role (default 1).
pub fn replicas(spec: &RoleSpec) -> i32 {
    spec.replicas.unwrap_or(1).max(0)
}
