//! Loading an adapter again from the source it was loaded from: the files are read and
//! digested again (they may have been rewritten in place), and the registry keeps the entry
//! when the digest is the same, or replaces its weights when it changed — dropping the host
//! copy and the pool copy of the old weights, so nothing derived from the old digest is used
//! for the new one.

use std::path::Path;
use std::sync::Arc;

use super::{Registry, RegistryError};
use crate::lora::host::HostAdapter;
use crate::lora::ids::{AdapterKey, Digest};

/// What a re-read of an adapter's source found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The files have the digest already loaded; nothing changed.
    Unchanged,
    /// The files changed: the new weights replaced those of digest `previous`.
    Replaced { previous: Digest },
}

impl Registry {
    /// Takes the result of re-reading `key`'s `source` (started after
    /// [`super::Registration::Verify`]).
    ///
    /// Errors: [`RegistryError::Unknown`] when the adapter was unloaded meanwhile,
    /// [`RegistryError::Superseded`] when another load re-pointed it, and
    /// [`RegistryError::InUse`] when the weights changed while requests still use the old
    /// ones (nothing changes then; load again once they finished).
    pub fn finish_verify(
        &mut self,
        key: &AdapterKey,
        source: &Path,
        adapter: Arc<HostAdapter>,
    ) -> Result<Verified, RegistryError> {
        let e = self
            .entries
            .get(key)
            .ok_or_else(|| RegistryError::Unknown(key.clone()))?;
        if e.source != source || e.is_loading() || e.unloading {
            return Err(RegistryError::Superseded(key.clone()));
        }
        let previous = e.known.as_ref().map(|k| k.0);
        if previous == Some(adapter.digest) {
            // Same weights: keep the entry; an evicted host copy may as well come back.
            if e.needs_reload() {
                self.finish_load(key, adapter);
            }
            return Ok(Verified::Unchanged);
        }
        let uses = e.uses();
        if uses > 0 {
            return Err(RegistryError::InUse {
                key: key.clone(),
                uses,
            });
        }
        self.remove_weights(key);
        // `finish_load` sets `known` and `placement` from the new weights.
        self.finish_load(key, adapter);
        Ok(match previous {
            Some(previous) => Verified::Replaced { previous },
            // Not reachable: only a finished load asks for a verify, and it set `known`.
            None => Verified::Unchanged,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{host, key, loaded};
    use super::*;

    #[test]
    fn same_digest_keeps_the_entry_and_a_new_one_replaces_the_weights() {
        let mut r = loaded(1000, &["a"], 100);
        let a = key("a");
        let src = Path::new("a");
        assert_eq!(
            r.register(a.clone(), src.into(), None, false),
            Ok(super::super::Registration::Verify)
        );
        assert_eq!(
            r.finish_verify(&a, src, host(0, 100)),
            Ok(Verified::Unchanged)
        );
        assert_eq!(r.host_used(), 100);

        assert_eq!(
            r.finish_verify(&a, src, host(9, 40)),
            Ok(Verified::Replaced {
                previous: Digest([0; 32])
            })
        );
        let s = r.summary(&a).unwrap();
        assert_eq!((s.digest, s.bytes), (Some(Digest([9; 32])), 40));
        assert_eq!(r.host_used(), 40, "the old weights left the host cache");
    }

    #[test]
    fn changed_weights_in_use_or_a_superseded_entry_change_nothing() {
        let mut r = loaded(1000, &["a"], 100);
        let a = key("a");
        let lease = r.lease(&a).unwrap();
        assert_eq!(
            r.finish_verify(&a, Path::new("a"), host(9, 40)),
            Err(RegistryError::InUse {
                key: a.clone(),
                uses: 1
            })
        );
        assert_eq!(r.summary(&a).unwrap().digest, Some(Digest([0; 32])));
        r.release(lease);
        assert_eq!(
            r.finish_verify(&a, Path::new("elsewhere"), host(9, 40)),
            Err(RegistryError::Superseded(a.clone()))
        );
        assert!(r.unload(&a));
        assert_eq!(
            r.finish_verify(&a, Path::new("a"), host(9, 40)),
            Err(RegistryError::Unknown(a))
        );
    }
}
